//! `betadpo train`: its flags (and a TRL `DPOConfig` file's keys), and the run they start.

use std::path::PathBuf;

use anyhow::{Context, Result};
use betadpo::runtime::{ExecutionProvider, HeapUse};
use betadpo::text::truncation::TruncationMode;
use betadpo::train::config::{ReportTo, TrainConfig};
use betadpo::train::schedule::Schedule;
use betadpo::train::trainer::train_with;
use betadpo::train::trl_config::{check_artifacts, ArtifactSettings, OwnFlag};

/// TRL's spellings are aliases where they mean the same (`--learning-rate` is `--lr`); a flag given
/// twice keeps its last value, so the command line overrides `--config`.
#[derive(clap::Args)]
#[command(args_override_self = true)]
pub struct Args {
    /// A TRL DPOConfig / TrainingArguments file (YAML or JSON): its keys (TRL's field names or these
    /// flags' names) set the flags, and flags given here override them. See docs/trl.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Artifacts directory written by build-graph.
    #[arg(long)]
    artifacts: PathBuf,
    /// Training preferences in TRL's formats: a .jsonl, .json or .parquet file, a folder of Parquet
    /// shards (the Hub's data/train-*.parquet) or a `datasets` save_to_disk folder (docs/data.md).
    #[arg(long)]
    data: PathBuf,
    /// Held-out preferences for evaluation (the same kinds as --data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// The split --data reads when it is a folder (default train).
    #[arg(long)]
    data_split: Option<String>,
    /// The split --eval-data reads when it is a folder (default test).
    #[arg(long)]
    eval_data_split: Option<String>,
    /// tokenizer.json or the folder holding it (tokenizer_config.json beside it is read for the chat
    /// template and special tokens). Default: the one in the Hugging Face folder the artifacts were built
    /// from (`build-graph --model DIR`).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// tokenizer_config.json, when it is not beside tokenizer.json.
    #[arg(long)]
    tokenizer_config: Option<PathBuf>,
    /// Run directory (metrics, checkpoints, final parameters, report).
    #[arg(long, visible_alias = "output-dir")]
    out: PathBuf,
    #[arg(long, visible_alias = "num-train-epochs", default_value_t = 1.0)]
    epochs: f64,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Pairs per micro-batch.
    #[arg(long, visible_alias = "per-device-train-batch-size", default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, visible_alias = "gradient-accumulation-steps", default_value_t = 1)]
    grad_accum: usize,
    /// Learning rate of the model's parameters (TRL's default, safe on a pretrained model). Full
    /// fine-tuning of SmolLM2 trains well at 1e-5, LoRA at 1e-4 to 2e-4; the tiny test models want 1e-3.
    #[arg(long, visible_alias = "learning-rate", default_value = "1e-6", allow_negative_numbers = true)]
    lr: f64,
    /// Learning rate of the beta head (it moves no weight of the model; 1e-2 makes beta oscillate).
    #[arg(long, default_value = "3e-3", allow_negative_numbers = true)]
    head_lr: f64,
    /// TRL's beta: a fixed beta, which the artifacts must have been built with (`build-graph
    /// --fixed-beta`); a learned beta's initial value is `build-graph --beta-init`.
    #[arg(long, allow_negative_numbers = true)]
    beta: Option<f64>,
    /// TRL's loss_type, checked against the artifacts (`build-graph --loss`).
    #[arg(long)]
    loss_type: Option<String>,
    /// TRL's label_smoothing, checked against the artifacts (`build-graph --label-smoothing`).
    #[arg(long, allow_negative_numbers = true)]
    label_smoothing: Option<f64>,
    /// Linear warm-up from 0 over this many steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// Warm-up over ceil(ratio x steps) steps, when --warmup-steps is 0 (as TrainingArguments does).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    warmup_ratio: f64,
    /// As transformers' get_scheduler: linear (to 0 after the last step, TRL's default), cosine,
    /// constant (no warm-up) or constant_with_warmup.
    #[arg(long, visible_alias = "lr-scheduler-type", default_value = "linear")]
    lr_schedule: Schedule,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    /// AdamW's beta1.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    adam_beta1: f64,
    /// AdamW's beta2.
    #[arg(long, default_value_t = 0.999, allow_negative_numbers = true)]
    adam_beta2: f64,
    /// AdamW's epsilon.
    #[arg(long, default_value = "1e-8", allow_negative_numbers = true)]
    adam_epsilon: f64,
    /// Global gradient-norm clipping (0 disables it).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    max_grad_norm: f64,
    /// Tokens a row (prompt + answer) keeps; longer rows are cut as --truncation-mode says (TRL's max_length).
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// keep_start: a long row loses the end of its answer, and a pair whose prompt alone fills
    /// --max-length is dropped; keep_end: it loses the start of its prompt (TRL's truncation_mode).
    #[arg(long, default_value = "keep_start")]
    truncation_mode: TruncationMode,
    /// Accepted only to say why it is gone: TRL 1.x has no separate prompt limit.
    #[arg(long, hide = true, allow_negative_numbers = true)]
    max_prompt_length: Option<String>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate every N steps (and always at the end).
    #[arg(long, visible_alias = "eval-steps", default_value_t = 0)]
    eval_every: u64,
    /// Checkpoint every N steps (and always at the end).
    #[arg(long, visible_alias = "save-steps", default_value_t = 0)]
    save_every: u64,
    /// Checkpoints kept (the newest).
    #[arg(long, default_value_t = 2)]
    save_total_limit: usize,
    /// Column whose values split the evaluation metrics (e.g. regime).
    #[arg(long)]
    group_by: Option<String>,
    /// Execution provider: cpu, cuda[:N] or tensorrt[:N]. Under mpirun, cuda or tensorrt without N
    /// gives each rank the GPU of its local rank on its machine.
    #[arg(long, default_value = "cpu", value_parser = parse_ep)]
    ep: (ExecutionProvider, bool),
    /// Intra-op threads (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Continue from the newest complete checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Skip malformed data rows (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Skip optimizer steps with a non-finite loss or gradient (counted) instead of stopping.
    #[arg(long)]
    skip_nonfinite: bool,
    /// Group pairs of similar length within windows of N batches (0: off) to cut padding.
    #[arg(long, default_value_t = 0)]
    bucket_batches: usize,
    /// AdamW implementation: auto (fused host kernel on CPU, the optimizer graph on GPUs), graph, fused.
    #[arg(long, default_value = "auto")]
    optimizer: betadpo::train::config::OptimizerKind,
    /// Write ONNX Runtime profiles (chrome-trace JSON per session) with this path prefix.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Keep subnormal floats (below ~1e-38) instead of treating them as zero. By default they are
    /// flushed (like torch.set_flush_denormal(True)): x86 handles them in slow microcode, and they
    /// appear in every masked attention row (exp of a masked score) and in the gradients of a saturated loss.
    #[arg(long)]
    keep_denormals: bool,
    /// The default; accepted for scripts written when flushing was opt-in.
    #[arg(long = "flush-denormals", hide = true, conflicts_with = "keep_denormals")]
    _flush_denormals: bool,
    /// With packed artifacts: tokens per row (a longer pair gets a row as wide as itself). Longer rows
    /// mean fewer, wider attention products. Default: as wide as the data's longest pair needs, 512 at
    /// least (suits models of SmolLM2's size) and at most the model's positions
    #[arg(long)]
    pack_tokens: Option<usize>,
    /// The most tokens one pass of the train graph computes: a micro-batch whose rows hold more runs
    /// as several passes of whole rows, their gradients summed (the same step up to float rounding;
    /// less memory, and on the CPU faster at long rows). 0: the whole micro-batch in one pass.
    /// Default: 1024 on the CPU (one row of 512-token pairs), 0 with a GPU provider or beta-DPO
    #[arg(long)]
    micro_batch_tokens: Option<usize>,
    /// With fp16 artifacts (`build-graph --precision fp16`): the first loss scale (default 65536, as
    /// PyTorch's GradScaler). A step whose gradients overflow is skipped and halves it; 2000 clean steps
    /// in a row double it.
    #[arg(long, allow_negative_numbers = true)]
    loss_scale_init: Option<f64>,
    /// Under mpirun: what sums the gradients. auto: NCCL on the GPUs' memory with --ep cuda or
    /// tensorrt, MPI through host memory on the CPU; mpi; nccl.
    #[arg(long, default_value = "auto")]
    allreduce: betadpo::train::config::AllreduceKind,
    /// Seconds a rank waits for the others in an NCCL allreduce before it ends the job.
    #[arg(long, default_value_t = 600.0)]
    nccl_timeout: f64,
    /// When standard error is not a terminal (a log file, a job), a progress line every N steps
    /// instead of the bar.
    #[arg(long, default_value_t = 10)]
    logging_steps: u64,
    /// Where metrics go besides RUN/metrics.jsonl: none, or tensorboard (event files in RUN/runs/).
    #[arg(long, default_value = "none")]
    report_to: ReportTo,
    /// A data row (a JSONL line, a JSON array element) longer than this many bytes is refused
    /// before it is parsed (skipped with --skip-bad-rows).
    #[arg(long, default_value_t = betadpo::limits::DEFAULT_MAX_ROW_BYTES)]
    max_row_bytes: usize,
    /// No progress bars, lines or first lines.
    #[arg(long)]
    quiet: bool,
}

