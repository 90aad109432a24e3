//! Saving several models that hold the same large initializers (the train, eval and inference graphs all
//! carry the model's frozen weights) so that each tensor is on disk once: where it already lies, in an
//! external data file of the model they were built from (hard-linked into the output directory, since ONNX
//! Runtime reads external data only from inside the model's directory), or else in one data file written
//! beside them, which every model references.

use std::collections::HashMap;
use std::path::Path;

use prost::bytes::Bytes;
use prost::Message;

use super::io::{kv, write_atomic, MappedData, EXTERNAL_MIN_BYTES};
use super::proto::{tensor_proto::DataLocation, ModelProto};
use crate::Result;

/// The data file written for initializers that are in no linkable source file.
pub const SHARED_DATA_FILE: &str = "frozen.data";

/// What [`save_models_sharing_data`] put on disk.
#[derive(Debug, Default)]
pub struct SharedData {
    /// Bytes written to [`SHARED_DATA_FILE`] (0: no such file).
    pub written_bytes: u64,
    /// Source files hard-linked into the directory, by the name they have there.
    pub linked: Vec<String>,
}

/// The name a linked source file gets in the output directory.
fn link_name(index: usize) -> String {
    if index == 0 {
        "model-weights.data".into()
    } else {
        format!("model-weights-{index}.data")
    }
}

/// Writes every model to `dir/<file>`, with each initializer of at least [`EXTERNAL_MIN_BYTES`] stored once
/// for all of them. A tensor that is still a slice of one of `sources` (unchanged since loading) stays in that
/// file, linked into `dir`; when linking fails (another file system, no permission) its bytes are copied into
/// [`SHARED_DATA_FILE`] like every other tensor. Two models share a tensor when they hold the same bytes
/// (one slice, as graphs cloned from one model do).
pub fn save_models_sharing_data(dir: &Path, models: Vec<(String, ModelProto)>, sources: &[MappedData]) -> Result<SharedData> {
    let mut report = SharedData::default();
    let mut linked: Vec<Option<bool>> = vec![None; sources.len()];
    let mut placed: HashMap<(usize, usize), (String, usize)> = HashMap::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut offset = 0usize;
    let mut light = models;
    for (_, model) in light.iter_mut() {
        let Some(graph) = model.graph.as_mut() else { continue };
        for t in graph.initializer.iter_mut().filter(|t| t.raw_data.len() >= EXTERNAL_MIN_BYTES) {
            let len = t.raw_data.len();
            let key = (t.raw_data.as_ptr() as usize, len);
            if !placed.contains_key(&key) {
                let in_source = sources.iter().enumerate().find_map(|(i, s)| s.offset_of(&t.raw_data).map(|at| (i, at)));
                let location = match in_source {
                    Some((i, at)) if *linked[i].get_or_insert_with(|| link(&sources[i].path, &dir.join(link_name(i)), &mut report)) => (link_name(i), at),
                    _ => {
                        // 64-byte alignment lets runtimes map the data directly.
                        let pad = (64 - offset % 64) % 64;
                        if pad > 0 {
                            chunks.push(Bytes::from(vec![0u8; pad]));
                            offset += pad;
                        }
                        chunks.push(t.raw_data.clone());
                        offset += len;
                        (SHARED_DATA_FILE.to_string(), offset - len)
                    }
                };
                placed.insert(key, location);
            }
            let (file, at) = &placed[&key];
            t.raw_data = Bytes::new();
            t.data_location = DataLocation::External as i32;
            t.external_data = vec![kv("location", file), kv("offset", &at.to_string()), kv("length", &len.to_string())];
        }
    }
    if !chunks.is_empty() {
        write_atomic(&dir.join(SHARED_DATA_FILE), |w| chunks.iter().try_for_each(|c| w.write_all(c)))?;
        report.written_bytes = offset as u64;
    }
    for (file, model) in light {
        let buf = model.encode_to_vec();
        write_atomic(&dir.join(file), |w| w.write_all(&buf))?;
    }
    Ok(report)
}

/// Hard-links `source` to `target`; false when the file system will not (the caller copies instead).
fn link(source: &Path, target: &Path, report: &mut SharedData) -> bool {
    let ok = std::fs::hard_link(source, target).is_ok();
    if ok {
        report.linked.push(target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    ok
}
