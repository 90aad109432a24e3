//! `betadpo train` end to end on real (tiny) exported models: exact resume, SIGKILL at any
//! moment, the TRL data formats, bad input, learning on data with a known answer, the reference
//! log-prob cache and non-finite steps.
//!
//! Inputs: `graphs/quickstart` (model, tokenizer, data) when its model is there, else the shared
//! fixtures (`../shared/fixtures`); a test skips with a notice when neither is present. The
//! learning test prefers the shared fixtures (their README states what is learnable).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BetaDpoConfig, BuildOptions, EpsilonDpoConfig, Layout, Manifest, ObjectiveConfig};
use betadpo::graph::{MixedPrecision, Precision};
use betadpo::runtime::{ExecutionProvider, SessionConfig};
use betadpo::store::{read_safetensors, write_safetensors, NamedTensor};
use betadpo::text::{load_preferences, LoadOptions, PairTokenizer, TokenizedPair, TruncationConfig};
use betadpo::train::checkpoint::{self, TrainerState};
use betadpo::train::config::TrainConfig;
use betadpo::train::device::Device;
use betadpo::train::loss_scale::{LossScale, INITIAL_SCALE, MAX_SCALE};
use betadpo::train::metrics::read_log;
use betadpo::train::schedule::Schedule;
use betadpo::train::session_io::{forward_values, Feeds};
use betadpo::train::trainer::{train, TrainSummary};
use betadpo::train::{collate, CollateOptions, DataLoader, LoaderConfig};
use serde_json::{Map, Value};

use common::fixtures::{repo, scratch, shared};

// ---------------------------------------------------------------------------------------------
// Inputs and helpers

/// A model, its tokenizer (with `tokenizer_config.json` beside it) and TRL-format data.
struct Inputs {
    model: PathBuf,
    tokenizer: PathBuf,
    train: PathBuf,
    test: PathBuf,
    conversational: PathBuf,
    /// Implicit-prompt rows, when the source ships them.
    implicit: Option<PathBuf>,
    source: &'static str,
}

fn quickstart() -> Option<Inputs> {
    let q = repo().join("graphs/quickstart");
    let needed = ["model.onnx", "tokenizer.json", "tokenizer_config.json", "train.jsonl", "test.jsonl", "test_conversational.jsonl"];
    if !needed.iter().all(|f| q.join(f).exists()) {
        return None;
    }
    Some(Inputs {
        model: q.join("model.onnx"),
        tokenizer: q.join("tokenizer.json"),
        train: q.join("train.jsonl"),
        test: q.join("test.jsonl"),
        conversational: q.join("test_conversational.jsonl"),
        implicit: Some(q.join("test_implicit.jsonl")).filter(|p| p.exists()),
        source: "graphs/quickstart",
    })
}

fn shared_inputs() -> Option<Inputs> {
    let f = shared("")?;
    Some(Inputs {
        model: f.join("tiny-llama-dynamo/model.onnx"),
        tokenizer: f.join("tokenizer/tokenizer.json"),
        train: f.join("prefs/train.jsonl"),
        test: f.join("prefs/test.jsonl"),
        conversational: f.join("prefs/test_conversational.jsonl"),
        implicit: None,
        source: "../shared/fixtures",
    })
}

/// The repository's own inputs first, so the tests run in a clone without `../shared`.
fn inputs() -> Option<Inputs> {
    let i = quickstart().or_else(shared_inputs);
    if i.is_none() {
        common::fixtures::skip("neither graphs/quickstart/model.onnx nor ../shared/fixtures is present");
    }
    i
}

fn artifacts(model: &Path, dir: &Path, objective: ObjectiveConfig) -> PathBuf {
    artifacts_in(LayoutChoice::Padded, model, dir, objective)
}

/// Artifacts of the given layout; `Packed` must succeed (the test models can be packed).
fn artifacts_in(layout: LayoutChoice, model: &Path, dir: &Path, objective: ObjectiveConfig) -> PathBuf {
    let out = dir.join("art");
    let report = build_artifacts(model, &out, &BuildOptions { objective, layout, ..Default::default() })
        .unwrap_or_else(|e| panic!("build-graph {}: {e}", model.display()));
    let expected = if layout == LayoutChoice::Packed { Layout::Packed } else { Layout::Padded };
    assert_eq!(report.manifest.layout, expected, "{}", model.display());
    out
}

/// The first `n` rows of a JSONL file, written to `dir/name`.
fn head(src: &Path, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let body: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    let out = dir.join(name);
    std::fs::write(&out, body).unwrap();
    out
}

/// A small, deterministic configuration (one intra-op thread: bit-identical reruns).
fn config(art: &Path, data: &Path, inp: &Inputs, out: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        artifacts: art.to_path_buf(),
        data: data.to_path_buf(),
        tokenizer: inp.tokenizer.clone(),
        out: out.to_path_buf(),
        max_steps: Some(steps),
        batch_size: 4,
        // the tiny model's rate (the default, TRL's 1e-6, suits pretrained models)
        lr: 1e-3,
        max_length: Some(128),
        threads: Some(1),
        progress: false,
        ..Default::default()
    }
}

fn run_train(cfg: &TrainConfig) -> TrainSummary {
    train(cfg).unwrap_or_else(|e| panic!("train into {}: {e}", cfg.out.display()))
}

fn params(path: &Path) -> Vec<NamedTensor> {
    read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).0
}

fn final_params(run: &Path) -> Vec<NamedTensor> {
    params(&run.join("final").join(checkpoint::PARAMS))
}

/// Same tensor names, shapes and bit patterns.
fn assert_bit_identical(a: &[NamedTensor], b: &[NamedTensor], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor count");
    assert!(!a.is_empty(), "{what}: no tensors");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name, "{what}: tensor order");
        assert_eq!(x.shape, y.shape, "{what}: shape of {}", x.name);
        let diff = x.data.iter().zip(&y.data).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        let max = x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert_eq!(diff, 0, "{what}: {} differs in {diff} of {} values (max |diff| {max})", x.name, x.data.len());
    }
}

fn metrics(run: &Path) -> Vec<Map<String, Value>> {
    read_log(&run.join("metrics.jsonl")).unwrap()
}

/// Training records (not evaluation ones).
fn train_records(run: &Path) -> Vec<Map<String, Value>> {
    metrics(run).into_iter().filter(|r| r.contains_key("loss")).collect()
}

fn eval_records(run: &Path) -> Vec<Map<String, Value>> {
    metrics(run).into_iter().filter(|r| r.contains_key("eval/loss")).collect()
}

fn steps_of(records: &[Map<String, Value>]) -> Vec<u64> {
    records.iter().map(|r| r["step"].as_u64().unwrap()).collect()
}

/// Every value except the wall-clock times must agree.
fn assert_same_records(a: &[Map<String, Value>], b: &[Map<String, Value>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: record count");
    for (x, y) in a.iter().zip(b) {
        let strip = |r: &Map<String, Value>| {
            let mut r = r.clone();
            r.retain(|k, _| !k.ends_with("_time_s"));
            r
        };
        assert_eq!(strip(x), strip(y), "{what}: records differ at step {}", x["step"]);
    }
}

fn f(rec: &Map<String, Value>, key: &str) -> f64 {
    rec.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("metric {key} missing or null in {rec:?}"))
}

/// Names of the entries of RUN/checkpoints, sorted.
fn checkpoint_entries(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(checkpoint::checkpoints_dir(run))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A `step-N` directory holds a loadable state for step N, parameters and moments.
fn assert_complete_checkpoint(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let step: u64 = name.strip_prefix("step-").and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("unexpected checkpoint entry {name}"));
    for f in [checkpoint::PARAMS, checkpoint::OPTIMIZER, checkpoint::STATE] {
        assert!(dir.join(f).is_file(), "{}: {f} is missing (incomplete checkpoint)", dir.display());
    }
    let l = checkpoint::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert_eq!(l.state.step, step, "{}: trainer_state step", dir.display());
    assert!(!l.params.is_empty() && l.moments.len() == 2 * l.params.len(), "{}: {} params, {} moments", dir.display(), l.params.len(), l.moments.len());
}

