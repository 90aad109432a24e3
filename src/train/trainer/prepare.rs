//! The prepare phase: the run directory claimed, the data loaded and tokenized, the sessions
//! created, and, for a resumed run, the checkpoint it continues found and checked against this run.

use std::path::{Path, PathBuf};

use ort::session::Session;
use sha2::{Digest, Sha256};

use super::host::{by_name, take_uploaded, to_feeds};
use crate::distributed::Collective;
use crate::dpo::packing::HeadReads;
use crate::dpo::{Layout, Manifest};
use crate::graph::Precision;
use crate::run_layout::{checkpoints_dir, list_checkpoints, CONFIG_FILE, FINAL_DIR, METRICS_FILE, PARAMS, REFERENCE_DIR};
use crate::runtime::{ExecutionProvider, SessionConfig, SharedWeights};
use crate::store::read_safetensors_inside;
use crate::text::data::{load_preferences, LoadOptions};
use crate::text::data_source::DEFAULT_EVAL_SPLIT;
use crate::text::{PairTokenizer, TokenizedPair, TruncationConfig};
use crate::train::batch::{CollateOptions, DataLoader, LoaderConfig, LoaderPosition, Packing};
use crate::train::batch_beta::MarginStats;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::config::{OptimizerKind, TrainConfig};
use crate::train::device::Device;
use crate::train::loss_scale::LossScale;
use crate::train::optimizer_step::State;
use crate::train::reference::cache_key;
use crate::train::session_io::Feeds;
use crate::{Error, Result};

/// The kind written in a run directory's marker.
const RUN_MARK: &str = "run";

/// The train, eval and optimizer graphs' sessions. The fused host kernel replaces the optimizer
/// graph on the CPU: no session (and no arena) for it then.
pub struct Sessions {
    pub train: Session,
    pub eval: Session,
    pub optimizer: Option<Session>,
}