/// The tokenizer of the Hugging Face folder the artifacts were built from, for a run given no `--tokenizer`.
fn folder_tokenizer(artifacts: &std::path::Path) -> Result<PathBuf> {
    let m = betadpo::dpo::Manifest::load(artifacts)?;
    let found = betadpo::model_import::hf_folder_of(&m.model.source).map(|d| d.join("tokenizer.json")).filter(|p| p.is_file());
    found.ok_or_else(|| {
        anyhow::anyhow!("--tokenizer is required: the artifacts were built from {}, not from a Hugging Face folder holding tokenizer.json", m.model.source)
    })
}

pub fn config(a: Args) -> Result<TrainConfig> {
    let _ = (a.config, a.beta, a.loss_type, a.label_smoothing); // read by `run` and `expand_config`
    let tokenizer = match a.tokenizer {
        Some(t) => t,
        None => folder_tokenizer(&a.artifacts)?,
    };
    Ok(TrainConfig {
        artifacts: a.artifacts,
        data: a.data,
        eval_data: a.eval_data,
        data_split: a.data_split,
        eval_data_split: a.eval_data_split,
        tokenizer,
        tokenizer_config: a.tokenizer_config,
        out: a.out,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        head_lr: a.head_lr,
        warmup_steps: a.warmup_steps,
        warmup_ratio: a.warmup_ratio,
        lr_schedule: a.lr_schedule,
        weight_decay: a.weight_decay,
        adam_beta1: a.adam_beta1,
        adam_beta2: a.adam_beta2,
        adam_epsilon: a.adam_epsilon,
        max_grad_norm: a.max_grad_norm,
        max_length: Some(a.max_length),
        truncation_mode: a.truncation_mode,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        save_total_limit: a.save_total_limit,
        group_by: a.group_by,
        ep: rank_device(a.ep.0, a.ep.1, betadpo::distributed::local_rank(), visible_gpus()),
        threads: a.threads,
        resume: a.resume,
        skip_bad_rows: a.skip_bad_rows,
        skip_nonfinite: a.skip_nonfinite,
        bucket_batches: a.bucket_batches,
        progress: !a.quiet,
        logging_steps: a.logging_steps,
        report_to: a.report_to,
        optimizer: a.optimizer,
        profile: a.profile,
        flush_denormals: !a.keep_denormals,
        pack_tokens: a.pack_tokens,
        micro_batch_tokens: a.micro_batch_tokens,
        loss_scale_init: a.loss_scale_init,
        allreduce: a.allreduce,
        nccl_timeout_s: a.nccl_timeout,
        max_row_bytes: a.max_row_bytes,
        ..Default::default()
    })
}