fn state_of(dir: &Path) -> TrainerState {
    checkpoint::load(dir).unwrap().state
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_betadpo"))
}

fn run_bin(args: &[String], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = bin();
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `betadpo train` on these inputs, then `flags` (values without spaces).
fn train_args(art: &Path, data: &Path, tokenizer: &Path, out: &Path, flags: &str) -> Vec<String> {
    let mut a = args(&["train", "--artifacts", &s(art), "--data", &s(data), "--tokenizer", &s(tokenizer), "--out", &s(out), "--lr", "1e-3"]);
    a.extend(words(flags));
    a
}

/// Flags without spaces in their values, as one string.
fn words(flags: &str) -> Vec<String> {
    flags.split_whitespace().map(String::from).collect()
}

/// Non-zero exit and exactly one non-blank stderr line, starting with `error` and containing every needle.
fn assert_one_line_error(out: &(i32, String, String), needles: &[&str], what: &str) -> String {
    let (code, _, err) = out;
    assert_ne!(*code, 0, "{what}: should fail; stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one stderr line, got:\n{err}");
    assert!(lines[0].starts_with("error"), "{what}: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: expected {n:?} in {err}");
    }
    lines[0].to_string()
}

/// xorshift64*: reproducible pseudo-random delays (seed printed, `BETADPO_TEST_SEED` replays).
struct Rng(u64);
impl Rng {
    fn from_env_or_clock() -> Self {
        let seed = std::env::var("BETADPO_TEST_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
        eprintln!("kill-delay seed: {seed} (BETADPO_TEST_SEED={seed} replays it)");
        Rng(seed)
    }
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Exact resume

/// 8 straight steps and 4 steps + `--resume` to 8 (two micro-batches a step, a checkpoint every
/// 2 steps, a constant schedule: with a decaying one a 4-step run's rates are not those of an 8-step
/// run's first 4 steps) must agree bit for bit: parameters, loop state, metrics. Returns both runs.
fn straight_and_resumed(art: &Path, data: &Path, inp: &Inputs, dir: &Path) -> (PathBuf, PathBuf) {
    let base = |out: &Path, steps: u64| TrainConfig { grad_accum: 2, save_every: 2, lr_schedule: Schedule::Constant, ..config(art, data, inp, out, steps) };
    let straight = dir.join("straight");
    let s = run_train(&base(&straight, 8));
    assert_eq!((s.steps, s.resumed_from), (8, None));
    let split = dir.join("split");
    assert_eq!(run_train(&base(&split, 4)).steps, 4);
    assert_eq!(state_of(&checkpoint::checkpoints_dir(&split).join("step-4")).step, 4);
    let s = run_train(&TrainConfig { resume: true, ..base(&split, 8) });
    assert_eq!((s.steps, s.resumed_from), (8, Some(4)));
    assert_bit_identical(&final_params(&straight), &final_params(&split), "final params, 8 steps vs 4 + resume to 8");
    let state = |run: &Path| state_of(&checkpoint::checkpoints_dir(run).join("step-8"));
    assert_eq!(state(&straight), state(&split));
    assert_same_records(&train_records(&straight), &train_records(&split), "metrics, straight vs resumed");
    (straight, split)
}

#[test]
fn resume_is_exact_padded() {
    resume_is_exact(LayoutChoice::Padded);
}

/// Packed is the layout `build-graph` picks for these models by default.
#[test]
fn resume_is_exact_packed() {
    resume_is_exact(LayoutChoice::Packed);
}

fn resume_is_exact(layout: LayoutChoice) {
    let Some(inp) = inputs() else { return };
    let dir = scratch(&format!("resume-{layout:?}"));
    let art = artifacts_in(layout, &inp.model, &dir, ObjectiveConfig::default());
    // 40 pairs = 10 micro-batches of 4 = 5 steps of 2 per epoch: 8 steps cross an epoch boundary,
    // and the resume point (step 4) is mid-epoch.
    let data = head(&inp.train, 40, &dir, "train.jsonl");
    let eval = head(&inp.test, 12, &dir, "eval.jsonl");
    let base = |out: &Path, steps: u64| TrainConfig { grad_accum: 2, save_every: 2, ..config(&art, &data, &inp, out, steps) };

    // (a) constant schedule: 8 straight steps == 4 steps, then --resume to 8.
    let (straight, split) = straight_and_resumed(&art, &data, &inp, &dir);
    let ck = |run: &Path, f: &str| params(&checkpoint::checkpoints_dir(run).join("step-8").join(f));
    assert_bit_identical(&ck(&straight, checkpoint::OPTIMIZER), &ck(&split, checkpoint::OPTIMIZER), "Adam moments at step 8");
    assert_eq!(steps_of(&train_records(&split)), (1..=8).collect::<Vec<_>>(), "one metrics line per step after resume");

    // (b) linear schedule with warmup and evaluation: a run of 8 steps loses its last checkpoints
    // (as if killed after step 4) and is resumed; the schedule and the log come out the same.
    let lin = |out: &Path| TrainConfig {
        lr_schedule: Schedule::Linear,
        warmup_steps: 3,
        eval_data: Some(eval.clone()),
        eval_every: 4,
        save_total_limit: 0,
        weight_decay: 0.01,
        ..base(out, 8)
    };
    let full = dir.join("linear");
    run_train(&lin(&full));
    let reference_params = final_params(&full);
    let reference_train = train_records(&full);
    let reference_eval = eval_records(&full);
    assert_eq!(steps_of(&reference_eval), vec![0, 4, 8]);
    assert_eq!(checkpoint_entries(&full), vec!["step-2", "step-4", "step-6", "step-8"], "save_total_limit 0 keeps all");
    for n in [6, 8] {
        std::fs::remove_dir_all(checkpoint::checkpoints_dir(&full).join(format!("step-{n}"))).unwrap();
    }
    std::fs::remove_dir_all(full.join("final")).unwrap();
    let s = run_train(&TrainConfig { resume: true, ..lin(&full) });
    assert_eq!((s.steps, s.resumed_from), (8, Some(4)));
    assert!(s.initial_eval.is_none(), "a resumed run does not re-evaluate step 0");
    assert_bit_identical(&reference_params, &final_params(&full), "linear schedule, resumed from step 4");
    assert_eq!(steps_of(&train_records(&full)), (1..=8).collect::<Vec<_>>());
    assert_same_records(&reference_train, &train_records(&full), "linear schedule metrics");
    assert_same_records(&reference_eval, &eval_records(&full), "eval records (0, 4, 8 once each)");
    let lr: Vec<f64> = reference_train.iter().map(|r| f(r, "learning_rate")).collect();
    assert!(lr[0] < lr[1] && lr[1] < lr[2] && lr[3] > lr[7], "warmup then linear decay: {lr:?}");

    // Resuming a finished run is a no-op that rewrites the same final parameters.
    let s = run_train(&TrainConfig { resume: true, ..lin(&full) });
    assert_eq!((s.steps, s.resumed_from), (8, Some(8)));
    assert_bit_identical(&reference_params, &final_params(&full), "resume of a finished run");
    assert_eq!(steps_of(&train_records(&full)), (1..=8).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL at any moment

struct KillSetup {
    art: PathBuf,
    data: PathBuf,
    tokenizer: PathBuf,
    steps: u64,
}

impl KillSetup {
    /// `--resume` once a checkpoint exists (with none, `--resume` is refused, as transformers'
    /// `resume_from_checkpoint=True` is: a run killed before its first checkpoint starts again).
    fn args(&self, out: &Path) -> Vec<String> {
        let resume = if checkpoint::list(out).is_empty() { "" } else { " --resume" };
        let flags = format!("--max-steps {} --batch-size 4 --save-every 1 --threads 1 --max-length 128 --quiet{resume}", self.steps);
        train_args(&self.art, &self.data, &self.tokenizer, out, &flags)
    }
    fn spawn(&self, out: &Path) -> Child {
        bin().args(self.args(out)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }
    fn complete(&self, out: &Path) -> Duration {
        let t = Instant::now();
        let (code, _, err) = run_bin(&self.args(out), &[]);
        assert_eq!(code, 0, "--resume into {} failed:\n{err}", out.display());
        t.elapsed()
    }
}

/// After a kill: every `step-N` is complete (the rest may only be temporary `.partial-*` entries).
fn check_after_kill(run: &Path, what: &str) -> usize {
    let mut partial = 0;
    for name in checkpoint_entries(run) {
        if name.starts_with(".partial-") {
            partial += 1;
        } else {
            let d = checkpoint::checkpoints_dir(run).join(&name);
            assert!(d.is_dir(), "{what}: stray file {name}");
            assert_complete_checkpoint(&d);
        }
    }
    partial
}

/// After a successful resume: only complete `step-N`, the last one the final step.
fn check_after_resume(run: &Path, k: &KillSetup, reference: &[NamedTensor], what: &str) {
    let entries = checkpoint_entries(run);
    assert!(!entries.is_empty(), "{what}: no checkpoints");
    for name in &entries {
        assert!(name.starts_with("step-"), "{what}: {name} left in checkpoints/ after resume ({entries:?})");
        assert_complete_checkpoint(&checkpoint::checkpoints_dir(run).join(name));
    }
    assert_eq!(checkpoint::list(run).last().unwrap().0, k.steps, "{what}");
    assert_bit_identical(reference, &final_params(run), what);
    assert_eq!(steps_of(&train_records(run)), (1..=k.steps).collect::<Vec<_>>(), "{what}: one metrics line per step");
    for dir in [run.to_path_buf(), run.join("final"), run.join("reference")] {
        let stray: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".betadpo-tmp-")).collect())
            .unwrap_or_default();
        assert!(stray.is_empty(), "{what}: temporary files of the killed run left in {}: {stray:?}", dir.display());
    }
}

#[cfg(unix)]
#[test]
fn sigkill_then_resume_padded() {
    sigkill_then_resume(LayoutChoice::Padded);
}

/// Packed is the layout `build-graph` picks for these models by default.
#[cfg(unix)]
#[test]
fn sigkill_then_resume_packed() {
    sigkill_then_resume(LayoutChoice::Packed);
}

/// Kills a run in each phase it names (start-up before the first checkpoint, training, writing a
/// checkpoint, repeatedly) and asserts that each phase was really hit; the state a kill leaves while
/// an old checkpoint is being removed (a microsecond window) is planted. Every resume ends
/// bit-identical to the uninterrupted run.
#[cfg(unix)]
fn sigkill_then_resume(layout: LayoutChoice) {
    let Some(inp) = inputs() else { return };
    let dir = scratch(&format!("sigkill-{layout:?}"));
    let art = artifacts_in(layout, &inp.model, &dir, ObjectiveConfig::default());
    let k = KillSetup { data: head(&inp.train, 32, &dir, "train.jsonl"), art, tokenizer: inp.tokenizer.clone(), steps: 12 };

    // The uninterrupted run, timed: start-up (runtime, tokenization, reference log-probs), then steps.
    let reference_run = dir.join("reference");
    let t = Instant::now();
    let mut child = k.spawn(&reference_run);
    let mut first_save = None;
    while child.try_wait().unwrap().is_none() {
        if first_save.is_none() && !checkpoint::list(&reference_run).is_empty() {
            first_save = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let whole = t.elapsed();
    assert!(child.wait().unwrap().success(), "the uninterrupted run failed");
    let first_save = first_save.unwrap_or(whole / 2);
    let reference = final_params(&reference_run);
    let reference_train = train_records(&reference_run);
    eprintln!("uninterrupted run: {:.2}s, first checkpoint after {:.2}s", whole.as_secs_f64(), first_save.as_secs_f64());
    let mut rng = Rng::from_env_or_clock();

    // Killed during start-up (runtime, tokenization, reference log-probs): before any checkpoint
    // exists. A kill that came too late is retried with a shorter delay, so the phase is hit.
    let mut startup_kills = 0;
    for attempt in 0..8 {
        let run = dir.join(format!("startup-{attempt}"));
        let delay = first_save.mul_f64((0.1 + 0.8 * rng.unit()) / f64::from(1 << (attempt / 2)));
        let mut child = k.spawn(&run);
        std::thread::sleep(delay);
        let before_first_save = checkpoint::list(&run).is_empty() && child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        child.wait().unwrap();
        check_after_kill(&run, &format!("start-up kill {attempt} after {delay:?}"));
        startup_kills += usize::from(before_first_save);
        eprintln!("start-up kill {attempt}: after {:.0} ms, before the first checkpoint: {before_first_save}", delay.as_secs_f64() * 1e3);
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("start-up kill {attempt} after {delay:?}"));
        if startup_kills == 2 {
            break;
        }
    }
    assert_eq!(startup_kills, 2, "no kill landed before the first checkpoint in 8 attempts");

    // Killed once at a random moment while training (the first checkpoint on disk, then a random
    // share of the steps), then resumed to the end.
    let mut killed = 0;
    for i in 2..6 {
        let run = dir.join(format!("random-{i}"));
        let mut child = k.spawn(&run);
        let t = Instant::now();
        let delay = {
            while checkpoint::list(&run).is_empty() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            t.elapsed() + whole.saturating_sub(first_save).mul_f64(0.9 * rng.unit())
        };
        std::thread::sleep(delay.saturating_sub(t.elapsed()));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        killed += usize::from(!finished);
        let partial = check_after_kill(&run, &format!("kill {i} after {delay:?}"));
        let done = checkpoint::list(&run).last().map(|c| c.0);
        eprintln!("kill {i}: after {:.0} ms, newest checkpoint {done:?}, {partial} partial", delay.as_secs_f64() * 1e3);
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("random kill {i} after {delay:?}"));
        assert_same_records(&reference_train, &train_records(&run), &format!("metrics after kill {i}"));
    }
    assert!(killed >= 2, "only {killed} of 4 runs were still running when killed; the delays are too long");

    // Killed while a checkpoint is being written: watch checkpoints/ for a temporary directory,
    // until two runs were caught there.
    let mut caught = 0;
    for i in 0..8 {
        if caught == 2 {
            break;
        }
        let run = dir.join(format!("in-save-{i}"));
        let mut child = k.spawn(&run);
        let deadline = Instant::now() + whole * 3;
        let mut seen_steps = 0;
        loop {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            let names = checkpoint_entries(&run);
            // Skip the first few saves so the kill also lands mid-run and during rotation.
            if names.iter().any(|n| n.starts_with(".partial-")) {
                seen_steps += 1;
                if seen_steps > 2 * (i % 3) {
                    let _ = child.kill();
                    caught += 1;
                    break;
                }
                while checkpoint_entries(&run).iter().any(|n| n.starts_with(".partial-")) && child.try_wait().unwrap().is_none() {}
            }
        }
        let _ = child.kill();
        child.wait().unwrap();
        let partial = check_after_kill(&run, &format!("kill {i} during a save"));
        eprintln!("kill during save {i}: {} partial entries left, newest checkpoint {:?}", partial, checkpoint::list(&run).last().map(|c| c.0));
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("kill {i} during a save"));
    }
    assert_eq!(caught, 2, "fewer than 2 of 8 runs were killed while writing a checkpoint");

    // Killed while an old checkpoint is being removed (save_total_limit): it is renamed to
    // `.partial-removing-*` first and deleted then, a window of microseconds that a watcher catches
    // only sometimes. So the state such a kill leaves is also planted below, where it is asserted.
    let mut caught = 0;
    for i in 0..3 {
        let run = dir.join(format!("in-rotation-{i}"));
        let mut child = k.spawn(&run);
        let deadline = Instant::now() + whole * 3;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            if checkpoint_entries(&run).iter().any(|n| n.starts_with(".partial-removing-")) {
                let _ = child.kill();
                caught += 1;
                break;
            }
        }
        let _ = child.kill();
        child.wait().unwrap();
        check_after_kill(&run, &format!("kill {i} during checkpoint rotation"));
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("kill {i} during checkpoint rotation"));
    }
    eprintln!("caught {caught} of 3 runs while an old checkpoint was being removed");
    let run = dir.join("planted-rotation");
    let mut child = k.spawn(&run);
    while checkpoint::list(&run).len() < 2 && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    child.wait().unwrap();
    let (step, oldest) = checkpoint::list(&run).first().cloned().expect("a checkpoint before the kill");
    let removing = checkpoint::checkpoints_dir(&run).join(format!(".partial-removing-step-{step}-1"));
    std::fs::rename(&oldest, &removing).unwrap();
    std::fs::remove_file(removing.join(checkpoint::PARAMS)).unwrap();
    k.complete(&run);
    assert!(!removing.exists(), "a half-removed checkpoint is cleaned up on resume");
    check_after_resume(&run, &k, &reference, "after a kill while an old checkpoint was being removed");

    // Killed repeatedly: each resume is itself killed, then the last one finishes.
    let run = dir.join("repeated");
    for round in 0..4 {
        let delay = whole.mul_f64(0.2 + 0.5 * rng.unit());
        let mut child = k.spawn(&run);
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().unwrap();
        check_after_kill(&run, &format!("repeated kill {round}"));
    }
    k.complete(&run);
    check_after_resume(&run, &k, &reference, "after 4 kills in a row");

    // A temporary directory left behind is removed, never loaded.
    let ck = checkpoint::checkpoints_dir(&run);
    std::fs::create_dir_all(ck.join(".partial-step-99-1")).unwrap();
    std::fs::write(ck.join(".partial-step-99-1").join(checkpoint::STATE), "{ half").unwrap();
    k.complete(&run);
    assert!(!checkpoint_entries(&run).iter().any(|n| n.starts_with(".partial-")), "{:?}", checkpoint_entries(&run));
    check_after_resume(&run, &k, &reference, "with a planted partial checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 3. TRL data formats through train

/// Implicit-prompt rows made from standard ones: the prompt is put in front of both answers.
fn implicit_from_standard(src: &Path, n: usize, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let mut body = String::new();
    for line in text.lines().take(n) {
        let v: Map<String, Value> = serde_json::from_str(line).unwrap();
        let p = v["prompt"].as_str().unwrap();
        let row = serde_json::json!({
            "chosen": format!("{p}{}", v["chosen"].as_str().unwrap()),
            "rejected": format!("{p}{}", v["rejected"].as_str().unwrap()),
            "regime": v["regime"],
        });
        body.push_str(&format!("{row}\n"));
    }
    let out = dir.join("implicit.jsonl");
    std::fs::write(&out, body).unwrap();
    out
}

#[test]
fn data_formats_train() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("formats");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let standard = head(&inp.train, 16, &dir, "standard.jsonl");
    let conversational = head(&inp.conversational, 16, &dir, "conversational.jsonl");
    let implicit = match &inp.implicit {
        Some(p) => head(p, 16, &dir, "implicit.jsonl"),
        None => implicit_from_standard(&inp.train, 16, &dir),
    };
    for (name, data) in [("standard", &standard), ("conversational", &conversational), ("implicit", &implicit)] {
        let out = dir.join(format!("run-{name}"));
        let cfg = TrainConfig { group_by: Some("regime".into()), eval_data: Some(data.clone()), ..config(&art, data, &inp, &out, 2) };
        let s = train(&cfg).unwrap_or_else(|e| panic!("{name} ({}): {e}", inp.source));
        assert_eq!(s.steps, 2, "{name}");
        assert!(s.stats.contains("16 pairs kept of 16"), "{name}: {}", s.stats);
        let recs = train_records(&out);
        assert_eq!(steps_of(&recs), vec![1, 2], "{name}");
        for r in &recs {
            let loss = f(r, "loss");
            // Beta starts at 0.1 and the policy at the reference: the first loss is log 2.
            assert!(loss.is_finite() && loss > 0.0 && loss < 1.0, "{name}: loss {loss}");
            assert!(f(r, "grad_norm") > 0.0, "{name}: zero gradient");
            // A step's per-group values (kept to trace a loss spike to its groups) average back to the step's own.
            let groups: Vec<(&str, f64)> =
                ["clean", "mixed", "noise"].into_iter().filter_map(|g| r.get(&format!("pairs/{g}")).map(|n| (g, n.as_u64().unwrap() as f64))).collect();
            let pairs: f64 = groups.iter().map(|(_, n)| n).sum();
            assert!(pairs >= 1.0, "{name}: no per-group values in a step's record");
            for key in ["rewards/margins", "rewards/accuracies", "beta/mean", "drift/abs_logratio"] {
                let by_group: f64 = groups.iter().map(|(g, n)| n * f(r, &format!("{key}/{g}"))).sum::<f64>() / pairs;
                assert!((by_group - f(r, key)).abs() <= 1e-5 * (1.0 + f(r, key).abs()), "{name}: {key} {} but {by_group} from its groups", f(r, key));
            }
        }
        assert!((f(&recs[0], "loss") - std::f64::consts::LN_2).abs() < 1e-5, "{name}: first loss {} != ln 2", f(&recs[0], "loss"));
        let ev = s.final_eval.as_ref().unwrap();
        assert_eq!(
            ev["eval/pairs/clean"].as_u64().unwrap() + ev["eval/pairs/mixed"].as_u64().unwrap() + ev["eval/pairs/noise"].as_u64().unwrap(),
            16,
            "{name}: groups"
        );
        assert!(final_params(&out).iter().all(|t| t.data.iter().all(|x| x.is_finite())), "{name}");
        let refs: Vec<_> = std::fs::read_dir(out.join("reference")).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(refs.len(), 2, "{name}: train and eval reference caches");
    }

    // Conversational rows need a chat template: a tokenizer_config.json without one is a clear error.
    let bare = dir.join("bare_config.json");
    std::fs::write(&bare, r#"{"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#).unwrap();
    let cfg = TrainConfig { tokenizer_config: Some(bare), ..config(&art, &conversational, &inp, &dir.join("run-no-template"), 2) };
    let err = train(&cfg).err().expect("conversational data without a chat template must fail").to_string();
    assert!(err.contains("chat template"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input

#[test]
fn bad_input() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("badinput");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let good = head(&inp.train, 16, &dir, "good.jsonl");
    let base = |data: &Path, out: &Path| train_args(&art, data, &inp.tokenizer, out, "--max-steps 2 --batch-size 4 --threads 1");
    let with = |mut a: Vec<String>, more: &[&str]| {
        a.extend(args(more));
        a
    };

    // A missing data file: named, and nothing trained.
    let out = dir.join("run-missing");
    let e = assert_one_line_error(&run_bin(&base(&dir.join("nope.jsonl"), &out), &[]), &["nope.jsonl"], "missing data");
    assert!(e.contains("No such file"), "{e}");
    assert!(!out.join("metrics.jsonl").exists() && checkpoint::list(&out).is_empty());

    // A malformed row: file:line, in one line; --skip-bad-rows counts it and trains on the rest.
    let mut lines: Vec<String> = std::fs::read_to_string(&good).unwrap().lines().map(String::from).collect();
    lines.insert(5, r#"{"prompt": "User: hi\nAssistant:", "chosen": " hello"}"#.into()); // line 6: no rejected
    lines.insert(9, r#"{"prompt": "User: hi\nAssistant:", "chosen": " hel"#.into()); // line 10: not JSON
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let out = dir.join("run-bad");
    assert_one_line_error(&run_bin(&base(&bad, &out), &[]), &["bad.jsonl:6", "rejected"], "malformed row");
    assert!(!out.join("metrics.jsonl").exists());
    let (code, stdout, err) = run_bin(&with(base(&bad, &out), &["--skip-bad-rows"]), &[]);
    assert_eq!(code, 0, "--skip-bad-rows:\n{err}");
    assert!(err.contains("16 pairs kept of 16") && err.contains("2 malformed rows skipped"), "skip count not reported:\n{err}");
    assert!(stdout.contains("trained 2 steps"), "{stdout}");
    assert_eq!(steps_of(&train_records(&out)), vec![1, 2]);

    // --ep cuda on a runtime without CUDA fails: no silent CPU fallback. The CPU build is named
    // with ORT_DYLIB_PATH so the test neither needs a GPU nor downloads the GPU build.
    betadpo::runtime::init(&betadpo::runtime::ExecutionProvider::Cpu).unwrap();
    let cpu_lib = betadpo::runtime::loaded_library().unwrap().path.clone();
    let out = dir.join("run-cuda");
    let r = run_bin(&with(base(&good, &out), &["--ep", "cuda", "--quiet"]), &[("ORT_DYLIB_PATH", cpu_lib.to_str().unwrap())]);
    assert_one_line_error(&r, &["CUDA", "not available"], "--ep cuda without CUDA");
    assert!(!out.join("metrics.jsonl").exists() && checkpoint::list(&out).is_empty(), "--ep cuda trained anyway");

    // Flag values.
    for (flags, needle) in [
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--grad-accum", "0"], "--grad-accum"),
        (&["--max-length", "0"], "--max-length"),
        (&["--truncation-mode", "keep_middle"], "keep_start or keep_end"),
        (&["--lr", "nan"], "--lr"),
        (&["--head-lr", "-1"], "--head-lr"),
        (&["--max-steps", "0"], "--max-steps"),
        (&["--ep", "metal"], "metal"),
    ] {
        let out = dir.join("run-flags");
        assert_one_line_error(&run_bin(&with(base(&good, &out), flags), &[]), &[needle], &format!("{flags:?}"));
        assert!(!out.join("metrics.jsonl").exists(), "{flags:?} trained anyway");
    }

    // A run directory with checkpoints is not overwritten without --resume.
    let out = dir.join("run-existing");
    let (code, _, err) = run_bin(&with(base(&good, &out), &["--quiet"]), &[]);
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let ck = checkpoint::list(&out).last().unwrap().1.join(checkpoint::PARAMS);
    let ck_before = std::fs::read(&ck).unwrap();
    assert_one_line_error(&run_bin(&with(base(&good, &out), &["--quiet"]), &[]), &["already holds checkpoints", "--resume"], "existing run without --resume");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before, "metrics.jsonl was touched");
    assert_eq!(std::fs::read(&ck).unwrap(), ck_before, "the checkpoint was touched");
    // ... nor resumed with other optimizer flags or data.
    assert_one_line_error(
        &run_bin(&with(base(&good, &out), &["--quiet", "--resume", "--lr", "0.5"]), &[]),
        &["resume needs the same"],
        "resume with another --lr",
    );
    let other = head(&inp.train, 12, &dir, "other.jsonl");
    assert_one_line_error(&run_bin(&with(base(&other, &out), &["--quiet", "--resume"]), &[]), &["resume needs the same"], "resume with other data");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 5. Learning works

/// On data with clean / mixed / noise prompts (the shared fixtures, else graphs/quickstart), the
/// learned beta is high where labels are reliable and low where they are noise, and clean held-out
/// pairs are ranked right.
#[test]
fn learns_context_dependent_beta() {
    let Some(inp) = shared_inputs().or_else(quickstart) else {
        common::fixtures::skip("neither ../shared/fixtures nor graphs/quickstart/model.onnx is present");
        return;
    };
    eprintln!("learning on {}", inp.source);
    let dir = scratch("learn");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let eval = head(&inp.test, 150, &dir, "eval.jsonl");
    let out = dir.join("run");
    let cfg = TrainConfig {
        eval_data: Some(eval.clone()),
        group_by: Some("regime".into()),
        batch_size: 8,
        lr: 1e-3,
        head_lr: 1e-2,
        ..config(&art, &inp.train, &inp, &out, 150)
    };
    let t = Instant::now();
    let s = run_train(&cfg);
    eprintln!("150 steps of 8 pairs + eval on 150 pairs: {:.1}s", t.elapsed().as_secs_f64());
    let ev = s.final_eval.clone().expect("final evaluation");
    let last = eval_records(&out).pop().unwrap();
    // The summary's final eval is the last eval line of metrics.jsonl (up to JSON's float parsing).
    assert_eq!(last.keys().collect::<Vec<_>>(), ev.keys().collect::<Vec<_>>());
    for (k, v) in &ev {
        match (v.as_f64(), last[k].as_f64()) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-12 * a.abs().max(1.0), "{k}: summary {a}, metrics.jsonl {b}"),
            _ => assert_eq!(v, &last[k], "{k}"),
        }
    }
    let (acc_clean, beta_clean, beta_noise, beta_mixed) =
        (f(&ev, "eval/rewards/accuracies/clean"), f(&ev, "eval/beta/mean/clean"), f(&ev, "eval/beta/mean/noise"), f(&ev, "eval/beta/mean/mixed"));
    eprintln!(
        "clean accuracy {acc_clean:.3}; beta clean {beta_clean:.3}, mixed {beta_mixed:.3}, noise {beta_noise:.3}; noise accuracy {:.3}",
        f(&ev, "eval/rewards/accuracies/noise")
    );
    assert!(acc_clean >= 0.9, "clean accuracy {acc_clean}");
    assert!(beta_clean > beta_noise, "beta clean {beta_clean} <= noise {beta_noise}");
    assert!(beta_clean > 2.0 * beta_noise, "beta should separate clearly: clean {beta_clean}, noise {beta_noise}");
    assert!(f(&ev, "eval/loss") < f(s.initial_eval.as_ref().unwrap(), "eval/loss"), "eval loss did not go down");
    let init = s.initial_eval.as_ref().unwrap();
    assert!((f(init, "eval/loss") - std::f64::consts::LN_2).abs() < 1e-5, "at step 0 the policy is the reference: loss ln 2, got {}", f(init, "eval/loss"));
    assert!((f(init, "eval/beta/mean") - 0.1).abs() < 1e-6, "beta starts at --beta-init 0.1: {}", f(init, "eval/beta/mean"));
    assert!(ev["eval/pairs/clean"].as_u64().unwrap() == 50 && ev["eval/pairs/noise"].as_u64().unwrap() == 50);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Standard DPO (`--fixed-beta 0.1`): beta is exactly 0.1 (as float32) everywhere, at every step.
#[test]
fn fixed_beta_stays_fixed() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("fixed");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig { fixed_beta: Some(0.1), ..Default::default() });
    let data = head(&inp.train, 96, &dir, "train.jsonl");
    let eval = head(&inp.test, 30, &dir, "eval.jsonl");
    let out = dir.join("run");
    let cfg = TrainConfig { eval_data: Some(eval), group_by: Some("regime".into()), eval_every: 10, batch_size: 8, ..config(&art, &data, &inp, &out, 30) };
    let s = run_train(&cfg);
    let exact = 0.1f32 as f64;
    let recs = metrics(&out);
    assert_eq!(recs.len(), 30 + 4, "30 train lines and evaluations at 0, 10, 20, 30");
    for r in &recs {
        let p = if r.contains_key("eval/loss") { "eval/" } else { "" };
        for k in ["beta/mean", "beta/min", "beta/max"] {
            assert_eq!(f(r, &format!("{p}{k}")), exact, "{p}{k} at step {}", r["step"]);
        }
        assert_eq!(f(r, &format!("{p}beta/std")), 0.0);
        if !p.is_empty() {
            for g in ["clean", "mixed", "noise"] {
                assert_eq!(f(r, &format!("eval/beta/mean/{g}")), exact, "eval/beta/mean/{g} at step {}", r["step"]);
            }
        }
    }
    assert!(f(s.final_eval.as_ref().unwrap(), "eval/loss") < f(s.initial_eval.as_ref().unwrap(), "eval/loss"), "standard DPO did not reduce the eval loss");
    // No beta head among the trained parameters.
    assert!(final_params(&out).iter().all(|t| !t.name.contains("beta")), "{:?}", final_params(&out).iter().map(|t| &t.name).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

/// beta-DPO (`--beta-method beta-dpo`) learns: held-out reward accuracy on the clean pairs rises,
/// each step keeps floor(B (1 - rho)) pairs, and the running margin statistics move.
#[test]
fn beta_dpo_learns() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("beta-dpo-learns");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig { beta_dpo: Some(BetaDpoConfig::default()), ..Default::default() });
    let data = head(&inp.train, 96, &dir, "train.jsonl");
    let eval = head(&inp.test, 30, &dir, "eval.jsonl");
    let out = dir.join("run");
    let cfg = TrainConfig { eval_data: Some(eval), group_by: Some("regime".into()), eval_every: 15, batch_size: 8, ..config(&art, &data, &inp, &out, 30) };
    let s = run_train(&cfg);
    let (before, after) = (s.initial_eval.as_ref().unwrap(), s.final_eval.as_ref().unwrap());
    let clean = "eval/rewards/accuracies/clean";
    assert!(f(after, clean) > f(before, clean) + 0.2, "clean accuracy {} -> {}", f(before, clean), f(after, clean));
    assert!(f(after, "eval/loss") < f(before, "eval/loss"));
    for r in train_records(&out) {
        assert_eq!(f(&r, "beta_dpo/kept_fraction"), 6.0 / 8.0, "floor(8 x 0.8) of 8 pairs kept at step {}", r["step"]);
        assert_eq!(f(&r, "beta/std"), 0.0, "one beta per batch");
    }
    let last = state_of(&checkpoint::checkpoints_dir(&out).join("step-30"));
    assert!(last.margin_stats.mean != 0.0 && last.margin_stats.std > 0.0, "{:?}", last.margin_stats);
    let _ = std::fs::remove_dir_all(&dir);
}

/// beta-DPO's running margin statistics and its selection noise survive a resume: 8 straight steps
/// equal 4 steps + --resume to 8, bit for bit, with two micro-batches per step.
#[test]
fn beta_dpo_resume_is_exact() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("beta-dpo-resume");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig { beta_dpo: Some(BetaDpoConfig::default()), ..Default::default() });
    let data = head(&inp.train, 40, &dir, "train.jsonl");
    let (_, split) = straight_and_resumed(&art, &data, &inp, &dir);
    let state = state_of(&checkpoint::checkpoints_dir(&split).join("step-8"));
    assert!(state.margin_stats.std > 0.0, "the statistic is carried: {:?}", state.margin_stats);
    let _ = std::fs::remove_dir_all(&dir);
}

