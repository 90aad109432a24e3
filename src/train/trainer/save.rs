//! The checkpoint phase: the training state written as `RUN/checkpoints/step-N`, and the trained
//! parameters as `RUN/final` at the end.

use std::collections::BTreeMap;
use std::path::Path;

use super::host::HostViews;
use crate::run_layout::{FINAL_DIR, PARAMS};
use crate::store::{write_safetensors_raw, RawTensor};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::device::Device;
use crate::train::optimizer_step::State;
use crate::{Error, Result};

/// Saves `state` and `tstate` as the checkpoint of step `tstate.step`, keeping the newest `keep`.
pub fn checkpoint(run: &Path, tstate: &TrainerState, state: &State, device: &Device, keep: usize) -> Result<()> {
    let params = HostViews::of(&state.params.names, &state.params.values, "", device)?;
    let m = HostViews::of(&state.params.names, &state.m, ".adam_m", device)?;
    let v = HostViews::of(&state.params.names, &state.v, ".adam_v", device)?;
    let moments: Vec<RawTensor> = m.raw().into_iter().chain(v.raw()).collect();
    checkpoint::save(run, tstate, &params.raw(), &moments, keep)?;
    Ok(())
}

/// `RUN/final`: the trained parameters of step `step`, and where the graphs they belong to are.
pub fn final_params(run: &Path, artifacts: &Path, step: u64, state: &State, device: &Device) -> Result<()> {
    let params = HostViews::of(&state.params.names, &state.params.values, "", device)?;
    let final_dir = run.join(FINAL_DIR);
    std::fs::create_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let mut meta = BTreeMap::new();
    meta.insert("step".to_string(), step.to_string());
    meta.insert("artifacts".to_string(), std::fs::canonicalize(artifacts).unwrap_or(artifacts.to_path_buf()).display().to_string());
    write_safetensors_raw(&final_dir.join(PARAMS), &params.raw(), Some(&meta))
}
