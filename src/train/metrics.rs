//! Metrics with TRL's names, from the per-pair values the graphs return, and the JSONL log.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value};

use crate::distributed::wire::{Reader, Writer};
use crate::{Error, Result};

/// Per-pair values of one batch, as the train/eval graphs return them.
#[derive(Clone, Debug, Default)]
pub struct PairValues {
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    /// |policy − reference| log-prob per row, averaged over the pair's two rows: drift from the reference.
    pub drift: Vec<f32>,
    /// One beta per pair (per-row betas are averaged over the pair's two rows).
    pub beta: Vec<f32>,
    pub groups: Vec<Option<String>>,
}

impl PairValues {
    /// Splits graph outputs `[B]`/`[2B]` into per-pair values.
    pub fn from_outputs(chosen: &[f32], rejected: &[f32], policy: &[f32], reference: &[f32], beta: &[f32], groups: Vec<Option<String>>) -> Self {
        let b = chosen.len();
        let pair_beta = if beta.len() == 2 * b { (0..b).map(|i| 0.5 * (beta[i] + beta[b + i])).collect() } else { beta.to_vec() };
        let drift = (0..b).map(|i| 0.5 * ((policy[i] - reference[i]).abs() + (policy[b + i] - reference[b + i]).abs())).collect();
        PairValues {
            chosen_rewards: chosen.to_vec(),
            rejected_rewards: rejected.to_vec(),
            chosen_logps: policy[..b].to_vec(),
            rejected_logps: policy[b..].to_vec(),
            drift,
            beta: pair_beta,
            groups,
        }
    }

    pub fn extend(&mut self, o: PairValues) {
        self.chosen_rewards.extend(o.chosen_rewards);
        self.rejected_rewards.extend(o.rejected_rewards);
        self.chosen_logps.extend(o.chosen_logps);
        self.rejected_logps.extend(o.rejected_logps);
        self.drift.extend(o.drift);
        self.beta.extend(o.beta);
        self.groups.extend(o.groups);
    }

    /// Encodes the values for another rank (see [`PairValues::read`]).
    pub fn write(&self, w: &mut Writer) {
        for v in [&self.chosen_rewards, &self.rejected_rewards, &self.chosen_logps, &self.rejected_logps, &self.drift, &self.beta] {
            w.f32s(v);
        }
        w.opt_strings(&self.groups);
    }

    pub fn read(r: &mut Reader) -> Result<Self> {
        Ok(PairValues {
            chosen_rewards: r.f32s()?,
            rejected_rewards: r.f32s()?,
            chosen_logps: r.f32s()?,
            rejected_logps: r.f32s()?,
            drift: r.f32s()?,
            beta: r.f32s()?,
            groups: r.opt_strings()?,
        })
    }

    pub fn len(&self) -> usize {
        self.chosen_rewards.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

fn std(v: &[f32]) -> f64 {
    let m = mean(v);
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// `rewards/*`, `logps/*`, `beta/*` and `drift` over the given pairs, into `out` with `prefix`.
pub fn summarise(v: &PairValues, prefix: &str, out: &mut Map<String, Value>) {
    let acc: Vec<f32> = v.chosen_rewards.iter().zip(&v.rejected_rewards).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
    let margins: Vec<f32> = v.chosen_rewards.iter().zip(&v.rejected_rewards).map(|(c, r)| c - r).collect();
    let put = |out: &mut Map<String, Value>, k: &str, x: f64| {
        out.insert(format!("{prefix}{k}"), num(x));
    };
    put(out, "rewards/chosen", mean(&v.chosen_rewards));
    put(out, "rewards/rejected", mean(&v.rejected_rewards));
    put(out, "rewards/accuracies", mean(&acc));
    put(out, "rewards/margins", mean(&margins));
    put(out, "logps/chosen", mean(&v.chosen_logps));
    put(out, "logps/rejected", mean(&v.rejected_logps));
    put(out, "beta/mean", mean(&v.beta));
    put(out, "beta/std", std(&v.beta));
    put(out, "beta/min", v.beta.iter().copied().fold(f32::INFINITY, f32::min) as f64);
    put(out, "beta/max", v.beta.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64);
    put(out, "drift/abs_logratio", mean(&v.drift));
}

/// Per-group accuracy, margin, beta and drift: `<prefix>rewards/accuracies/<group>`,
/// `<prefix>rewards/margins/<group>`, `<prefix>beta/mean/<group>`, ... A training step logs them too, so a
/// loss spike can be traced to the groups whose pairs caused it.
pub fn summarise_groups(v: &PairValues, prefix: &str, out: &mut Map<String, Value>) {
    let mut by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, g) in v.groups.iter().enumerate() {
        if let Some(g) = g {
            by.entry(g.as_str()).or_default().push(i);
        }
    }
    for (g, idx) in by {
        let acc: Vec<f32> = idx.iter().map(|&i| if v.chosen_rewards[i] > v.rejected_rewards[i] { 1.0 } else { 0.0 }).collect();
        let margins: Vec<f32> = idx.iter().map(|&i| v.chosen_rewards[i] - v.rejected_rewards[i]).collect();
        let beta: Vec<f32> = idx.iter().map(|&i| v.beta[i]).collect();
        let drift: Vec<f32> = idx.iter().map(|&i| v.drift[i]).collect();
        out.insert(format!("{prefix}rewards/accuracies/{g}"), num(mean(&acc)));
        out.insert(format!("{prefix}rewards/margins/{g}"), num(mean(&margins)));
        out.insert(format!("{prefix}beta/mean/{g}"), num(mean(&beta)));
        out.insert(format!("{prefix}drift/abs_logratio/{g}"), num(mean(&drift)));
        out.insert(format!("{prefix}pairs/{g}"), Value::from(idx.len()));
    }
}

/// JSON number, or null for NaN/inf (JSON has neither).
pub fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

/// `RUN/metrics.jsonl`: one JSON object per line, flushed per line so a crash loses nothing logged.
pub struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// Opens for appending; on resume, lines of steps after `keep_through_step` (logged before a
    /// crash, about to be redone) are dropped first.
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        let run = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let exists = std::fs::symlink_metadata(path).is_ok();
        if exists {
            // not a FIFO (opening it to append would wait for a reader) nor a link out of the run
            crate::fs_guard::open_inside(run, path)?;
        }
        if let (Some(limit), true) = (keep_through_step, exists) {
            let text = crate::fs_guard::read_to_string_inside(run, path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v.get("step").and_then(Value::as_u64)).map(|s| s <= limit).unwrap_or(false))
                .collect();
            let body = kept.iter().map(|l| format!("{l}\n")).collect::<String>();
            crate::temp_files::write_atomic(path, |w| w.write_all(body.as_bytes()))?;
        } else if keep_through_step.is_none() && exists {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW | libc::O_NONBLOCK);
        let file = options.open(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog { file, path: path.to_path_buf() })
    }

    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(record).expect("metrics serialise");
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads a metrics log back (for the report).
pub fn read_log(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = crate::fs_guard::read_to_string(path)?;
    Ok(text.lines().filter_map(|l| serde_json::from_str::<Map<String, Value>>(l).ok()).collect())
}