/// epsilon-DPO's global beta survives a resume (8 straight steps equal 4 + --resume to 8, bit for
/// bit, two micro-batches a step, on the packed layout), and each step's beta is the previous one
/// divided by 1 + eps x that step's mean step over both micro-batches, as the reference code updates it.
#[test]
fn epsilon_dpo_resume_is_exact() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("epsilon-dpo-resume");
    let e = EpsilonDpoConfig { beta0: 0.1, epsilon: 0.1 };
    let art = artifacts_in(LayoutChoice::Packed, &inp.model, &dir, ObjectiveConfig { epsilon_dpo: Some(e), ..Default::default() });
    let data = head(&inp.train, 40, &dir, "train.jsonl");
    let (_, split) = straight_and_resumed(&art, &data, &inp, &dir);
    let records = train_records(&split);
    assert_eq!(f(&records[0], "kl/beta"), 0.1f32 as f64, "the first step uses --beta-init");
    let next = |r: &Map<String, Value>| (f(r, "kl/beta") / (1.0 + e.epsilon * f(r, "kl/avg_steps"))) as f32 as f64;
    for w in records.windows(2) {
        assert_eq!(f(&w[0], "kl/avg_steps"), f(&w[0], "kl/p_epsilon_steps") - f(&w[0], "kl/n_epsilon_steps"), "step {}", w[0]["step"]);
        assert_eq!(f(&w[1], "kl/beta"), next(&w[0]), "beta at step {}", w[1]["step"]);
    }
    assert!(records.iter().any(|r| f(r, "kl/avg_steps") != 0.0), "some pairs step once the policy moves");
    let state = state_of(&checkpoint::checkpoints_dir(&split).join("step-8"));
    assert_eq!(state.epsilon_beta, Some(next(records.last().unwrap())), "the checkpoint holds the beta of step 9");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Emulated fp16 artifacts (the CPU provider would run real ones in float32) and 40 training pairs.
