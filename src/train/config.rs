//! What `betadpo train` was asked to do. Saved as `RUN/train_config.json`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::loss_scale;
use super::schedule::Schedule;
use crate::runtime::ExecutionProvider;
use crate::text::truncation::TruncationMode;
use crate::{Error, Result};

/// TRL's default learning rate: safe on a pretrained model (1e-3 turns SmolLM2's answers into
/// loops within five steps). The tiny test models want 1e-3 and pass it.
pub const DEFAULT_LR: f64 = 1e-6;
/// The beta head's rate. It reads the normalized hidden state, so one step moves beta alike at any
/// width, and it moves no weight of the model (see docs/trl.md).
pub const DEFAULT_HEAD_LR: f64 = 3e-3;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub artifacts: PathBuf,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    /// The split read when --data is a folder (`train` when `None`).
    #[serde(default)]
    pub data_split: Option<String>,
    /// The split read when --eval-data is a folder (`test` when `None`).
    #[serde(default)]
    pub eval_data_split: Option<String>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub out: PathBuf,
    pub epochs: f64,
    pub max_steps: Option<u64>,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub head_lr: f64,
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the run's steps, `ceil(ratio × total)`, used when `warmup_steps` is 0
    /// (TrainingArguments' `warmup_ratio`).
    #[serde(default)]
    pub warmup_ratio: f64,
    pub lr_schedule: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Tokens a row (prompt + answer) keeps, TRL's `max_length`.
    pub max_length: Option<usize>,
    /// Which end of a longer row is kept, TRL's `truncation_mode`.
    #[serde(default)]
    pub truncation_mode: TruncationMode,
    pub seed: u64,
    pub eval_every: u64,
    pub save_every: u64,
    pub save_total_limit: usize,
    pub group_by: Option<String>,
    #[serde(with = "ep_string")]
    pub ep: ExecutionProvider,
    pub threads: Option<usize>,
    pub resume: bool,
    pub skip_bad_rows: bool,
    pub skip_nonfinite: bool,
    /// Sort pairs by length within windows of this many batches (0: off) to cut padding.
    pub bucket_batches: usize,
    pub progress: bool,
    /// Steps between the plain progress lines printed when standard error is not a terminal
    /// (TRL's `logging_steps`).
    #[serde(default = "default_logging_steps")]
    pub logging_steps: u64,
    /// Where metrics go besides `metrics.jsonl` (TRL's `report_to`).
    #[serde(default)]
    pub report_to: ReportTo,
    /// How the AdamW step runs: `auto` (fused host kernel on CPU, the optimizer graph elsewhere),
    /// `graph` (always the optimizer graph) or `fused`.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Write ONNX Runtime profiles (JSON, one per session) with this path prefix.
    #[serde(default)]
    pub profile: Option<PathBuf>,
    /// Treat subnormal floats as zero in the graphs and the fused optimizer (values below ~1e-38
    /// become 0). On by default: x86 computes with subnormals in slow microcode, and they arise in
    /// every masked attention score and in the gradients of a saturated loss. Part of the run key:
    /// a run started without it resumes only without it.
    #[serde(default = "flush_by_default")]
    pub flush_denormals: bool,
    /// Tokens per row when the artifacts take packed batches (`build-graph --layout packed`);
    /// `None`: as wide as the data's longest pair needs, 512 at least (`train::batch::pack_tokens_from_data`).
    #[serde(default)]
    pub pack_tokens: Option<usize>,
    /// The most tokens one pass of the train graph computes: a micro-batch laid out wider runs as
    /// parts of whole rows whose gradients are summed (`train::batch::collate_parts`; the same
    /// gradient up to float rounding). `None`: [`DEFAULT_MICRO_BATCH_TOKENS`] on the CPU, the whole
    /// micro-batch on a GPU (not measured there) or with beta-DPO (its filter reads the whole
    /// micro-batch's margins). 0: the whole micro-batch. Not part of the run key, like `--threads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_tokens: Option<usize>,
    /// fp16 artifacts: the first loss scale (`None`: PyTorch's 65536; see `train::loss_scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale_init: Option<f64>,
    /// With several ranks: what sums the gradients (`auto`: NCCL on GPU memory with a GPU
    /// provider, MPI through host memory otherwise).
    #[serde(default)]
    pub allreduce: AllreduceKind,
    /// Seconds a rank waits for the others in an NCCL allreduce before it ends the job (a hung rank).
    #[serde(default = "default_nccl_timeout")]
    pub nccl_timeout_s: f64,
    /// A data row (a JSONL line, a JSON array element) longer than this is refused (or skipped
    /// with `skip_bad_rows`) before it is parsed.
    #[serde(default = "default_max_row_bytes")]
    pub max_row_bytes: usize,
}

