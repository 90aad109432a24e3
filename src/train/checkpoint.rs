//! Checkpoints `RUN/checkpoints/step-N/`: parameters, optimizer moments and the loop's state.
//! Each is written into a hidden temporary directory and renamed into place, so a directory named
//! `step-N` is always complete; a kill at any moment leaves at worst a temporary directory that
//! the next run removes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::batch::LoaderPosition;
use crate::store::{read_safetensors_inside, write_safetensors_raw, NamedTensor, RawTensor};
use crate::{Error, Result};

use crate::run_layout::{checkpoint_step, checkpoints_dir, list_checkpoints, OPTIMIZER, PARAMS, STATE};

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

/// The first tensor holding a NaN or an infinity, with the index of that value.
pub fn first_nonfinite<'a>(tensors: &'a [RawTensor]) -> Option<(&'a str, usize, f32)> {
    tensors.iter().find_map(|t| {
        let values = crate::onnx::le::elements::<f32>(&t.bytes);
        values.enumerate().find(|(_, v)| !v.is_finite()).map(|(i, v)| (t.name, i, v))
    })
}

/// Writes the checkpoint of `state.step` (only from finite parameters and moments: a NaN would be
/// resumed forever) and then removes the oldest beyond `keep`, never one newer than this one.
pub fn save(run: &Path, state: &TrainerState, params: &[RawTensor], moments: &[RawTensor], keep: usize) -> Result<PathBuf> {
    if let Some((name, i, v)) = first_nonfinite(params).or_else(|| first_nonfinite(moments)) {
        return Err(Error::NonFiniteState(format!(
            "checkpoint step-{} not written: {name}[{i}] is {v}; the training state is no longer finite (lower --lr, or resume from an earlier checkpoint)",
            state.step
        )));
    }
    let dir = checkpoints_dir(run);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let final_dir = crate::run_layout::checkpoint_dir(run, state.step);
    let tmp = dir.join(format!(".partial-step-{}-{}", state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_safetensors_raw(&tmp.join(PARAMS), params, None)?;
    write_safetensors_raw(&tmp.join(OPTIMIZER), moments, None)?;
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    crate::temp_files::write_atomic(&tmp.join(STATE), |w| w.write_all(text.as_bytes()))?;
    if final_dir.exists() {
        remove(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(&dir);
    // only checkpoints up to this one count: a newer one (from a run resumed at an earlier step) is never removed
    let upto: Vec<_> = list_checkpoints(run).into_iter().filter(|(s, _)| *s <= state.step).collect();
    if keep > 0 && upto.len() > keep {
        for (_, p) in &upto[..upto.len() - keep] {
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

/// The loop's state alone (cheap: no tensors), checked against the checkpoint's name: a `step-N`
/// directory holds the state after step N.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = crate::fs_guard::read_to_string_inside(dir, &path)?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::BadManifest { path: path.clone(), detail: e.to_string() })?;
    state.check().map_err(|why| Error::BadManifest { path: path.clone(), detail: why })?;
    let named = checkpoint_step(dir);
    if named.is_some_and(|n| n != state.step) {
        return Err(Error::BadCheckpoint {
            path,
            detail: format!(
                "holds the state of step {}, not of step {} its directory is named for (the checkpoint was moved or altered; resume from another)",
                state.step,
                named.unwrap_or_default()
            ),
        });
    }
    Ok(state)
}

/// Refuses a resume point beyond what the run can reach: more steps than it trains, or a data
/// position past the batches those steps read (`batches_per_step`: gradient accumulation times
/// ranks) or past the end of an epoch.
pub fn check_reachable(path: &Path, state: &TrainerState, total_steps: u64, batches_per_epoch: usize, batches_per_step: u64) -> Result<()> {
    let p = &state.position;
    let epochs = (total_steps.saturating_mul(batches_per_step) / batches_per_epoch.max(1) as u64).saturating_add(1);
    let why = if state.step > total_steps {
        format!("step {} is beyond the {total_steps} steps this run trains (--max-steps, --epochs)", state.step)
    } else if p.epoch > epochs {
        format!("data position epoch {} is beyond the {epochs} epochs {total_steps} steps can reach", p.epoch)
    } else if p.index > batches_per_epoch {
        format!("data position {} is beyond the {batches_per_epoch} batches of an epoch", p.index)
    } else {
        return Ok(());
    };
    Err(Error::BadCheckpoint {
        path: path.join(STATE),
        detail: format!("{why}; the checkpoint does not belong to this run (resume with its flags, or choose a new --out)"),
    })
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
    let (params, _) = read_safetensors_inside(dir, &dir.join(PARAMS))?;
    let (moments, _) = read_safetensors_inside(dir, &dir.join(OPTIMIZER))?;
    Ok(Loaded { state, params, moments, dir: dir.to_path_buf() })
}