fn fp16_artifacts(inp: &Inputs, dir: &Path) -> (PathBuf, PathBuf) {
    let fp16 = dir.join("fp16");
    let precision = MixedPrecision { precision: Precision::Fp16, emulated: true };
    build_artifacts(&inp.model, &fp16, &BuildOptions { layout: LayoutChoice::Padded, precision, ..Default::default() }).unwrap();
    (fp16, head(&inp.train, 40, dir, "train.jsonl"))
}

/// fp16 artifacts train with dynamic loss scaling: the train graph is fed the scale, the optimizer sees
/// unscaled gradients (the first step's gradient norm agrees with the float32 build's to within fp16's
/// error, where a scaled one would be 65536 times larger), and the scale is part of the checkpoint:
/// 8 straight steps equal 4 + --resume to 8, bit for bit.
#[test]
fn fp16_loss_scaling_trains_and_resumes_exactly() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("fp16-resume");
    let (fp16, data) = fp16_artifacts(&inp, &dir);
    let (straight, split) = straight_and_resumed(&fp16, &data, &inp, &dir);
    let records = train_records(&straight);
    assert!(records.iter().all(|r| f(r, "loss_scale") == INITIAL_SCALE), "no overflow on this model: {records:?}");
    let state = state_of(&checkpoint::checkpoints_dir(&split).join("step-8"));
    assert_eq!(state.loss_scale, Some(LossScale { scale: INITIAL_SCALE, clean_steps: 8 }));

    let art32 = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let run32 = dir.join("fp32");
    run_train(&TrainConfig { grad_accum: 2, ..config(&art32, &data, &inp, &run32, 1) });
    let (n16, n32) = (f(&records[0], "grad_norm"), f(&train_records(&run32)[0], "grad_norm"));
    eprintln!("first step's gradient norm: fp16 {n16}, fp32 {n32}");
    assert!(((n16 - n32) / n32).abs() < 1e-3, "first step's gradient norm: fp16 {n16}, fp32 {n32}");
    assert!(state_of(&checkpoint::checkpoints_dir(&run32).join("step-1")).loss_scale.is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loss scale too large for float16 (2^24, the most `--loss-scale-init` takes): the first steps'
/// gradients overflow; each such step is skipped (no Adam update counted) and halves the scale, a clean
/// one keeps it, and the checkpoint holds the scale the next step uses.
#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("fp16-overflow");
    let (fp16, data) = fp16_artifacts(&inp, &dir);
    let run = dir.join("run");
    run_train(&TrainConfig { loss_scale_init: Some(MAX_SCALE), save_every: 1, save_total_limit: 100, ..config(&fp16, &data, &inp, &run, 10) });
    let records = train_records(&run);
    let overflowed: Vec<bool> = records.iter().map(|r| r.contains_key("loss_scale_overflow")).collect();
    eprintln!("overflowed per step from 2^24: {overflowed:?}");
    assert!(overflowed[0] && !overflowed.iter().all(|&o| o), "2^24 overflows at first, then the scale fits: {overflowed:?}");
    let mut scale = MAX_SCALE;
    let mut updates = 0;
    for (r, &o) in records.iter().zip(&overflowed) {
        assert_eq!(f(r, "loss_scale"), scale, "step {}", r["step"]);
        assert_eq!(r["grad_norm"].is_null(), o, "a skipped step has no gradient norm (step {})", r["step"]);
        scale = if o { scale / 2.0 } else { scale };
        updates += u64::from(!o);
        let state = state_of(&checkpoint::checkpoints_dir(&run).join(format!("step-{}", r["step"])));
        assert_eq!((state.updates, state.loss_scale.unwrap().scale), (updates, scale), "step {}", r["step"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Training on packed artifacts is training on the same numbers: reference log-probs, the first
/// step's loss and gradient norm, and the step-0 evaluation agree with the padded layout's, with
/// rows of ~2 pairs so that batches span several rows.
#[test]
fn packed_layout_trains_like_padded() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("packed");
    let padded = artifacts(&inp.model, &dir.join("padded"), ObjectiveConfig::default());
    let packed = dir.join("packed").join("art");
    build_artifacts(&inp.model, &packed, &BuildOptions { layout: LayoutChoice::Packed, ..Default::default() }).unwrap();
    let data = head(&inp.train, 32, &dir, "train.jsonl");
    let eval = head(&inp.test, 24, &dir, "eval.jsonl");
    let run = |art: &Path, name: &str| {
        let out = dir.join(name);
        let cfg = TrainConfig { eval_data: Some(eval.clone()), batch_size: 8, pack_tokens: 64, ..config(art, &data, &inp, &out, 1) };
        let s = run_train(&cfg);
        let refs = reference_files(&out).into_iter().find(|f| f.0.starts_with("train-")).unwrap();
        let (t, _) = read_safetensors(&out.join("reference").join(&refs.0)).unwrap();
        (s, t.into_iter().find(|t| t.name == "ref_logps").unwrap().data, train_records(&out))
    };
    let (s_pad, refs_pad, rec_pad) = run(&padded, "run-padded");
    let (s_pack, refs_pack, rec_pack) = run(&packed, "run-packed");
    assert_eq!(refs_pad.len(), refs_pack.len());
    for (a, b) in refs_pad.iter().zip(&refs_pack) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "reference log-probs differ: padded {a}, packed {b}");
    }
    for key in ["loss", "grad_norm", "logps/chosen", "logps/rejected"] {
        let (a, b) = (f(&rec_pad[0], key), f(&rec_pack[0], key));
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-3), "step 1 {key}: padded {a}, packed {b}");
    }
    let (a, b) = (s_pad.initial_eval.unwrap(), s_pack.initial_eval.unwrap());
    for key in ["eval/loss", "eval/logps/chosen", "eval/beta/mean"] {
        assert!((f(&a, key) - f(&b, key)).abs() <= 1e-5 * f(&a, key).abs().max(1.0), "{key}: padded {}, packed {}", f(&a, key), f(&b, key));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 6. Reference log-prob cache

fn reference_files(run: &Path) -> Vec<(String, SystemTime, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(run.join("reference"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().modified().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The reference table cached for data set `kind` ("train" or "eval") in `run`, by source index.
fn reference_table(run: &Path, kind: &str) -> BTreeMap<usize, (f32, f32)> {
    let file =
        reference_files(run).into_iter().find(|f| f.0.starts_with(&format!("{kind}-"))).unwrap_or_else(|| panic!("no {kind} cache in {}", run.display()));
    let (t, _) = read_safetensors(&run.join("reference").join(&file.0)).unwrap();
    let get = |name: &str| t.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{}: no {name}", file.0));
    let (idx, vals) = (get("source_index"), get("ref_logps"));
    assert_eq!(vals.shape, vec![idx.data.len(), 2], "{}: one (chosen, rejected) pair per row", file.0);
    idx.data.iter().enumerate().map(|(i, &s)| (s as usize, (vals.data[2 * i], vals.data[2 * i + 1]))).collect()
}

#[test]
fn reference_cache() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("refcache");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let d1 = head(&inp.train, 24, &dir, "d1.jsonl");
    let d2 = head(&inp.train, 20, &dir, "d2.jsonl");
    let eval = head(&inp.test, 8, &dir, "eval.jsonl");
    let cfg = |data: &Path, out: &Path, steps: u64| TrainConfig { eval_data: Some(eval.clone()), ..config(&art, data, &inp, out, steps) };

    let run = dir.join("run");
    run_train(&cfg(&d1, &run, 2));
    let first = reference_files(&run);
    let names: Vec<&str> = first.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("eval-") && names[1].starts_with("train-"), "{names:?}");
    let train_rows = reference_table(&run, "train");
    assert_eq!(train_rows.len(), 8, "2 steps of 4 pairs use 8 of the 24 training pairs");
    assert_eq!(reference_table(&run, "eval").len(), 8, "every eval pair");
    assert!(train_rows.values().all(|&(c, r)| c.is_finite() && c < 0.0 && r.is_finite() && r < 0.0), "log-probs are negative and finite");

    // Resuming reuses the cache: the eval file is not rewritten, the training rows kept are kept as they were.
    std::thread::sleep(Duration::from_millis(20));
    let s = run_train(&TrainConfig { resume: true, ..cfg(&d1, &run, 4) });
    assert_eq!((s.steps, s.resumed_from), (4, Some(2)));
    assert_eq!(reference_files(&run)[0], first[0], "the eval cache was rewritten on resume");
    let grown = reference_table(&run, "train");
    assert_eq!(grown.len(), 16, "4 steps use 16 pairs");
    assert!(train_rows.iter().all(|(s, v)| grown.get(s) == Some(v)), "cached rows changed on resume");

    // The same data in another run directory gives the same key and the same values.
    let again = dir.join("again");
    run_train(&cfg(&d1, &again, 1));
    let a = reference_files(&again);
    assert_eq!(a.iter().map(|f| &f.0).collect::<Vec<_>>(), first.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert_eq!(a[0].2, first[0].2, "the same eval data gives the same eval file");
    let one_step = reference_table(&again, "train");
    assert_eq!(one_step.len(), 4);
    assert!(one_step.iter().all(|(s, v)| train_rows.get(s) == Some(v)), "one step's rows are the first step's, with the same values");

    // Other data: another train cache file (the eval one is shared).
    let other = dir.join("other");
    run_train(&cfg(&d2, &other, 1));
    let o = reference_files(&other);
    assert_eq!(o[0].0, first[0].0, "same eval data, same eval cache key");
    assert_ne!(o[1].0, first[1].0, "other training data must not reuse the cache key");
    // Other tokenization of the same data is other data too.
    let shorter = dir.join("shorter");
    run_train(&TrainConfig { max_length: Some(24), ..cfg(&d1, &shorter, 1) });
    assert_ne!(reference_files(&shorter)[1].0, first[1].0, "truncation must change the cache key");
    // Other initial weights (other artifacts) change it too.
    std::fs::create_dir_all(dir.join("fixed")).unwrap();
    let art2 = artifacts(&inp.model, &dir.join("fixed"), ObjectiveConfig { fixed_beta: Some(0.2), ..Default::default() });
    let fixed = dir.join("fixed-run");
    run_train(&TrainConfig { artifacts: art2, ..cfg(&d1, &fixed, 1) });
    assert_ne!(reference_files(&fixed)[1].0, first[1].0, "other artifacts must change the cache key");
    // So do frozen weights that a large eval graph keeps in `<file>.data` beside it.
    let eval_graph = art.join(&Manifest::load(&art).unwrap().graph("eval").unwrap().file);
    std::fs::write(format!("{}.data", eval_graph.display()), b"other frozen weights").unwrap();
    let frozen = dir.join("frozen-run");
    run_train(&cfg(&d1, &frozen, 1));
    assert_ne!(reference_files(&frozen)[1].0, first[1].0, "the eval graph's external data must change the cache key");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reference log-probs of `pairs` as ONNX Runtime computes them with the artifacts' eval graph
/// and initial parameters, all in one padded batch (as a run that computed the whole table did).
fn reference_by_ort(art: &Path, pairs: &[&TokenizedPair], pad_id: u32) -> Vec<(f32, f32)> {
    let m = Manifest::load(art).unwrap();
    let spec = m.graph("eval").unwrap();
    let mut session = SessionConfig { intra_threads: Some(1), ..Default::default() }.session_from_file(&art.join(&spec.file)).unwrap();
    let device = Device::for_ep(&ExecutionProvider::Cpu);
    let mut initial: HashMap<String, NamedTensor> = params(&art.join(&m.parameters_file)).into_iter().map(|t| (t.name.clone(), t)).collect();
    let names: Vec<String> = m.trainable().map(|p| p.name.clone()).collect();
    let values = names.iter().map(|n| initial.remove(n).map(|t| device.upload(&t.shape, t.data).unwrap()).unwrap()).collect();
    let batch = collate(pairs, &CollateOptions { pad_id, ..Default::default() }).unwrap();
    let out = forward_values(&mut session, spec, &batch, &vec![0.0; 2 * pairs.len()], &Feeds { names, values }, &device).unwrap();
    (0..pairs.len()).map(|i| (out.policy_logps[i], out.policy_logps[pairs.len() + i])).collect()
}

/// A `--max-steps 2` run on the whole training set computes reference log-probs for the 8 pairs
/// its two batches draw and no others; they are ONNX Runtime's; extending the run computes only
/// the pairs the new steps draw, and reuses the cached ones as they are (a planted value survives).
#[test]
fn reference_rows_are_the_rows_used() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("refrows");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let eval = head(&inp.test, 8, &dir, "eval.jsonl");
    let cfg = |out: &Path, steps: u64| TrainConfig { eval_data: Some(eval.clone()), ..config(&art, &inp.train, &inp, out, steps) };

    // The pairs the steps draw, from the loader as a run sets it up.
    let base = cfg(&dir.join("unused"), 2);
    let tok = PairTokenizer::from_files(&inp.tokenizer, None).unwrap();
    let rows = load_preferences(&inp.train, &LoadOptions::default()).unwrap().rows;
    let (pairs, _) = tok.tokenize_all(&rows, &TruncationConfig { max_length: base.max_length, mode: base.truncation_mode }).unwrap();
    let loader_cfg = LoaderConfig { batch_size: 4, seed: base.seed, shuffle: true, bucket_batches: base.bucket_batches, drop_last: false };
    let loader = DataLoader::new(pairs.clone(), loader_cfg, CollateOptions::default()).unwrap();
    let batches = loader.epoch_batches(0);
    let drawn = |steps: usize| -> BTreeSet<usize> { batches[..steps].iter().flatten().map(|&i| pairs[i].source_index).collect() };
    assert!(pairs.len() >= 100, "{}: the test wants a data set much larger than the rows used", inp.train.display());

    let run = dir.join("run");
    let s = run_train(&cfg(&run, 2));
    assert_eq!(s.reference_pairs_computed, 8 + 8, "2 steps of 4 training pairs, and the 8 eval pairs");
    // Eval pairs are computed in the evaluator's batches: at step 0 the policy is the reference, bit for bit.
    let step0 = s.initial_eval.as_ref().unwrap();
    assert_eq!((f(step0, "eval/rewards/margins"), f(step0, "eval/rewards/accuracies")), (0.0, 0.0), "step-0 rewards are exactly zero");
    let table = reference_table(&run, "train");
    assert_eq!(table.keys().copied().collect::<BTreeSet<_>>(), drawn(2), "the cache holds exactly the pairs the 2 steps drew, of {}", pairs.len());
    let used: Vec<&TokenizedPair> = table.keys().map(|&s| pairs.iter().find(|p| p.source_index == s).unwrap()).collect();
    for ((s, &(c, r)), (tc, tr)) in table.iter().zip(reference_by_ort(&art, &used, tok.pad_id())) {
        for (what, got, want) in [("chosen", c, tc), ("rejected", r, tr)] {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "pair {s} {what}: cached {got}, ONNX Runtime {want}");
        }
    }

    // Extending to 4 steps computes the 8 pairs steps 3 and 4 draw; cached rows are read, not recomputed.
    let file = run.join("reference").join(&reference_files(&run).into_iter().find(|f| f.0.starts_with("train-")).unwrap().0);
    let (mut tensors, _) = read_safetensors(&file).unwrap();
    // The file's first row (rows are by source index): a pair of steps 1-2, which steps 3 and 4 do not draw again.
    let planted = *table.keys().next().unwrap();
    tensors.iter_mut().find(|t| t.name == "ref_logps").unwrap().data[0] = -1234.5;
    write_safetensors(&file, &tensors, None).unwrap();
    let s = run_train(&TrainConfig { resume: true, ..cfg(&run, 4) });
    assert_eq!((s.steps, s.resumed_from, s.reference_pairs_computed), (4, Some(2), 8), "only the new steps' pairs are computed");
    let extended = reference_table(&run, "train");
    assert_eq!(extended.keys().copied().collect::<BTreeSet<_>>(), drawn(4));
    assert_eq!(extended[&planted].0, -1234.5, "a cached value was recomputed");

    // One run of 4 steps fills the same table, bit for bit (the planted row aside).
    let straight = dir.join("straight");
    assert_eq!(run_train(&cfg(&straight, 4)).reference_pairs_computed, 16 + 8);
    let once = reference_table(&straight, "train");
    let differing: Vec<usize> = once.iter().filter(|(s, v)| extended.get(s) != Some(v)).map(|(s, _)| *s).collect();
    assert_eq!(differing, vec![planted], "tables filled in one run and in two differ");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 7. Non-finite loss

#[test]
fn nonfinite_loss() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("nonfinite");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let data = head(&inp.train, 24, &dir, "train.jsonl");
    // lr 1e30: step 1 is finite, but moves every weight by ~1e30, so step 2's logits overflow.
    let a = |out: &Path, more: &[&str]| {
        let mut v = train_args(&art, &data, &inp.tokenizer, out, "--max-steps 5 --batch-size 4 --save-every 1 --threads 1 --lr 1e30 --quiet");
        v.extend(args(more));
        v
    };
    let stop = dir.join("stop");
    let e = assert_one_line_error(
        &run_bin(&a(&stop, &[]), &[]),
        &["non-finite", "at step 2", "step-1", "written from finite state", "--skip-nonfinite"],
        "non-finite loss",
    );
    eprintln!("{e}");
    assert_eq!(checkpoint::list(&stop).iter().map(|c| c.0).collect::<Vec<_>>(), vec![1], "only the finite step is saved");
    assert_eq!(checkpoint_entries(&stop), vec!["step-1"]);
    let ck = checkpoint::checkpoints_dir(&stop).join("step-1");
    assert_complete_checkpoint(&ck);
    let step1 = params(&ck.join(checkpoint::PARAMS));
    assert!(step1.iter().all(|t| t.data.iter().all(|x| x.is_finite())), "the checkpoint holds finite parameters");
    assert!(step1.iter().any(|t| t.data.iter().any(|x| x.abs() > 1e29)), "lr 1e30 should have moved the weights by ~1e30");
    assert_eq!(steps_of(&train_records(&stop)), vec![1], "the failed step is not logged");
    assert!(!stop.join("final").exists());

    // --skip-nonfinite: the bad steps are skipped (weights unchanged) and counted.
    let skip = dir.join("skip");
    let (code, stdout, err) = run_bin(&a(&skip, &["--skip-nonfinite"]), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("trained 5 steps"), "{stdout}");
    let recs = train_records(&skip);
    assert_eq!(steps_of(&recs), vec![1, 2, 3, 4, 5]);
    assert!(recs[0].get("skipped_nonfinite").is_none() && recs[0]["grad_norm"].is_number());
    for (i, r) in recs.iter().enumerate().skip(1) {
        assert_eq!(r["skipped_nonfinite"].as_u64(), Some(i as u64), "step {}", i + 1);
        assert!(r["grad_norm"].is_null(), "a skipped step has no gradient norm");
    }
    assert_eq!(state_of(&checkpoint::list(&skip).last().unwrap().1).skipped_nonfinite, 4);
    assert_bit_identical(&step1, &final_params(&skip), "skipped steps leave the step-1 weights unchanged");
    let _ = std::fs::remove_dir_all(&dir);
}