fn default_max_row_bytes() -> usize {
    crate::limits::DEFAULT_MAX_ROW_BYTES
}

fn default_nccl_timeout() -> f64 {
    // PyTorch's NCCL default, 10 minutes
    600.0
}

/// What sums the ranks' gradients (see `distributed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllreduceKind {
    #[default]
    Auto,
    /// MPI, through host memory.
    Mpi,
    /// NCCL, on the GPU's memory.
    Nccl,
}

impl std::str::FromStr for AllreduceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(AllreduceKind::Auto),
            "mpi" => Ok(AllreduceKind::Mpi),
            "nccl" => Ok(AllreduceKind::Nccl),
            other => Err(format!("{other:?} is not an allreduce (auto, mpi, nccl)")),
        }
    }
}

fn default_logging_steps() -> u64 {
    // TRL's DPOConfig default
    10
}

/// Extra metric sinks (`--report-to`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    #[default]
    None,
    /// TensorBoard event files under `RUN/runs/`.
    Tensorboard,
}

impl std::str::FromStr for ReportTo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(ReportTo::None),
            "tensorboard" => Ok(ReportTo::Tensorboard),
            other => Err(format!("{other:?} is not supported (none, tensorboard)")),
        }
    }
}

fn flush_by_default() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Auto,
    Graph,
    Fused,
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(OptimizerKind::Auto),
            "graph" => Ok(OptimizerKind::Graph),
            "fused" => Ok(OptimizerKind::Fused),
            other => Err(format!("{other:?} is not an optimizer implementation (auto, graph, fused)")),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            artifacts: PathBuf::new(),
            data: PathBuf::new(),
            eval_data: None,
            data_split: None,
            eval_data_split: None,
            tokenizer: PathBuf::new(),
            tokenizer_config: None,
            out: PathBuf::new(),
            epochs: 1.0,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            lr: DEFAULT_LR,
            head_lr: DEFAULT_HEAD_LR,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            lr_schedule: Schedule::Linear,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            save_total_limit: 2,
            group_by: None,
            ep: ExecutionProvider::Cpu,
            threads: None,
            resume: false,
            skip_bad_rows: false,
            skip_nonfinite: false,
            bucket_batches: 0,
            progress: true,
            logging_steps: default_logging_steps(),
            report_to: ReportTo::None,
            optimizer: OptimizerKind::Auto,
            profile: None,
            flush_denormals: true,
            pack_tokens: None,
            micro_batch_tokens: None,
            loss_scale_init: None,
            allreduce: AllreduceKind::Auto,
            nccl_timeout_s: default_nccl_timeout(),
            max_row_bytes: default_max_row_bytes(),
        }
    }
}