/// The checkpoint a resumed run continues.
pub struct ResumePoint {
    pub step: u64,
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// Everything the later phases start from.
pub struct Prepared {
    pub manifest: Manifest,
    pub run: PathBuf,
    /// What tokenization kept and dropped, one line per data file.
    pub stats: String,
    /// The training pairs, in the order the steps draw them, at the position the run continues from.
    pub loader: DataLoader,
    pub eval_pairs: Option<Vec<TokenizedPair>>,
    pub collate: CollateOptions,
    /// The reference cache key of the training pairs.
    pub train_key: String,
    /// Fingerprint of everything a resumed run must share with the original.
    pub run_key: String,
    pub resume: Option<ResumePoint>,
    pub session_config: SessionConfig,
    pub sessions: Sessions,
    pub device: Device,
    /// The artifacts' initial parameters: the reference model, and a new run's starting point.
    pub initial: Feeds,
    /// The run directory's lock (rank 0), held as long as this value lives.
    pub lock: Option<crate::dir_lock::DirLock>,
}

impl Prepared {
    /// Optimizer steps the run ends at.
    pub fn total_steps(&self, cfg: &TrainConfig) -> u64 {
        total_steps(cfg, self.loader.batches_per_epoch())
    }
}

fn total_steps(cfg: &TrainConfig, batches_per_epoch: usize) -> u64 {
    cfg.max_steps.unwrap_or_else(|| ((cfg.epochs * batches_per_epoch as f64) / cfg.grad_accum as f64).ceil().max(1.0) as u64)
}

/// With several ranks, rank 0 alone claims and tidies the run directory (the others wait for it)
/// and writes to it later; every rank reads it.
pub fn prepare(cfg: &TrainConfig, coll: &dyn Collective) -> Result<Prepared> {
    let lock = if coll.is_root() {
        claim_run_dir(&cfg.out)?;
        // held until the run ends: a second run into the same directory is refused from here on
        Some(crate::dir_lock::hold(&cfg.out)?)
    } else {
        None
    };
    Ok(Prepared { lock, ..prepare_locked(cfg, coll)? })
}

fn prepare_locked(cfg: &TrainConfig, coll: &dyn Collective) -> Result<Prepared> {
    let run = cfg.out.clone();
    open_run_folder(&run, coll)?;
    crate::runtime::init(&cfg.ep)?;
    let manifest = Manifest::load(&cfg.artifacts)?;
    check_precision(&manifest, cfg)?;
    let manifest_text = crate::fs_guard::read_to_string_inside(&cfg.artifacts, &cfg.artifacts.join(crate::run_layout::MANIFEST_FILE))?;
    if coll.size() > 1 && manifest.objective.beta_dpo.is_some() {
        return Err(Error::Distributed(
            "beta-DPO's batch statistics (margin mean and spread, the filter) are of the whole batch, which no rank sees; train beta-DPO artifacts in one process".into(),
        ));
    }
    if manifest.objective.beta_dpo.is_some() && cfg.micro_batch_tokens.is_some_and(|n| n > 0) {
        return Err(Error::BadFlag {
            flag: "--micro-batch-tokens".into(),
            detail:
                "cuts a micro-batch into passes, but beta-DPO's filter reads the margins of the whole micro-batch; leave it out (or 0) with beta-DPO artifacts"
                    .into(),
        });
    }
    let previous = existing_checkpoints(cfg, &run)?;

    let mut stats = String::new();
    let tok = PairTokenizer::from_files(&cfg.tokenizer, cfg.tokenizer_config.as_deref())?;
    let trunc = TruncationConfig { max_length: cfg.max_length, mode: cfg.truncation_mode };
    let load = |split: Option<String>| LoadOptions { skip_bad_rows: cfg.skip_bad_rows, split, max_row_bytes: cfg.max_row_bytes };
    let train_pairs = load_pairs(&cfg.data, &load(cfg.data_split.clone()), &tok, &trunc, &mut stats)?;
    let eval_pairs = match &cfg.eval_data {
        // A folder's evaluation rows are its test split unless another is named.
        Some(p) => {
            let split = cfg.eval_data_split.clone().or_else(|| p.is_dir().then(|| DEFAULT_EVAL_SPLIT.into()));
            Some(load_pairs(p, &load(split), &tok, &trunc, &mut stats)?)
        }
        None => None,
    };
    if cfg.progress && coll.is_root() {
        eprint!("{stats}");
    }
    check_model_limits(cfg, &manifest, &tok, train_pairs.iter().chain(eval_pairs.iter().flatten()))?;
    if let Some(column) = &cfg.group_by {
        check_group_column(column, &cfg.data, &train_pairs)?;
    }
    check_packed_length(&manifest, train_pairs.iter().chain(eval_pairs.iter().flatten()))?;
    let pack_tokens = pack_tokens(cfg, &manifest, train_pairs.iter().chain(eval_pairs.iter().flatten()))?;
    if let (Some(n), None, true, true) = (pack_tokens, cfg.pack_tokens, cfg.progress, coll.is_root()) {
        eprintln!("packing: rows of {n} tokens (the longest pair's, 512 at least; --pack-tokens sets it)");
    }
    // Refuse a mismatched resume before any expensive work (reference log-probs).
    let train_key = cache_key(&train_pairs, &cfg.artifacts, &manifest)?;
    let run_key = run_key(cfg, &manifest_text, &train_key, pack_tokens);
    let resume = resume_point(cfg, &run, previous.last(), &run_key)?;
    agree_on_start(coll, &format!("{run_key} allreduce {:?}", cfg.allreduce), resume.as_ref().map(|r| r.step))?;

    let session_config = session_config(cfg);
    let sessions = sessions(cfg, &manifest, &session_config, pack_tokens)?;
    let device = Device::for_ep(&cfg.ep);
    let params_path = cfg.artifacts.join(&manifest.parameters_file);
    let (params, _) = read_safetensors_inside(&cfg.artifacts, &params_path)?;
    // before anything is sized by the manifest's shapes (the Adam moments are)
    manifest.check_parameter_values(&params, &params_path)?;
    let initial = to_feeds(params, &manifest, &device)?;

    if coll.is_root() {
        std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
        crate::output_dir::mark(&run, RUN_MARK)?;
    }
    let packing = pack_tokens.map(|row_tokens| Packing { row_tokens, head: HeadReads::of(&manifest.objective) });
    let part_tokens = micro_batch_tokens(cfg, &manifest);
    let collate = CollateOptions { pad_id: tok.pad_id(), group_by: cfg.group_by.clone(), pad_to_multiple_of: None, packing, part_tokens };
    let mut loader = DataLoader::new(
        train_pairs,
        LoaderConfig { batch_size: cfg.batch_size, seed: cfg.seed, shuffle: true, bucket_batches: cfg.bucket_batches, drop_last: false },
        collate.clone(),
    )?;
    if let Some(r) = &resume {
        let total = total_steps(cfg, loader.batches_per_epoch());
        let batches_per_step = cfg.grad_accum as u64 * coll.size() as u64;
        checkpoint::check_reachable(&r.dir, &r.state, total, loader.batches_per_epoch(), batches_per_step)?;
    }
    loader.seek(resume.as_ref().map(|r| r.state.position).unwrap_or_default());
    Ok(Prepared { manifest, run, stats, loader, eval_pairs, collate, train_key, run_key, resume, session_config, sessions, device, initial, lock: None })
}

/// The run folder before anything is written: its own files are regular files in it (a FIFO
/// `metrics.jsonl` would block the append that opens it), and a killed run's leftovers are removed.
fn open_run_folder(run: &Path, coll: &dyn Collective) -> Result<()> {
    if coll.is_root() {
        for name in [CONFIG_FILE, METRICS_FILE, crate::output_dir::MARKER] {
            let path = run.join(name);
            if std::fs::symlink_metadata(&path).is_ok() {
                crate::fs_guard::open_inside(run, &path)?;
            }
        }
        checkpoint::clean_partial(run);
        for dir in [run.to_path_buf(), run.join(FINAL_DIR), run.join(REFERENCE_DIR)] {
            crate::temp_files::remove_stale(&dir, None);
        }
    }
    coll.barrier()
}

/// The run's checkpoints: `--resume` needs one, and a run that has some continues only with `--resume`.
fn existing_checkpoints(cfg: &TrainConfig, run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let previous = list_checkpoints(run);
    if cfg.resume && previous.is_empty() {
        return Err(Error::BadFlag {
            flag: "--resume".into(),
            detail: format!(
                "{} holds no checkpoint to resume (expected {}/step-N); run without --resume to start it",
                run.display(),
                checkpoints_dir(run).display()
            ),
        });
    }
    if !cfg.resume && !previous.is_empty() {
        return Err(Error::RunHasCheckpoints { path: run.to_path_buf() });
    }
    Ok(previous)
}

/// Packed artifacts were verified up to a sequence length; longer pairs are refused.
/// Tokens per packed row (`None` for padded artifacts): `--pack-tokens`, or chosen from the data.
fn pack_tokens<'a>(cfg: &TrainConfig, manifest: &Manifest, pairs: impl Iterator<Item = &'a TokenizedPair>) -> Result<Option<usize>> {
    if manifest.layout != Layout::Packed {
        return Ok(None);
    }
    match cfg.pack_tokens {
        Some(n) => Ok(Some(n)),
        None => {
            let pairs: Vec<&TokenizedPair> = pairs.collect();
            let head = HeadReads::of(&manifest.objective);
            crate::train::batch::pack_tokens_from_data(&pairs, head, manifest.model.max_positions).map(Some)
        }
    }
}

