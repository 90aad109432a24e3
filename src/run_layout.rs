//! The layout of the folders betadpo writes, in one place for the commands that write them and
//! those that read them: the artifacts (`build-graph --out ART`; read by `train`, `validate`,
//! `export`, `infer`) and a run (`train --out RUN`; read by `export`, `validate`, `--resume`):
//!
//! ```text
//! ART/manifest.json            the artifacts' contract: graphs, inputs, parameters
//! ART/<graph>.onnx             train, eval, optimizer and infer graphs
//! ART/params.safetensors       the initial parameters
//! ART/hf_export.json           the Hugging Face name map, when the model came with one
//! RUN/train_config.json        the run's settings (artifacts, tokenizer, data, flags)
//! RUN/metrics.jsonl            one line per logged step and evaluation
//! RUN/report.svg               the run's curves
//! RUN/runs/                    TensorBoard event files (`--report-to tensorboard`)
//! RUN/reference/               cached reference log-probs, one file per data set
//! RUN/checkpoints/step-N/      params.safetensors, optimizer.safetensors, trainer_state.json
//! RUN/final/params.safetensors the trained parameters
//! ```

use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
/// The graphs build-graph writes, each as [`graph_file`].
pub const GRAPHS: [&str; 4] = ["train", "eval", "optimizer", "infer"];
pub const HF_MAP_FILE: &str = "hf_export.json";

pub const CONFIG_FILE: &str = "train_config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const REPORT_FILE: &str = "report.svg";
/// Where TensorBoard event files go (transformers' default `logging_dir` is `runs/...`).
pub const EVENTS_DIR: &str = "runs";
pub const REFERENCE_DIR: &str = "reference";
pub const FINAL_DIR: &str = "final";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// In the artifacts (initial values), in `final/` and in each checkpoint.
pub const PARAMS: &str = "params.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "trainer_state.json";
const CHECKPOINT_PREFIX: &str = "step-";

/// The file of one of [`GRAPHS`] (`train` -> `train.onnx`).
pub fn graph_file(graph: &str) -> String {
    format!("{graph}.onnx")
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join(CHECKPOINTS_DIR)
}

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// The step a checkpoint directory is named for (`step-N` -> N).
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()
}

/// Complete checkpoints (a `step-N` directory with its state written last), oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let dir = checkpoints_dir(run);
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let step = checkpoint_step(&e.path())?;
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
