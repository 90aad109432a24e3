//! The training loop: reference log-probs → [micro-batches → gradients] → optimizer step →
//! metrics, evaluation and checkpoints, resumable at every checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::batch::{collate, CollateOptions, DataLoader, LoaderConfig, LoaderPosition, Packing};
use super::batch_beta::MarginStats;
use super::checkpoint::{self, TrainerState};
use super::config::{OptimizerKind, TrainConfig};
use super::data::{load_preferences, LoadOptions};
use super::device::Device;
use super::epsilon_beta::{self, StepTally};
use super::fused_adamw::{self, ParamKind};
use super::metrics::{num, summarise, summarise_groups, MetricsLog, PairValues};
use super::optimizer_step::{apply, Accumulator, Hyper, State};
use super::reference::{batch_refs, cache_key, reference_logps, RefTable};
use super::schedule::factor;
use super::session_io::{run_graph, BatchBetaInputs, Feeds, GraphBatch};
use super::tokenize::{PairTokenizer, TokenizedPair, TruncationConfig};
use crate::dpo::packing::HeadReads;
use crate::dpo::{Layout, Manifest};
use crate::runtime::SessionConfig;
use crate::store::{read_safetensors, write_safetensors_raw, NamedTensor, RawTensor};
use crate::{Error, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CONFIG_FILE: &str = "train_config.json";
pub const FINAL_DIR: &str = "final";

/// What a finished run reports.
pub struct TrainSummary {
    pub run: PathBuf,
    pub steps: u64,
    pub initial_eval: Option<Map<String, Value>>,
    pub final_eval: Option<Map<String, Value>>,
    pub last_train: Option<Map<String, Value>>,
    pub resumed_from: Option<u64>,
    pub stats: String,
    pub report: PathBuf,
}

fn load_pairs(path: &Path, tok: &PairTokenizer, trunc: &TruncationConfig, skip_bad: bool, log: &mut String) -> Result<Vec<TokenizedPair>> {
    let data = load_preferences(path, &LoadOptions { skip_bad_rows: skip_bad })?;
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
        return Err(Error::Data(format!("{}: no usable pairs", path.display())));
    }
    Ok(pairs)
}

/// Moves the host tensors named `wanted` out of `by_name` into runtime values, in that order (no
/// copy on the CPU); `missing` words the error for a name that is not there.
fn take_uploaded(
    by_name: &mut HashMap<String, NamedTensor>,
    wanted: &[String],
    device: &Device,
    missing: impl Fn(&str) -> String,
) -> Result<Vec<ort::value::Tensor<f32>>> {
    wanted
        .iter()
        .map(|n| {
            let t = by_name.remove(n).ok_or_else(|| Error::Other(missing(n)))?;
            device.upload(&t.shape, t.data)
        })
        .collect()
}

fn by_name(tensors: Vec<NamedTensor>) -> HashMap<String, NamedTensor> {
    tensors.into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// The trainable parameters among `tensors`, in the manifest's order, as runtime values.
fn to_feeds(tensors: Vec<NamedTensor>, m: &Manifest, device: &Device) -> Result<Feeds> {
    let names: Vec<String> = m.trainable().map(|p| p.name.clone()).collect();
    let values = take_uploaded(&mut by_name(tensors), &names, device, |n| format!("parameter {n} is missing"))?;
    Ok(Feeds { names, values })
}

/// Host-side views of training state for writing files: the tensors' own memory on the CPU
/// (a checkpoint of a large model costs no extra memory), downloaded copies on a GPU.
struct HostViews<'a> {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    data: Vec<std::borrow::Cow<'a, [f32]>>,
}

impl<'a> HostViews<'a> {
    fn of(names: &[String], values: &'a [ort::value::Tensor<f32>], suffix: &str, device: &Device) -> Result<Self> {
        let mut views = HostViews { names: Vec::new(), shapes: Vec::new(), data: Vec::new() };
        for (n, v) in names.iter().zip(values) {
            let (shape, data) = if device.is_gpu() {
                let (shape, data) = device.download(v)?;
                (shape, std::borrow::Cow::Owned(data))
            } else {
                let (shape, data) = v.try_extract_tensor::<f32>()?;
                (shape.iter().map(|&d| d as usize).collect(), std::borrow::Cow::Borrowed(data))
            };
            views.names.push(format!("{n}{suffix}"));
            views.shapes.push(shape);
            views.data.push(data);
        }
        Ok(views)
    }