fn check_packed_length<'a>(manifest: &Manifest, pairs: impl Iterator<Item = &'a TokenizedPair>) -> Result<()> {
    let Some(limit) = manifest.max_sequence_tokens else { return Ok(()) };
    let longest = pairs.map(TokenizedPair::max_len).max().unwrap_or(0);
    if longest > limit {
        return Err(Error::BadFlag {
            flag: "--max-length".into(),
            detail: format!(
                "a sequence has {longest} tokens; these packed artifacts were verified for up to {limit} (lower --max-length, or build with --layout padded)"
            ),
        });
    }
    Ok(())
}

/// The checkpoint `--resume` continues from, refused (before any expensive work) when it was
/// trained with other artifacts, data or optimizer flags.
fn resume_point(cfg: &TrainConfig, run: &Path, newest: Option<&(u64, PathBuf)>, run_key: &str) -> Result<Option<ResumePoint>> {
    let (true, Some((step, dir))) = (cfg.resume, newest) else { return Ok(None) };
    let state = checkpoint::read_state(dir)?;
    if state.run_key != run_key {
        return Err(Error::ResumeMismatch { path: run.to_path_buf() });
    }
    Ok(Some(ResumePoint { step: *step, dir: dir.clone(), state }))
}

/// The parameters, Adam moments and loop state the first step starts from: the checkpoint's for a
/// resumed run, else the initial parameters (taken out of `p`) with zero moments.
pub fn start_state(p: &mut Prepared, cfg: &TrainConfig) -> Result<(TrainerState, State)> {
    let device = p.device;
    if let Some(r) = &p.resume {
        let l = checkpoint::load(&r.dir)?;
        p.manifest.check_parameter_values(&l.params, &r.dir.join(PARAMS))?;
        let params = to_feeds(l.params, &p.manifest, &device)?;
        let mut moments = by_name(l.moments);
        let mut take = |suffix: &str| {
            let names: Vec<String> = params.names.iter().map(|n| format!("{n}{suffix}")).collect();
            take_uploaded(&mut moments, &names, &device, |n| format!("checkpoint lacks {n}"))
        };
        let (m, v) = (take(".adam_m")?, take(".adam_v")?);
        return Ok((l.state, State { params, m, v }));
    }
    let zeros = |s: &Vec<i64>| {
        // Written now, not `vec![0.0; n]`: calloc's lazily mapped zero pages would be faulted
        // in during the first optimizer step instead (SmolLM2-135M: ~3.5 s).
        let n = s.iter().product::<i64>() as usize;
        let mut z = Vec::with_capacity(n);
        z.extend(std::iter::repeat_n(0.0f32, n));
        device.upload(&s.iter().map(|&d| d as usize).collect::<Vec<_>>(), z)
    };
    let shapes: Vec<Vec<i64>> = p.manifest.trainable().map(|t| t.shape.clone()).collect();
    let m = shapes.iter().map(zeros).collect::<Result<Vec<_>>>()?;
    let v = shapes.iter().map(zeros).collect::<Result<Vec<_>>>()?;
    let params = std::mem::take(&mut p.initial);
    let ts = TrainerState {
        step: 0,
        position: LoaderPosition::default(),
        tokens: 0,
        skipped_nonfinite: 0,
        updates: 0,
        run_key: p.run_key.clone(),
        margin_stats: MarginStats::default(),
        // as the graph reads it (float32), so resumed and straight runs agree bit for bit
        epsilon_beta: p.manifest.objective.epsilon_dpo.map(|e| e.beta0 as f32 as f64),
        loss_scale: p.manifest.precision.needs_loss_scale().then(|| LossScale::starting_at(cfg.loss_scale_init)),
    };
    Ok((ts, State { params, m, v }))
}