/// The command line with `train --config FILE` replaced by the file's flags, placed before the
/// command line's own so that those win (see [`betadpo::train::trl_config`]).
pub fn expand_config(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>> {
    if args.get(1).and_then(|a| a.to_str()) != Some("train") {
        return Ok(args);
    }
    let (mut file, mut rest) = (None, Vec::new());
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => file = Some(PathBuf::from(it.next().ok_or_else(|| anyhow::anyhow!("--config needs a file"))?)),
            Some(s) if s.starts_with("--config=") => file = Some(PathBuf::from(&s["--config=".len()..])),
            _ => rest.push(a.clone()),
        }
    }
    let Some(file) = file else { return Ok(args) };
    let cmd = <Args as clap::Args>::augment_args(clap::Command::new("train"));
    let own: Vec<OwnFlag> = cmd
        .get_arguments()
        .filter_map(|arg| {
            let names = arg.get_long().into_iter().chain(arg.get_all_aliases().unwrap_or_default()).map(str::to_string).collect();
            Some(OwnFlag { names, switch: !arg.get_action().takes_values() }).filter(|_| arg.get_long().is_some())
        })
        .collect();
    let entries = betadpo::train::trl_config::read(&file)?;
    let flags = betadpo::train::trl_config::to_flags(&file, &entries, &own)?;
    Ok(args[..2].iter().cloned().chain(flags.into_iter().map(Into::into)).chain(rest).collect())
}

/// The provider and whether the flag named a device (`cuda:1`) rather than leaving it (`cuda`).
fn parse_ep(s: &str) -> std::result::Result<(ExecutionProvider, bool), String> {
    let ep: ExecutionProvider = s.parse().map_err(|e: betadpo::Error| e.to_string())?;
    Ok((ep, s.contains(':')))
}