    fn raw(&self) -> Vec<RawTensor<'_>> {
        self.names.iter().zip(&self.shapes).zip(&self.data).map(|((n, s), d)| RawTensor::of_f32(n, s.clone(), d)).collect()
    }
}

/// Whether the AdamW step runs as the fused host kernel rather than the optimizer graph.
fn uses_fused(cfg: &TrainConfig) -> bool {
    match cfg.optimizer {
        OptimizerKind::Fused => true,
        OptimizerKind::Graph => false,
        OptimizerKind::Auto => cfg.ep == crate::runtime::ExecutionProvider::Cpu,
    }
}

/// Everything a resumed run must share with the original, hashed.
fn run_key(cfg: &TrainConfig, manifest: &Manifest, manifest_text: &str, train_key: &str) -> String {
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
    if manifest.layout == Layout::Packed {
        essentials["pack_tokens"] = serde_json::json!(cfg.pack_tokens);
    }
    h.update(essentials.to_string().as_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

struct Evaluator<'a> {
    pairs: &'a [TokenizedPair],
    refs: RefTable,
    collate: CollateOptions,
    batch_size: usize,
}

impl Evaluator<'_> {
    /// `tstate`: beta-DPO's running margin statistics and epsilon-DPO's beta, read and left unchanged.
    fn run(
        &self,
        session: &mut ort::session::Session,
        m: &Manifest,
        params: &Feeds,
        tstate: &TrainerState,
        prefix: &str,
        device: &Device,
    ) -> Result<Map<String, Value>> {
        let spec = m.graph("eval")?;
        let mut all = PairValues::default();
        let mut loss_sum = 0.0f64;
        for chunk in self.pairs.chunks(self.batch_size) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            let batch = collate(&refs, &self.collate)?;
            let r = batch_refs(&self.refs, &batch.source_indices)?;
            let stats = tstate.margin_stats;
            let epsilon_beta = tstate.epsilon_beta.unwrap_or_default() as f32;
            let extra = BatchBetaInputs { margin_stats: [stats.mean as f32, stats.std as f32], selection_noise: Vec::new(), epsilon_beta };
            let (out, _) = run_graph(session, spec, &GraphBatch { batch: &batch, refs: &r, batch_beta: &extra }, params, &[], device)?;
            loss_sum += out.loss as f64 * chunk.len() as f64;
            all.extend(PairValues::from_outputs(&out.chosen_rewards, &out.rejected_rewards, &out.policy_logps, &r, &out.beta, batch.groups.clone()));
        }
        let mut rec = Map::new();
        rec.insert(format!("{prefix}loss"), num(loss_sum / self.pairs.len() as f64));
        summarise(&all, prefix, &mut rec);
        summarise_groups(&all, prefix, &mut rec);
        Ok(rec)
    }
}

fn progress_bar(total: u64, pos: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix("train");
    pb.set_position(pos);
    pb
}

/// The kind written in a run directory's marker.
const RUN_MARK: &str = "run";

/// Refuses a `--out` that is neither absent, empty, nor a betadpo run (its marker, or the
/// `train_config.json` of runs from before the marker).
fn claim_run_dir(run: &Path) -> Result<()> {
    let kind = crate::output_dir::Kind { flag: "--out", what: "a betadpo run (train_config.json)", replaced: false };
    crate::output_dir::claim(run, &kind, |d| {
        crate::output_dir::marked(d, RUN_MARK)
            || std::fs::read_to_string(d.join(CONFIG_FILE)).ok().is_some_and(|t| serde_json::from_str::<TrainConfig>(&t).is_ok())
    })
}