/// Refuses half-precision products on ONNX Runtime's CPU provider (1.32), before any work: it has no
/// bfloat16 MatMul (session creation would fail deep inside), and it silently runs float16 ones in float32.
fn check_precision(manifest: &Manifest, cfg: &TrainConfig) -> Result<()> {
    if cfg.loss_scale_init.is_some() && !manifest.precision.needs_loss_scale() {
        return Err(Error::BadFlag { flag: "--loss-scale-init".into(), detail: "needs artifacts built with --precision fp16".into() });
    }
    let why = match manifest.precision {
        Precision::Bf16 => "which ONNX Runtime's CPU provider cannot run",
        Precision::Fp16 => "which ONNX Runtime's CPU provider would compute in float32",
        Precision::Fp32 => return Ok(()),
    };
    if manifest.precision_emulated || cfg.ep != ExecutionProvider::Cpu {
        return Ok(());
    }
    Err(Error::BadFlag {
        flag: "--ep".into(),
        detail: format!(
            "{} computes its matrix products in {}, {why}; train it with --ep cuda, or build with --precision fp32 (or --emulate-half, for checks)",
            cfg.artifacts.display(),
            manifest.precision.name()
        ),
    })
}

fn load_pairs(path: &Path, opts: &LoadOptions, tok: &PairTokenizer, trunc: &TruncationConfig, log: &mut String) -> Result<Vec<TokenizedPair>> {
    let data = load_preferences(path, opts)?;
    let (pairs, stats) = tok.tokenize_all(&data.rows, trunc)?;
    log.push_str(&format!(
        "{}: {} pairs kept of {} ({} prompts truncated, {} answers truncated, {} dropped, {} malformed rows skipped)\n",
        path.display(),
        stats.kept,
        stats.pairs,
        stats.truncated_prompts,
        stats.truncated_answers,
        stats.dropped + stats.dropped_empty_prompt,
        data.skipped
    ));
    if let Some(left_out) = &stats.prompt_not_prefix_example {
        // TRL's warning: shown whatever the progress setting, the trained context is not the inference one.
        eprintln!(
            "warning: {}: in {} pairs the tokenized prompt is not a prefix of the tokenized prompt + answer (the chat template renders \
             the prompt alone differently, or tokens merge across the boundary); as in TRL, the answer starts where they diverge and \
             the end of the prompt is left out of the training sequence, e.g. {left_out:?}. To avoid it, use a chat template that \
             renders the prompt the same way in both cases, or end prompts on a token boundary.",
            path.display(),
            stats.prompt_not_prefix
        );
    }
    if pairs.is_empty() {
        let why = match data.skipped_examples.first() {
            Some(first) if data.rows.is_empty() => format!("all {} rows are malformed, e.g. {first}", data.skipped),
            _ => stats.why_none(trunc),
        };
        return Err(Error::Data(format!("{}: no usable pairs: {why}", path.display())));
    }
    Ok(pairs)
}