/// A GPU provider named without a device, in a rank an MPI launcher started: the rank's local index
/// picks its GPU, as `torchrun` users set `LOCAL_RANK`, modulo the GPUs `CUDA_VISIBLE_DEVICES` leaves
/// it (a launcher wrapper that gives each rank one GPU leaves it device 0); one process keeps device 0.
fn rank_device(ep: ExecutionProvider, explicit: bool, local_rank: Option<usize>, visible: Option<usize>) -> ExecutionProvider {
    let Some(r) = local_rank.filter(|_| !explicit) else { return ep };
    let device = visible.filter(|&n| n > 0).map_or(r, |n| r % n) as i32;
    match ep {
        ExecutionProvider::Cuda { .. } => ExecutionProvider::Cuda { device },
        ExecutionProvider::TensorRt { .. } => ExecutionProvider::TensorRt { device },
        ExecutionProvider::Cpu => ep,
    }
}

/// How many GPUs `CUDA_VISIBLE_DEVICES` lists, when it is set.
fn visible_gpus() -> Option<usize> {
    std::env::var("CUDA_VISIBLE_DEVICES").ok().map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
}

pub fn run(a: Args) -> Result<()> {
    if let Some(v) = &a.max_prompt_length {
        anyhow::bail!(betadpo::Error::BadFlag {
            flag: "--max-prompt-length".into(),
            detail: format!(
                "{v}: no longer a flag; as in TRL 1.x, whole rows are cut to --max-length as --truncation-mode says (keep_end cuts prompts from the left)"
            ),
        });
    }
    let settings = ArtifactSettings { beta: a.beta, loss_type: a.loss_type.clone(), label_smoothing: a.label_smoothing };
    let cfg = config(a)?;
    // Artifacts that do not load are reported by training itself, with its context.
    let mut heap = HeapUse::Speed;
    if let Ok(m) = betadpo::dpo::manifest::Manifest::load(&cfg.artifacts) {
        check_artifacts(&m.objective, &settings)?;
        // artifacts built to hold less at long rows: a heap that leaves fewer holes
        if m.memory.gradient_checkpointing {
            heap = HeapUse::Memory;
        }
    }
    betadpo::runtime::tune_heap(heap);
    let coll = betadpo::distributed::from_environment()?;
    let s = match train_with(&cfg, coll.as_ref()).with_context(|| format!("training into {}", cfg.out.display())) {
        Ok(s) => s,
        Err(e) if coll.size() > 1 => {
            // The other ranks may be waiting in a collective for this one: end them all.
            // One write: mpirun forwards each rank's stderr in the pieces it was written in, so a
            // line written piecewise (as eprintln! does) can come out cut by another rank's output.
            let line = format!("error: rank {} of {}: {e:#}\n", coll.rank(), coll.size());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            coll.abort(1)
        }
        Err(e) => return Err(e),
    };
    if coll.is_root() {
        println!("{}", betadpo::train::report::summary_table(&s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line's defaults are the library's (TrainConfig::default, TRL's where TRL has one).
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        use clap::FromArgMatches;
        let cmd = <Args as clap::Args>::augment_args(clap::Command::new("train"));
        let m = cmd.try_get_matches_from(["train", "--artifacts", "a", "--data", "d", "--tokenizer", "t", "--out", "o"]).unwrap();
        let got = config(Args::from_arg_matches(&m).unwrap()).unwrap();
        let want = TrainConfig::default();
        assert_eq!((got.lr, got.head_lr, got.adam_epsilon), (want.lr, want.head_lr, want.adam_epsilon));
        assert_eq!((got.lr, got.logging_steps, got.warmup_ratio), (1e-6, 10, 0.0));
        assert_eq!(
            (got.adam_beta1, got.adam_beta2, got.max_grad_norm, got.batch_size),
            (want.adam_beta1, want.adam_beta2, want.max_grad_norm, want.batch_size)
        );
    }

    #[test]
    fn ranks_take_their_local_gpu_unless_told() {
        let cuda = |d| ExecutionProvider::Cuda { device: d };
        assert_eq!(rank_device(cuda(0), false, Some(3), None), cuda(3));
        assert_eq!(rank_device(cuda(0), false, Some(3), Some(2)), cuda(1), "3 mod 2 visible");
        assert_eq!(rank_device(cuda(0), false, Some(3), Some(1)), cuda(0), "one visible GPU per rank");
        assert_eq!(rank_device(cuda(0), false, Some(3), Some(0)), cuda(3), "an empty list hides nothing we can count");
        assert_eq!(rank_device(cuda(1), true, Some(3), Some(8)), cuda(1));
        assert_eq!(rank_device(cuda(0), false, None, Some(8)), cuda(0));
        assert_eq!(rank_device(ExecutionProvider::TensorRt { device: 0 }, false, Some(2), None), ExecutionProvider::TensorRt { device: 2 });
        assert_eq!(rank_device(ExecutionProvider::Cpu, false, Some(2), None), ExecutionProvider::Cpu);
        assert_eq!(parse_ep("cuda").unwrap(), (cuda(0), false));
        assert_eq!(parse_ep("cuda:2").unwrap(), (cuda(2), true));
        assert!(parse_ep("gpu").is_err());
    }
}