/// Trains as `betadpo train` does. A process that trains on the CPU should call
/// [`crate::runtime::keep_freed_memory_for_reuse`] first, as the command line does: without it every
/// step faults its activations in afresh (SmolLM2-135M: 2.0 instead of 1.7 s a step).
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    cfg.validate()?;
    claim_run_dir(&cfg.out)?;
    // ONNX Runtime's pool threads get the flag from the session; the caller's thread runs work too.
    let _ftz = cfg.flush_denormals.then(super::denormals::FlushGuard::new);
    crate::runtime::init(&cfg.ep)?;
    let manifest = Manifest::load(&cfg.artifacts)?;
    let manifest_text = std::fs::read_to_string(cfg.artifacts.join(crate::dpo::manifest::MANIFEST_FILE)).map_err(|e| Error::io(&cfg.artifacts, e))?;
    let run = cfg.out.clone();
    checkpoint::clean_partial(&run);
    for dir in [run.clone(), run.join(FINAL_DIR), run.join("reference")] {
        crate::temp_files::remove_stale(&dir, None);
    }
    let previous = checkpoint::list(&run);
    if !cfg.resume && !previous.is_empty() {
        return Err(Error::Other(format!("{} already holds checkpoints; pass --resume to continue it, or choose a new --out", run.display())));
    }

    let mut stats = String::new();
    let tok = PairTokenizer::from_files(&cfg.tokenizer, cfg.tokenizer_config.as_deref())?;
    let trunc = TruncationConfig { max_length: cfg.max_length, mode: cfg.truncation_mode };
    let train_pairs = load_pairs(&cfg.data, &tok, &trunc, cfg.skip_bad_rows, &mut stats)?;
    let eval_pairs = match &cfg.eval_data {
        Some(p) => Some(load_pairs(p, &tok, &trunc, cfg.skip_bad_rows, &mut stats)?),
        None => None,
    };
    if cfg.progress {
        eprint!("{stats}");
    }
    if let Some(limit) = manifest.max_sequence_tokens {
        let longest = train_pairs.iter().chain(eval_pairs.iter().flatten()).map(TokenizedPair::max_len).max().unwrap_or(0);
        if longest > limit {
            return Err(Error::BadFlag {
                flag: "--max-length".into(),
                detail: format!("a sequence has {longest} tokens; these packed artifacts were verified for up to {limit} (lower --max-length, or build with --layout padded)"),
            });
        }
    }
    // Refuse a mismatched resume before any expensive work (reference log-probs).
    let train_key = cache_key(&train_pairs, &cfg.artifacts, &manifest)?;
    let key = run_key(cfg, &manifest, &manifest_text, &train_key);
    if let (true, Some((_, dir))) = (cfg.resume, previous.last()) {
        if checkpoint::read_state(dir)?.run_key != key {
            return Err(Error::Other(format!(
                "{} was trained with other artifacts, data or optimizer flags; resume needs the same ones (or choose a new --out; \
                 runs started before subnormals were flushed by default resume with --keep-denormals)",
                run.display()
            )));
        }
    }

    let scfg = SessionConfig {
        ep: cfg.ep,
        intra_threads: cfg.threads,
        profile_prefix: cfg.profile.clone(),
        flush_denormals: cfg.flush_denormals,
        // ONNX Runtime's arena rounds blocks up and never shrinks (SmolLM2-135M, 8 pairs: peak RSS
        // 5.3 GB with it, 3.1 GB without). Its memory pattern puts all intermediates in one block
        // allocated per run, which glibc maps fresh every step; tensor by tensor, they come from a
        // heap that keeps freed pages (`runtime::keep_freed_memory_for_reuse`): 2.0 -> 1.7 s a step.
        cpu_arena: false,
        memory_pattern: cfg.ep != crate::runtime::ExecutionProvider::Cpu,
        // Spinning pool threads would hold a core the fused optimizer needs right after each run
        // (SmolLM2: optimizer 0.14 s with them spinning, 0.11 s without).
        stop_spinning_after_run: uses_fused(cfg),
        ..Default::default()
    };
    let graph_path = |which: &str| -> Result<PathBuf> { Ok(cfg.artifacts.join(&manifest.graph(which)?.file)) };
    let mut train_s = scfg.session_from_file(&graph_path("train")?)?;
    let mut eval_s = scfg.session_from_file(&graph_path("eval")?)?;
    // The fused host kernel replaces the optimizer graph on the CPU: no session (and no arena) for it.
    let mut opt_s = if uses_fused(cfg) { None } else { Some(scfg.session_from_file(&graph_path("optimizer")?)?) };
    let device = Device::for_ep(&cfg.ep);
    let initial_feeds = to_feeds(read_safetensors(&cfg.artifacts.join(&manifest.parameters_file))?.0, &manifest, &device)?;

    std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
    crate::output_dir::mark(&run, RUN_MARK)?;
    let packing = (manifest.layout == Layout::Packed).then_some(Packing { row_tokens: cfg.pack_tokens, head: HeadReads::of(&manifest.objective) });
    let collate_opts = CollateOptions { pad_id: tok.pad_id(), group_by: cfg.group_by.clone(), pad_to_multiple_of: None, packing };
    let ref_bar = progress_bar((train_pairs.len() + eval_pairs.as_ref().map(Vec::len).unwrap_or(0)) as u64, 0, cfg.progress);
    ref_bar.set_prefix("reference log-probs");
    let train_refs =
        reference_logps(&run, "train", &train_key, &train_pairs, &manifest, &mut eval_s, &initial_feeds, &collate_opts, cfg.batch_size, &device, |n| {
            ref_bar.inc(n as u64)
        })?;
    let evaluator = match &eval_pairs {
        Some(pairs) => {
            let key = cache_key(pairs, &cfg.artifacts, &manifest)?;
            let refs = reference_logps(&run, "eval", &key, pairs, &manifest, &mut eval_s, &initial_feeds, &collate_opts, cfg.batch_size, &device, |n| {
                ref_bar.inc(n as u64)
            })?;
            Some(Evaluator { pairs, refs, collate: collate_opts.clone(), batch_size: cfg.batch_size })
        }
        None => None,
    };
    ref_bar.finish_and_clear();

    let shapes: Vec<Vec<i64>> = manifest.trainable().map(|p| p.shape.clone()).collect();
    let (mut tstate, mut state, resumed_from) = match (cfg.resume, previous.last()) {
        (true, Some((step, dir))) => {
            let l = checkpoint::load(dir)?;
            let params = to_feeds(l.params, &manifest, &device)?;
            let mut moments = by_name(l.moments);
            let mut take = |suffix: &str| {
                let names: Vec<String> = params.names.iter().map(|n| format!("{n}{suffix}")).collect();
                take_uploaded(&mut moments, &names, &device, |n| format!("checkpoint lacks {n}"))
            };
            let (m, v) = (take(".adam_m")?, take(".adam_v")?);
            (l.state, State { params, m, v }, Some(*step))
        }
        _ => {
            let zeros = |s: &Vec<i64>| {
                // Written now, not `vec![0.0; n]`: calloc's lazily mapped zero pages would be faulted
                // in during the first optimizer step instead (SmolLM2-135M: ~3.5 s).
                let n = s.iter().product::<i64>() as usize;
                let mut z = Vec::with_capacity(n);
                z.extend(std::iter::repeat_n(0.0f32, n));
                device.upload(&s.iter().map(|&d| d as usize).collect::<Vec<_>>(), z)
            };
            let m = shapes.iter().map(zeros).collect::<Result<Vec<_>>>()?;
            let v = shapes.iter().map(zeros).collect::<Result<Vec<_>>>()?;
            let params = initial_feeds;
            let ts = TrainerState {
                step: 0,
                position: LoaderPosition::default(),
                tokens: 0,
                skipped_nonfinite: 0,
                updates: 0,
                run_key: key.clone(),
                margin_stats: MarginStats::default(),
                // as the graph reads it (float32), so resumed and straight runs agree bit for bit
                epsilon_beta: manifest.objective.epsilon_dpo.map(|e| e.beta0 as f32 as f64),
            };
            (ts, State { params, m, v }, None)
        }
    };
    let cfg_text = serde_json::to_string_pretty(cfg).expect("config serialises");
    crate::onnx::write_atomic(&run.join(CONFIG_FILE), |w| w.write_all(cfg_text.as_bytes()))?;

    let mut loader = DataLoader::new(
        train_pairs,
        LoaderConfig { batch_size: cfg.batch_size, seed: cfg.seed, shuffle: true, bucket_batches: cfg.bucket_batches, drop_last: false },
        collate_opts.clone(),
    )?;
    loader.seek(tstate.position);
    let per_epoch = loader.batches_per_epoch() as f64;
    let total = cfg.max_steps.unwrap_or_else(|| ((cfg.epochs * per_epoch) / cfg.grad_accum as f64).ceil().max(1.0) as u64);
    let mut log = MetricsLog::open(&run.join(METRICS_FILE), resumed_from)?;
    let mut accumulator = if cfg.grad_accum > 1 { Some(Accumulator::new(&shapes, &scfg, device)?) } else { None };
    let train_spec = manifest.graph("train")?.clone();
    let opt_spec = manifest.graph("optimizer")?.clone();
    let grad_names: Vec<String> = state
        .params
        .names
        .iter()
        .map(|p| train_spec.output_for("gradient", p).map(|o| o.name.clone()).ok_or_else(|| Error::Other(format!("no gradient output for {p}"))))
        .collect::<Result<_>>()?;

    let fused = uses_fused(cfg);
    let kinds: Vec<ParamKind> = state
        .params
        .names
        .iter()
        .map(|n| {
            let p = manifest.parameters.iter().find(|p| &p.name == n).expect("trainable parameter in the manifest");
            ParamKind { beta_head: p.beta_head, weight_decay: p.weight_decay }
        })
        .collect();
    let mut initial_eval = None;
    if let (Some(ev), None) = (&evaluator, resumed_from) {
        let mut rec = ev.run(&mut eval_s, &manifest, &state.params, &tstate, "eval/", &device)?;
        rec.insert("step".into(), Value::from(0u64));
        rec.insert("epoch".into(), num(0.0));
        log.write(&rec)?;
        initial_eval = Some(rec);
    }

    let pb = progress_bar(total, tstate.step, cfg.progress);
    let mut last_train = None;
    let mut final_eval = None;
    while tstate.step < total {
        let started = Instant::now();
        let mut pairs = PairValues::default();
        let mut loss_sum = 0.0f64;
        let mut n_pairs = 0usize;
        let mut tokens = 0usize;
        let mut acc: Option<Vec<ort::value::Tensor<f32>>> = None;
        let mut graph_time = 0.0f64;
        let mut kept = 0usize;
        let mut epsilon_steps = StepTally::default();
        for micro in 0..cfg.grad_accum {
            let batch = loader.next_batch()?;
            let refs = batch_refs(&train_refs, &batch.source_indices)?;
            let micro_batch = tstate.step * cfg.grad_accum as u64 + micro as u64;
            let mut extra = tstate.margin_stats.inputs(cfg.seed, micro_batch, batch.pairs());
            extra.epsilon_beta = tstate.epsilon_beta.unwrap_or_default() as f32;
            let graph_started = Instant::now();
            let fed = GraphBatch { batch: &batch, refs: &refs, batch_beta: &extra };
            let (out, grads) = run_graph(&mut train_s, &train_spec, &fed, &state.params, &grad_names, &device)?;
            if let Some(s) = out.margin_stats {
                tstate.margin_stats = MarginStats::of(s);
            }
            kept += out.kept.iter().filter(|&&k| k > 0.5).count();
            epsilon_steps.add(&out.epsilon_steps);
            graph_time += graph_started.elapsed().as_secs_f64();
            loss_sum += out.loss as f64 * batch.pairs() as f64;
            n_pairs += batch.pairs();
            tokens += batch.num_tokens;
            pairs.extend(PairValues::from_outputs(&out.chosen_rewards, &out.rejected_rewards, &out.policy_logps, &refs, &out.beta, batch.groups.clone()));
            acc = Some(match (acc, accumulator.as_mut()) {
                (None, _) => grads,
                (Some(a), Some(accum)) => accum.add(a, &grads)?,
                (Some(_), None) => unreachable!("accumulating needs grad_accum > 1"),
            });
        }
        let grads = acc.expect("at least one micro-batch");
        let loss = loss_sum / n_pairs as f64;
        let step = tstate.step + 1;
        let f = factor(cfg.lr_schedule, step, cfg.warmup_steps, total);
        let hyper = Hyper {
            learning_rate: (cfg.lr * f) as f32,
            head_learning_rate: (cfg.head_lr * f) as f32,
            // Adam's bias correction counts the updates applied, not the skipped steps.
            step: (tstate.updates + 1) as f32,
            adam_beta1: cfg.adam_beta1 as f32,
            adam_beta2: cfg.adam_beta2 as f32,
            adam_epsilon: cfg.adam_epsilon as f32,
            weight_decay: cfg.weight_decay as f32,
            max_grad_norm: cfg.max_grad_norm as f32,
            gradient_scale: 1.0 / cfg.grad_accum as f32,
        };
        let optimizer_started = Instant::now();
        let norm = match (loss.is_finite(), fused) {
            (false, _) => None,
            (true, true) => fused_adamw::step(&mut state, &grads, &kinds, &hyper, cfg.threads, cfg.flush_denormals)?,
            (true, false) => apply(opt_s.as_mut().expect("optimizer session"), &opt_spec, &mut state, &grads, &hyper, &device)?,
        };
        let optimizer_time = optimizer_started.elapsed().as_secs_f64();
        let norm = match norm {
            Some(n) => n,
            None if cfg.skip_nonfinite => {
                tstate.skipped_nonfinite += 1;
                f32::NAN
            }
            None => {
                let last =
                    checkpoint::list(&run).last().map(|(s, p)| format!("; the last checkpoint {} (step {s}) is intact", p.display())).unwrap_or_default();
                pb.abandon();
                return Err(Error::Other(format!("non-finite loss or gradient at step {step} (loss {loss}){last}; --skip-nonfinite skips such steps")));
            }
        };
        if norm.is_finite() {
            tstate.updates += 1;
        }
        tstate.step = step;
        tstate.tokens += tokens as u64;
        tstate.position = loader.position();
        let epoch = (tstate.position.epoch as f64) + tstate.position.index as f64 / per_epoch;
        let mut rec = Map::new();
        rec.insert("loss".into(), num(loss));
        summarise(&pairs, "", &mut rec);
        rec.insert("grad_norm".into(), num(norm as f64));
        rec.insert("learning_rate".into(), num(hyper.learning_rate as f64));
        rec.insert("head_learning_rate".into(), num(hyper.head_learning_rate as f64));
        rec.insert("step".into(), Value::from(step));
        rec.insert("epoch".into(), num(epoch));
        rec.insert("tokens".into(), Value::from(tstate.tokens));
        rec.insert("step_time_s".into(), num(started.elapsed().as_secs_f64()));
        rec.insert("train_graph_time_s".into(), num(graph_time));
        rec.insert("optimizer_time_s".into(), num(optimizer_time));
        if manifest.objective.beta_dpo.is_some() {
            rec.insert("beta_dpo/kept_fraction".into(), num(kept as f64 / n_pairs as f64));
            rec.insert("beta_dpo/margin_mean".into(), num(tstate.margin_stats.mean));
            rec.insert("beta_dpo/margin_std".into(), num(tstate.margin_stats.std));
        }
        if let (Some(beta), Some(e)) = (tstate.epsilon_beta, manifest.objective.epsilon_dpo) {
            epsilon_beta::record(&mut rec, beta, &epsilon_steps);
            tstate.epsilon_beta = Some(epsilon_beta::next_beta(beta, e.epsilon, &epsilon_steps));
        }
        if tstate.skipped_nonfinite > 0 {
            rec.insert("skipped_nonfinite".into(), Value::from(tstate.skipped_nonfinite));
        }
        log.write(&rec)?;
        pb.set_message(format!(
            "loss {:.4} acc {:.2} beta {:.3}",
            loss,
            rec["rewards/accuracies"].as_f64().unwrap_or(f64::NAN),
            rec["beta/mean"].as_f64().unwrap_or(f64::NAN)
        ));
        pb.set_position(step);
        last_train = Some(rec);

        let is_last = step == total;
        if let Some(ev) = &evaluator {
            if is_last || (cfg.eval_every > 0 && step % cfg.eval_every == 0) {
                let mut rec = ev.run(&mut eval_s, &manifest, &state.params, &tstate, "eval/", &device)?;
                rec.insert("step".into(), Value::from(step));
                rec.insert("epoch".into(), num(epoch));
                log.write(&rec)?;
                pb.println(format!(
                    "step {step}: eval loss {:.4}, accuracy {:.3}, beta {:.3}",
                    rec["eval/loss"].as_f64().unwrap_or(f64::NAN),
                    rec["eval/rewards/accuracies"].as_f64().unwrap_or(f64::NAN),
                    rec["eval/beta/mean"].as_f64().unwrap_or(f64::NAN)
                ));
                if is_last {
                    final_eval = Some(rec);
                }
            }
        }
        if is_last || (cfg.save_every > 0 && step % cfg.save_every == 0) {
            let params = HostViews::of(&state.params.names, &state.params.values, "", &device)?;
            let m = HostViews::of(&state.params.names, &state.m, ".adam_m", &device)?;
            let v = HostViews::of(&state.params.names, &state.v, ".adam_v", &device)?;
            let moments: Vec<RawTensor> = m.raw().into_iter().chain(v.raw()).collect();
            checkpoint::save(&run, &tstate, &params.raw(), &moments, cfg.save_total_limit)?;
        }
    }
    pb.finish_and_clear();
    // RUN/final: the trained parameters, and where the graphs they belong to are.
    let params = HostViews::of(&state.params.names, &state.params.values, "", &device)?;
    let final_dir = run.join(FINAL_DIR);
    std::fs::create_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("step".to_string(), tstate.step.to_string());
    meta.insert("artifacts".to_string(), std::fs::canonicalize(&cfg.artifacts).unwrap_or(cfg.artifacts.clone()).display().to_string());
    write_safetensors_raw(&final_dir.join(checkpoint::PARAMS), &params.raw(), Some(&meta))?;
    let report = super::report::write_report(&run)?;
    Ok(TrainSummary { run, steps: tstate.step, initial_eval, final_eval, last_train, resumed_from, stats, report })
}