/// Refuses pairs the model cannot take (longer than its positions, token ids beyond its
/// vocabulary) and, on the CPU, micro-batches whose logits alone exceed the machine's memory,
/// before ONNX Runtime sees any of them.
fn check_model_limits<'a>(cfg: &TrainConfig, manifest: &Manifest, tok: &PairTokenizer, pairs: impl Iterator<Item = &'a TokenizedPair> + Clone) -> Result<()> {
    let limits = crate::train::model_limits::ModelLimits::of(manifest);
    let longest = pairs.clone().map(TokenizedPair::max_len).max().unwrap_or(0);
    limits.check_length(longest, "lower --max-length")?;
    let max_id = pairs.clone().flat_map(|p| [&p.prompt, &p.chosen, &p.rejected]).filter_map(|ids| ids.iter().max()).max().copied();
    limits.check_ids(max_id.max(Some(tok.pad_id())), &cfg.tokenizer)?;
    if cfg.ep == ExecutionProvider::Cpu {
        // the pairs of one pass of the train graph: a pair is two rows of up to `longest` tokens
        let at_once = match micro_batch_tokens(cfg, manifest) {
            0 => cfg.batch_size,
            n => (n / (2 * longest).max(1)).clamp(1, cfg.batch_size),
        };
        let rows = 2 * at_once.min(pairs.count());
        // the logits and their gradient, the least a step holds
        limits.check_logits_memory("--batch-size", rows, longest, 2, "lower --batch-size, --micro-batch-tokens or --max-length")?;
    }
    Ok(())
}

/// Refuses a `--group-by` column that no training row has (a typo would report no groups at all).
fn check_group_column(column: &str, data: &Path, pairs: &[TokenizedPair]) -> Result<()> {
    if pairs.iter().any(|p| p.extras.contains_key(column)) {
        return Ok(());
    }
    let mut columns: Vec<&str> = pairs.iter().flat_map(|p| p.extras.keys().map(String::as_str)).collect();
    columns.sort_unstable();
    columns.dedup();
    let have = if columns.is_empty() { "none besides prompt, chosen and rejected".to_string() } else { columns.join(", ") };
    Err(Error::BadFlag { flag: "--group-by".into(), detail: format!("no row of {} has a column {column:?} (its other columns: {have})", data.display()) })
}

