//! Checkpoints `RUN/checkpoints/step-N/`: parameters, optimizer moments and the loop's state.
//! Each is written into a hidden temporary directory and renamed into place, so a directory named
//! `step-N` is always complete; a kill at any moment leaves at worst a temporary directory that
//! the next run removes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::batch::LoaderPosition;
use crate::store::{read_safetensors, write_safetensors_raw, NamedTensor, RawTensor};
use crate::{Error, Result};

pub use crate::run_layout::{checkpoints_dir, list_checkpoints as list, OPTIMIZER, PARAMS, STATE};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the data loader continues.
    pub position: LoaderPosition,
    /// Non-padding tokens trained on so far.
    pub tokens: u64,
    pub skipped_nonfinite: u64,
    /// Optimizer updates applied (steps minus skipped ones): Adam's step counter.
    #[serde(default)]
    pub updates: u64,
    /// Fingerprint of everything that must not change across a resume (data, artifacts, flags).
    pub run_key: String,
    /// beta-DPO's running margin statistics (zero for the other methods).
    #[serde(default)]
    pub margin_stats: super::batch_beta::MarginStats,
    /// epsilon-DPO's global beta before the next step (absent for the other methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_beta: Option<f64>,
    /// float16 artifacts' dynamic loss scale before the next step (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<super::loss_scale::LossScale>,
}

/// Removes temporary directories left by a killed process.
pub fn clean_partial(run: &Path) {
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(run)) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(".partial-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

pub fn save(run: &Path, state: &TrainerState, params: &[RawTensor], moments: &[RawTensor], keep: usize) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let final_dir = crate::run_layout::checkpoint_dir(run, state.step);
    let tmp = dir.join(format!(".partial-step-{}-{}", state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_safetensors_raw(&tmp.join(PARAMS), params, None)?;
    write_safetensors_raw(&tmp.join(OPTIMIZER), moments, None)?;
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    crate::onnx::write_atomic(&tmp.join(STATE), |w| w.write_all(text.as_bytes()))?;
    if final_dir.exists() {
        remove(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(&dir);
    let all = list(run);
    if keep > 0 && all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            let _ = remove(p);
        }
    }
    Ok(final_dir)
}

/// Removes a checkpoint without a `step-N` directory ever being seen half-deleted (one that still
/// has its state file would pass for complete): it is renamed to a temporary name first, which
/// [`clean_partial`] removes should the process die before the deletion ends.
fn remove(dir: &Path) -> std::io::Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.with_file_name(format!(".partial-removing-{name}-{}", std::process::id()));
    std::fs::rename(dir, &tmp)?;
    std::fs::remove_dir_all(&tmp)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

pub struct Loaded {
    pub state: TrainerState,
    pub params: Vec<NamedTensor>,
    pub moments: Vec<NamedTensor>,
    pub dir: PathBuf,
}

/// The loop's state alone (cheap: no tensors).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    state.check().map_err(|why| Error::Other(format!("{}: {why}", path.display())))?;
    Ok(state)
}

/// Counters beyond this are corrupt, not trained: 2^48 steps is millennia of training, and
/// arithmetic on smaller values cannot overflow.
const MAX_COUNTER: u64 = 1 << 48;

impl TrainerState {
    fn check(&self) -> std::result::Result<(), String> {
        let p = &self.position;
        let counters = [("step", self.step), ("tokens", self.tokens), ("position.epoch", p.epoch), ("position.index", p.index as u64)];
        if let Some((name, v)) = counters.iter().find(|(_, v)| *v > MAX_COUNTER) {
            return Err(format!("{name} {v} is beyond any real run (the file is corrupt)"));
        }
        if self.updates > self.step || self.skipped_nonfinite > self.step {
            return Err(format!("updates {} and skipped steps {} cannot exceed steps {}", self.updates, self.skipped_nonfinite, self.step));
        }
        Ok(())
    }
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let state = read_state(dir)?;
    let (params, _) = read_safetensors(&dir.join(PARAMS))?;
    let (moments, _) = read_safetensors(&dir.join(OPTIMIZER))?;
    Ok(Loaded { state, params, moments, dir: dir.to_path_buf() })
}