/// `--micro-batch-tokens` on the CPU when not given: one row of 512-token pairs (891 tokens packed)
/// per pass. SmolLM2-135M, 8 pairs of 511 tokens, `--gradient-checkpointing`, 2 threads: 74.6 s and
/// 4.20 GiB a step in one pass, 50.4 s in passes of two rows, 48.0 s and 3.5 GiB of one
/// (docs/long-sequences.md). Short rows (SmolLM2's 8-pair benchmark batch packs into one 512-token
/// row) are not cut.
pub const DEFAULT_MICRO_BATCH_TOKENS: usize = 1024;

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, detail: String| Err(Error::BadFlag { flag: flag.into(), detail });
        if self.batch_size == 0 {
            return bad("--batch-size", "must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum", "must be at least 1".into());
        }
        self.check_counts()?;
        for (flag, v) in [("--lr", self.lr), ("--head-lr", self.head_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(flag, format!("{v} (must be a finite number >= 0)"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--weight-decay", format!("{} (must be >= 0)", self.weight_decay));
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) && self.max_steps.is_none() {
            return bad("--epochs", format!("{} (must be > 0)", self.epochs));
        }
        if self.optimizer == OptimizerKind::Fused && self.ep != ExecutionProvider::Cpu {
            return bad("--optimizer", "fused runs on host memory; use graph (or auto) with a GPU provider".into());
        }
        if self.pack_tokens == Some(0) {
            return bad("--pack-tokens", "must be at least 1".into());
        }
        if let Some(s) = self.loss_scale_init.filter(|s| !(loss_scale::MIN_SCALE..=loss_scale::MAX_SCALE).contains(s)) {
            return bad("--loss-scale-init", format!("{s} (must be between {} and {})", loss_scale::MIN_SCALE, loss_scale::MAX_SCALE));
        }
        if self.max_steps == Some(0) {
            return bad("--max-steps", "must be at least 1".into());
        }
        if !(self.nccl_timeout_s.is_finite() && self.nccl_timeout_s > 0.0) {
            return bad("--nccl-timeout", format!("{} (must be a positive number of seconds)", self.nccl_timeout_s));
        }
        // A prompt needs a token for the head to read and an answer a token to score.
        if let Some(l) = self.max_length.filter(|&l| l < 2) {
            return bad("--max-length", format!("{l} (must be at least 2: one prompt and one answer token)"));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("--max-grad-norm", format!("{} (must be a finite number >= 0; 0 turns clipping off)", self.max_grad_norm));
        }
        for (flag, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(flag, format!("{v} (must be in [0, 1))"));
            }
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return bad("adam_epsilon", format!("{} (must be a positive number)", self.adam_epsilon));
        }
        if self.threads == Some(0) {
            return bad("--threads", "0 (must be at least 1; leave it out to use every core)".into());
        }
        if self.group_by.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return bad("--group-by", "an empty column name".into());
        }
        if let Some(prefix) = &self.profile {
            let dir = prefix.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            if !dir.is_dir() {
                return bad(
                    "--profile",
                    format!("{}: the folder {} does not exist (profiles are written there as <prefix>_<date>.json)", prefix.display(), dir.display()),
                );
            }
        }
        if self.eval_every > 0 && self.eval_data.is_none() {
            return bad("--eval-every", format!("{} needs --eval-data (there is nothing to evaluate on)", self.eval_every));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("--warmup-ratio", format!("{} (must be in [0, 1])", self.warmup_ratio));
        }
        if self.logging_steps == 0 {
            return bad("--logging-steps", "0 (must be at least 1)".into());
        }
        if self.epochs.is_nan() || self.epochs < 0.0 {
            return bad("--epochs", format!("{} (must be > 0)", self.epochs));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// The counts that size memory or enter products of counts, bounded before anything is
    /// allocated (the batch's memory is estimated once the data's lengths are known).
    fn check_counts(&self) -> Result<()> {
        use crate::limits::{at_most, MAX_COUNT};
        at_most("--batch-size", self.batch_size, MAX_COUNT, "pairs in one micro-batch")?;
        at_most("--grad-accum", self.grad_accum, MAX_COUNT, "micro-batches in one optimizer step")?;
        at_most("--max-length", self.max_length.unwrap_or(0), MAX_COUNT, "tokens in one row, beyond any model's positions")?;
        at_most("--pack-tokens", self.pack_tokens.unwrap_or(0), MAX_COUNT, "tokens in one packed row")?;
        at_most("--micro-batch-tokens", self.micro_batch_tokens.unwrap_or(0), MAX_COUNT, "tokens in one pass of the train graph")?;
        at_most("--bucket-batches", self.bucket_batches, MAX_COUNT, "batches in one sorting window")?;
        if let Some(t) = self.threads {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            at_most("--threads", t, max_threads(cores), &format!("4 threads for each of this machine's {cores} cores, 64 at least"))?;
        }
        if self.max_row_bytes == 0 {
            return Err(Error::BadFlag { flag: "--max-row-bytes".into(), detail: "must be at least 1".into() });
        }
        Ok(())
    }
}

/// Intra-op threads allowed on `cores` cores: ONNX Runtime starts every one of them with its own stack.
pub fn max_threads(cores: usize) -> usize {
    cores.saturating_mul(4).max(64)
}

mod ep_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::runtime::ExecutionProvider;
    pub fn serialize<S: Serializer>(v: &ExecutionProvider, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ExecutionProvider, D::Error> {
        String::deserialize(d)?.parse().map_err(|e: crate::Error| serde::de::Error::custom(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory's train_config.json from before the TRL settings (warm-up ratio, logging
    /// steps, report_to) still reads, so `export --run` and `--resume` keep working on it.
    #[test]
    fn configs_written_before_the_trl_settings_still_read() {
        let mut v = serde_json::to_value(TrainConfig { lr_schedule: Schedule::Constant, ..Default::default() }).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in ["warmup_ratio", "logging_steps", "report_to"] {
            assert!(o.remove(k).is_some(), "{k} is written");
        }
        assert_eq!(o["lr_schedule"], "constant", "the old schedule names are unchanged");
        let c: TrainConfig = serde_json::from_value(v).unwrap();
        assert_eq!((c.warmup_ratio, c.logging_steps, c.report_to, c.lr_schedule), (0.0, 10, ReportTo::None, Schedule::Constant));
        let s: Schedule = serde_json::from_str("\"constant_with_warmup\"").unwrap();
        assert_eq!(s, Schedule::ConstantWithWarmup);
    }
}
