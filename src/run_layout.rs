//! The layout of a run's folder (`train --out RUN`), in one place for the commands that write it
//! (`train`) and those that read it (`export`, `validate`, `--resume`):
//!
//! ```text
//! RUN/train_config.json        the run's settings (artifacts, tokenizer, data, flags)
//! RUN/metrics.jsonl            one line per logged step and evaluation
//! RUN/checkpoints/step-N/      params.safetensors, optimizer.safetensors, trainer_state.json
//! RUN/final/params.safetensors the trained parameters
//! ```

use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "train_config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const FINAL_DIR: &str = "final";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// In `final/` and in each checkpoint.
pub const PARAMS: &str = "params.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "trainer_state.json";

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join(CHECKPOINTS_DIR)
}

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!("step-{step}"))
}

/// Complete checkpoints (a `step-N` directory with its state written last), oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let dir = checkpoints_dir(run);
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
                    e.path().join(STATE).exists().then(|| (step, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What a run's `train_config.json` says about its inputs, for the commands that read a run.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct RunRecord {
    pub artifacts: PathBuf,
    pub tokenizer: PathBuf,
    #[serde(default)]
    pub tokenizer_config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_checkpoints_are_listed_oldest_first() {
        let run = tempfile::tempdir().unwrap();
        for (step, complete) in [(10, true), (2, true), (7, false)] {
            let d = checkpoint_dir(run.path(), step);
            std::fs::create_dir_all(&d).unwrap();
            if complete {
                std::fs::write(d.join(STATE), "{}").unwrap();
            }
        }
        std::fs::create_dir_all(checkpoints_dir(run.path()).join("step-x")).unwrap();
        let steps: Vec<u64> = list_checkpoints(run.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [2, 10]);
    }
}
