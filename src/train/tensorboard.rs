//! TensorBoard event files (`train --report-to tensorboard`): every metrics record as scalar
//! summaries under the tags transformers' `TensorBoardCallback` gives TRL's metrics (`train/loss`,
//! `train/rewards/margins`, `eval/loss`, ...), in `RUN/runs/events.out.tfevents.*`. The format is
//! TFRecord framing (length, masked CRC-32C of the length, the bytes, their masked CRC-32C) around
//! `tensorflow.Event` protos, written here with prost messages of the fields used.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::{Map, Value};

use crate::run_layout::EVENTS_DIR;
use crate::{Error, Result};

/// `tensorflow.Event`, the fields written (`what` is a oneof: one of them is set).
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` holding a `simple_value` (what `SummaryWriter.add_scalar` writes).
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotated and offset so a CRC over data holding CRCs stays strong.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

/// A record's numeric values under transformers' tags: `eval/...` as they are, the rest `train/<key>`.
pub fn scalars(rec: &Map<String, Value>) -> Vec<(String, f32)> {
    rec.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
        .map(|(k, v)| (if k.starts_with("eval/") { k.clone() } else { format!("train/{k}") }, v as f32))
        .collect()
}

/// One event file, appended to and flushed record by record (a killed run keeps what it logged).
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `RUN/runs/` (a resumed run adds one; TensorBoard reads them in order).
    pub fn create(run: &Path) -> Result<Self> {
        let dir = run.join(EVENTS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("events.out.tfevents.{}.betadpo.{}", now() as u64, std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path };
        w.write_event(&Event { wall_time: now(), step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record's scalars at its `step`.
    pub fn write_record(&mut self, rec: &Map<String, Value>) -> Result<()> {
        let step = rec.get("step").and_then(Value::as_i64).unwrap_or(0);
        let value = scalars(rec).into_iter().map(|(tag, v)| SummaryValue { tag, simple_value: Some(v) }).collect();
        self.write_event(&Event { wall_time: now(), step, file_version: None, summary: Some(Summary { value }) })
    }

    fn write_event(&mut self, e: &Event) -> Result<()> {
        self.file.write_all(&record(&e.encode_to_vec())).and_then(|_| self.file.flush()).map_err(|err| Error::io(&self.path, err))
    }
}

/// Reads an event file back, checking every length and CRC (for tests and tools).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |what: String| Error::BadEventFile { path: path.to_path_buf(), detail: what };
    let mut events = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(bad("truncated record header".into()));
        }
        let (len_bytes, crc) = (&rest[..8], u32::from_le_bytes(rest[8..12].try_into().unwrap()));
        if masked_crc(len_bytes) != crc {
            return Err(bad("length CRC mismatch".into()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let body = rest.get(12..12 + len).ok_or_else(|| bad("truncated record".into()))?;
        let crc = rest.get(12 + len..16 + len).ok_or_else(|| bad("truncated record CRC".into()))?;
        if masked_crc(body).to_le_bytes() != crc {
            return Err(bad("record CRC mismatch".into()));
        }
        events.push(Event::decode(body).map_err(|e| bad(format!("not an Event ({e})")))?);
        rest = &rest[16 + len..];
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 (iSCSI) B.4 and the CRC catalogue's check value for "123456789"
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn tags_follow_transformers_rewrite_logs() {
        let rec: Map<String, Value> = serde_json::from_str(r#"{"loss": 0.5, "step": 3, "eval/loss": 0.25, "beta/min": null}"#).unwrap();
        let mut s = scalars(&rec);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(s, vec![("eval/loss".to_string(), 0.25), ("train/loss".to_string(), 0.5)]);
    }
}