/// `--micro-batch-tokens`, resolved (see [`TrainConfig::micro_batch_tokens`]).
fn micro_batch_tokens(cfg: &TrainConfig, manifest: &Manifest) -> usize {
    match cfg.micro_batch_tokens {
        Some(n) => n,
        None if manifest.objective.beta_dpo.is_some() || cfg.ep != crate::runtime::ExecutionProvider::Cpu => 0,
        None => crate::train::config::DEFAULT_MICRO_BATCH_TOKENS,
    }
}

/// Whether the AdamW step runs as the fused host kernel rather than the optimizer graph.
pub fn uses_fused(cfg: &TrainConfig) -> bool {
    match cfg.optimizer {
        OptimizerKind::Fused => true,
        OptimizerKind::Graph => false,
        OptimizerKind::Auto => cfg.ep == crate::runtime::ExecutionProvider::Cpu,
    }
}

/// Everything a resumed run must share with the original, hashed.
fn run_key(cfg: &TrainConfig, manifest_text: &str, train_key: &str, pack_tokens: Option<usize>) -> String {
    let mut h = Sha256::new();
    h.update(manifest_text.as_bytes());
    h.update(train_key.as_bytes());
    let mut essentials = serde_json::json!({
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr, "head_lr": cfg.head_lr,
        "warmup": cfg.warmup_steps, "schedule": cfg.lr_schedule, "wd": cfg.weight_decay, "clip": cfg.max_grad_norm,
        "betas": [cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon], "seed": cfg.seed, "bucket": cfg.bucket_batches,
        "fused": uses_fused(cfg),
    });
    if cfg.flush_denormals {
        // only when set, so runs from before the flag existed keep their key
        essentials["ftz"] = serde_json::json!(true);
    }
    if cfg.warmup_ratio > 0.0 {
        // only when set, so runs from before the flag existed keep their key
        essentials["warmup_ratio"] = serde_json::json!(cfg.warmup_ratio);
    }
    if let Some(n) = pack_tokens {
        essentials["pack_tokens"] = serde_json::json!(n);
    }
    h.update(essentials.to_string().as_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

fn session_config(cfg: &TrainConfig) -> SessionConfig {
    SessionConfig {
        ep: cfg.ep,
        intra_threads: cfg.threads,
        profile_prefix: cfg.profile.clone(),
        flush_denormals: cfg.flush_denormals,
        // ONNX Runtime's arena rounds blocks up and never shrinks (SmolLM2-135M, 8 pairs: peak RSS
        // 5.3 GB with it, 3.1 GB without). Its memory pattern puts all intermediates in one block
        // allocated per run, which glibc maps fresh every step; tensor by tensor, they come from a
        // heap that keeps freed pages (`runtime::tune_heap`): 2.0 -> 1.7 s a step.
        cpu_arena: false,
        memory_pattern: cfg.ep != crate::runtime::ExecutionProvider::Cpu,
        // Spinning pool threads would hold a core the fused optimizer needs right after each run
        // (SmolLM2: optimizer 0.14 s with them spinning, 0.11 s without).
        stop_spinning_after_run: uses_fused(cfg),
        ..Default::default()
    }
}

fn sessions(cfg: &TrainConfig, manifest: &Manifest, scfg: &SessionConfig, pack_tokens: Option<usize>) -> Result<Sessions> {
    let graph_path = |which: &str| -> Result<PathBuf> { Ok(cfg.artifacts.join(&manifest.graph(which)?.file)) };
    let (train_path, eval_path) = (graph_path("train")?, graph_path("eval")?);
    let shared = SharedWeights::load(&scfg.ep, &[&train_path, &eval_path])?;
    let train = tensorrt_config(scfg, cfg, manifest, "train", pack_tokens)?.session_sharing(&train_path, &shared)?;
    let eval = tensorrt_config(scfg, cfg, manifest, "eval", pack_tokens)?.session_sharing(&eval_path, &shared)?;
    if matches!(cfg.ep, crate::runtime::ExecutionProvider::TensorRt { .. }) {
        // Once per run, for the train graph: which operators TensorRT left to CUDA (or the CPU).
        let placement = crate::runtime::placement::node_placement(&train)?;
        if let Some(line) = crate::runtime::placement::fallback_summary(&placement, "TensorrtExecutionProvider") {
            eprintln!("train graph: {line}");
        }
    }
    let optimizer = if uses_fused(cfg) { None } else { Some(scfg.session_from_file(&graph_path("optimizer")?)?) };
    Ok(Sessions { train, eval, optimizer })
}

/// On TensorRT: engine and timing caches in the run directory, and an optimisation profile for the graph's
/// batch-dependent inputs (without `max_length` the longest sequence is unknown, and TensorRT builds for the
/// shapes it meets). Other providers get `scfg` unchanged.
fn tensorrt_config(scfg: &SessionConfig, cfg: &TrainConfig, manifest: &Manifest, which: &str, pack_tokens: Option<usize>) -> Result<SessionConfig> {
    use crate::runtime::tensorrt::{batch_dim_ranges, profile, BatchShape, InputDim};
    let mut out = scfg.clone();
    if !matches!(cfg.ep, crate::runtime::ExecutionProvider::TensorRt { .. }) {
        return Ok(out);
    }
    out.tensorrt.cache_dir = Some(cfg.out.join("tensorrt"));
    out.record_placement = true;
    if let Some(max_length) = cfg.max_length {
        let ranges = batch_dim_ranges(&BatchShape { pairs: cfg.batch_size, max_length, pack_tokens });
        let inputs: Vec<(String, Vec<InputDim>)> = manifest
            .graph(which)?
            .inputs
            .iter()
            .map(|i| {
                let dims = i.shape.iter().map(|d| d.as_i64().map(InputDim::Fixed).unwrap_or_else(|| InputDim::Named(d.as_str().unwrap_or("?").to_string())));
                (i.name.clone(), dims.collect())
            })
            .collect();
        out.tensorrt.profile = Some(profile(&inputs, &ranges)?);
    }
    Ok(out)
}

/// Refuses a `--out` that is neither absent, empty, nor a betadpo run (its marker, or the
/// `train_config.json` of runs from before the marker).
fn claim_run_dir(run: &Path) -> Result<()> {
    let kind = crate::output_dir::Kind { flag: "--out", what: "a betadpo run (train_config.json)", replaced: false };
    crate::output_dir::claim(run, &kind, |d| {
        crate::output_dir::marked(d, RUN_MARK)
            || crate::fs_guard::read_to_string_inside(d, &d.join(CONFIG_FILE)).ok().is_some_and(|t| serde_json::from_str::<TrainConfig>(&t).is_ok())
    })
}

/// Refuses to start ranks that would train different runs: other data or flags (the run key), or
/// another checkpoint to resume from (`--out` must be one directory all ranks see).
fn agree_on_start(coll: &dyn Collective, run_key: &str, resume_step: Option<u64>) -> Result<()> {
    if coll.size() == 1 {
        return Ok(());
    }
    let describe = |step: Option<u64>| step.map_or("starts afresh".to_string(), |s| format!("resumes from step {s}"));
    let mine = format!("{run_key} {}", describe(resume_step));
    let all = coll.gather(mine.as_bytes())?;
    for (rank, theirs) in all.iter().enumerate() {
        if theirs[..] != all[0][..] {
            return Err(Error::Distributed(format!(
                "rank {rank} and rank 0 would train different runs (rank 0: {}; rank {rank}: {}): every rank needs the same flags and data, and --out must be one directory all ranks see (a shared filesystem)",
                String::from_utf8_lossy(&all[0]),
                String::from_utf8_lossy(theirs)
            )));
        }
    }
    Ok(())
}
