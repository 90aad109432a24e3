//! What the `train_*` test files share: their inputs (`graphs/quickstart`, else `../shared/fixtures`), building
//! artifacts, configs and runs, reading a run's parameters, metrics and checkpoints, and running the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, Layout, ObjectiveConfig};
use betadpo::run_layout;
use betadpo::store::{read_safetensors, NamedTensor};
use betadpo::train::checkpoint::{self, TrainerState};
use betadpo::train::config::TrainConfig;
use betadpo::train::metrics::read_log;
use betadpo::train::schedule::Schedule;
use betadpo::train::trainer::{train, TrainSummary};
use serde_json::{Map, Value};

use super::fixtures::{quickstart, shared};

/// A model, its tokenizer (with `tokenizer_config.json` beside it) and TRL-format data.
pub struct Inputs {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub train: PathBuf,
    pub test: PathBuf,
    pub conversational: PathBuf,
    /// Implicit-prompt rows, when the source ships them.
    pub implicit: Option<PathBuf>,
    pub source: &'static str,
}

pub fn quickstart_inputs() -> Option<Inputs> {
    let q = quickstart();
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
        source: "the quickstart folder",
    })
}

pub fn shared_inputs() -> Option<Inputs> {
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
pub fn inputs() -> Option<Inputs> {
    let i = quickstart_inputs().or_else(shared_inputs);
    if i.is_none() {
        super::fixtures::skip("neither graphs/quickstart/model.onnx nor ../shared/fixtures is present");
    }
    i
}

pub fn artifacts(model: &Path, dir: &Path, objective: ObjectiveConfig) -> PathBuf {
    artifacts_in(LayoutChoice::Padded, model, dir, objective)
}

/// Artifacts of the given layout; `Packed` must succeed (the test models can be packed).
pub fn artifacts_in(layout: LayoutChoice, model: &Path, dir: &Path, objective: ObjectiveConfig) -> PathBuf {
    let out = dir.join("art");
    let report = build_artifacts(model, &out, &BuildOptions { objective, layout, ..Default::default() })
        .unwrap_or_else(|e| panic!("build-graph {}: {e}", model.display()));
    let expected = if layout == LayoutChoice::Packed { Layout::Packed } else { Layout::Padded };
    assert_eq!(report.manifest.layout, expected, "{}", model.display());
    out
}

/// The first `n` rows of a JSONL file, written to `dir/name`.
pub fn head(src: &Path, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let body: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    let out = dir.join(name);
    std::fs::write(&out, body).unwrap();
    out
}

/// A small, deterministic configuration (one intra-op thread: bit-identical reruns).
pub fn config(art: &Path, data: &Path, inp: &Inputs, out: &Path, steps: u64) -> TrainConfig {
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

pub fn run_train(cfg: &TrainConfig) -> TrainSummary {
    train(cfg).unwrap_or_else(|e| panic!("train into {}: {e}", cfg.out.display()))
}

pub fn params(path: &Path) -> Vec<NamedTensor> {
    read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).0
}

pub fn final_params(run: &Path) -> Vec<NamedTensor> {
    params(&run.join(run_layout::FINAL_DIR).join(run_layout::PARAMS))
}

/// Same tensor names, shapes and bit patterns.
pub fn assert_bit_identical(a: &[NamedTensor], b: &[NamedTensor], what: &str) {
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

pub fn metrics(run: &Path) -> Vec<Map<String, Value>> {
    read_log(&run.join(run_layout::METRICS_FILE)).unwrap()
}

/// Training records (not evaluation ones).
pub fn train_records(run: &Path) -> Vec<Map<String, Value>> {
    metrics(run).into_iter().filter(|r| r.contains_key("loss")).collect()
}

pub fn eval_records(run: &Path) -> Vec<Map<String, Value>> {
    metrics(run).into_iter().filter(|r| r.contains_key("eval/loss")).collect()
}

pub fn steps_of(records: &[Map<String, Value>]) -> Vec<u64> {
    records.iter().map(|r| r["step"].as_u64().unwrap()).collect()
}

/// Every value except the wall-clock times must agree.
pub fn assert_same_records(a: &[Map<String, Value>], b: &[Map<String, Value>], what: &str) {
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

pub fn f(rec: &Map<String, Value>, key: &str) -> f64 {
    rec.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("metric {key} missing or null in {rec:?}"))
}

/// Names of the entries of RUN/checkpoints, sorted.
pub fn checkpoint_entries(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run_layout::checkpoints_dir(run))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A `step-N` directory holds a loadable state for step N, parameters and moments.
pub fn assert_complete_checkpoint(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let step: u64 = name.strip_prefix("step-").and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("unexpected checkpoint entry {name}"));
    for f in [run_layout::PARAMS, run_layout::OPTIMIZER, run_layout::STATE] {
        assert!(dir.join(f).is_file(), "{}: {f} is missing (incomplete checkpoint)", dir.display());
    }
    let l = checkpoint::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert_eq!(l.state.step, step, "{}: trainer_state step", dir.display());
    assert!(!l.params.is_empty() && l.moments.len() == 2 * l.params.len(), "{}: {} params, {} moments", dir.display(), l.params.len(), l.moments.len());
}

pub fn state_of(dir: &Path) -> TrainerState {
    checkpoint::load(dir).unwrap().state
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_betadpo"))
}

pub fn run_bin(args: &[String], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = bin();
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `betadpo train` on these inputs, then `flags` (values without spaces).
pub fn train_args(art: &Path, data: &Path, tokenizer: &Path, out: &Path, flags: &str) -> Vec<String> {
    let mut a = args(&["train", "--artifacts", &s(art), "--data", &s(data), "--tokenizer", &s(tokenizer), "--out", &s(out), "--lr", "1e-3"]);
    a.extend(words(flags));
    a
}

/// Flags without spaces in their values, as one string.
pub fn words(flags: &str) -> Vec<String> {
    flags.split_whitespace().map(String::from).collect()
}

/// Non-zero exit and exactly one non-blank stderr line, starting with `error` and containing every needle.
pub fn assert_one_line_error(out: &(i32, String, String), needles: &[&str], what: &str) -> String {
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
pub struct Rng(pub u64);
impl Rng {
    pub fn from_env_or_clock() -> Self {
        let seed = std::env::var("BETADPO_TEST_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
        eprintln!("kill-delay seed: {seed} (BETADPO_TEST_SEED={seed} replays it)");
        Rng(seed)
    }
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 8 straight steps and 4 steps + `--resume` to 8 (two micro-batches a step, a checkpoint every
/// 2 steps, a constant schedule: with a decaying one a 4-step run's rates are not those of an 8-step
/// run's first 4 steps) must agree bit for bit: parameters, loop state, metrics. Returns both runs.
pub fn straight_and_resumed(art: &Path, data: &Path, inp: &Inputs, dir: &Path) -> (PathBuf, PathBuf) {
    let base = |out: &Path, steps: u64| TrainConfig { grad_accum: 2, save_every: 2, lr_schedule: Schedule::Constant, ..config(art, data, inp, out, steps) };
    let straight = dir.join("straight");
    let s = run_train(&base(&straight, 8));
    assert_eq!((s.steps, s.resumed_from), (8, None));
    let split = dir.join("split");
    assert_eq!(run_train(&base(&split, 4)).steps, 4);
    assert_eq!(state_of(&run_layout::checkpoint_dir(&split, 4)).step, 4);
    let s = run_train(&TrainConfig { resume: true, ..base(&split, 8) });
    assert_eq!((s.steps, s.resumed_from), (8, Some(4)));
    assert_bit_identical(&final_params(&straight), &final_params(&split), "final params, 8 steps vs 4 + resume to 8");
    let state = |run: &Path| state_of(&run_layout::checkpoint_dir(run, 8));
    assert_eq!(state(&straight), state(&split));
    assert_same_records(&train_records(&straight), &train_records(&split), "metrics, straight vs resumed");
    (straight, split)
}

/// The reference log-prob cache files of a run: name, modification time, bytes.
pub fn reference_files(run: &Path) -> Vec<(String, SystemTime, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(run.join("reference"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().modified().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
