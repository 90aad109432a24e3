//! Fuzzing every other file betadpo reads (issue 11, part 5): the artifacts' manifest and
//! parameters, checkpoints, the tokenizer and its config, and preference data (JSONL and JSON
//! arrays). Seeded byte mutations of real files run through the library's readers in-process, in
//! thousands; a few run through `betadpo validate` / `train` to check the whole command: one error
//! line, a non-zero exit, nothing written. Accepted mutations are fine too.
//!
//! Issue 24 adds the Hugging Face name map, chat templates (run with their fuel and output and
//! memory limits) and rows read under a row-size limit; [`CASES`] holds every kind's count, at
//! least 20,000 in all.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use betadpo::dpo::Manifest;
use betadpo::run_layout;
use betadpo::store::{read_safetensors, RawTensor};
use betadpo::text::truncation::TruncationMode;
use betadpo::text::{load_preferences, LoadOptions, PairTokenizer, TruncationConfig};
use betadpo::train::checkpoint::{self, TrainerState};
use common::fixtures::quickstart;
use common::fuzz::{case_count, run, snapshot, Mutator};

const SEED: u64 = 0x5eed_f11e;
const BOUND: Duration = Duration::from_secs(20);

/// Seeded cases per file kind (scaled by `BETADPO_FUZZ_CASES`).
const CASES: &[(&str, usize)] = &[
    ("manifest.json", 2000),
    ("params.safetensors", 2000),
    ("trainer_state.json", 2000),
    ("checkpoint params", 400),
    ("checkpoint moments", 400),
    ("tokenizer_config.json", 2000),
    ("tokenizer.json", 500),
    ("conversational.jsonl", 2000),
    ("array.json", 1000),
    ("standard.jsonl", 1000),
    ("implicit.jsonl", 1000),
    ("hf_export.json", 2500),
    ("chat_template.jinja", 2500),
    ("rows under a size limit", 1500),
];

fn cases(kind: &str) -> usize {
    case_count(CASES.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n).expect("a kind of CASES"))
}

#[test]
fn at_least_twenty_thousand_cases_in_all() {
    assert!(CASES.iter().map(|(_, n)| n).sum::<usize>() >= 20_000);
}

/// Artifacts of the quickstart model, built once per test process.
fn artifacts() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| {
        let art = common::fixtures::scratch("fuzz-files-art").join("art");
        betadpo::dpo::build_artifacts(&quickstart().join("model.onnx"), &art, &Default::default()).unwrap();
        art
    })
}

/// A copy of `src`'s files in a fresh scratch directory.
fn copy_dir(src: &Path, name: &str) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    dir
}

/// Fuzzes the file `dir/file` with `read` (given `dir`), and checks that nothing else in `dir`
/// changed.
fn fuzz_file(name: &str, dir: &Path, file: &str, cases: usize, salt: u64, read: impl Fn(&Path) -> betadpo::Result<()> + Send + Sync + 'static) {
    let seed = std::fs::read(dir.join(file)).unwrap();
    let target = dir.join(file);
    let others = |d: &Path| snapshot(d).into_iter().filter(|(p, ..)| *p != target).collect::<Vec<_>>();
    let before = others(dir);
    let (d, t) = (dir.to_path_buf(), target.clone());
    let json = file.ends_with(".json") || file.ends_with(".jsonl");
    let make = |i: usize| {
        let mut m = Mutator::new(SEED ^ salt.wrapping_add(i as u64));
        if json && i % 2 == 1 {
            m.mutate_json(&seed)
        } else {
            m.mutate(&seed)
        }
    };
    let outcome = run(name, cases, BOUND, make, move |_, bytes: Vec<u8>| {
        std::fs::write(&t, &bytes).unwrap();
        read(&d).map_err(|e| e.to_string())
    });
    assert_eq!(before, others(dir), "{name}: a reader changed its directory");
    std::fs::write(&target, &seed).unwrap();
    assert!(outcome.refused > 0, "{name}: no mutation was refused: {outcome:?}");
}

/// What reading artifacts involves before any session: the manifest, the files it names and the
/// parameters it lists.
fn read_artifacts(dir: &Path) -> betadpo::Result<()> {
    let m = Manifest::load(dir)?;
    let (tensors, _) = read_safetensors(&dir.join(&m.parameters_file))?;
    for p in &m.parameters {
        let t = tensors.iter().find(|t| t.name == p.name).ok_or_else(|| betadpo::Error::ParameterMismatch(format!("no parameter {}", p.name)))?;
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
    }
    for g in m.graphs.values() {
        betadpo::onnx::load_model(&dir.join(&g.file))?;
    }
    Ok(())
}

#[test]
fn manifest() {
    let dir = copy_dir(artifacts(), "fuzz-manifest");
    fuzz_file("manifest.json", &dir, "manifest.json", cases("manifest.json"), 1, read_artifacts);
}

#[test]
fn parameters() {
    let dir = copy_dir(artifacts(), "fuzz-params");
    fuzz_file("params.safetensors", &dir, "params.safetensors", cases("params.safetensors"), 2, read_artifacts);
}

/// A checkpoint as training writes it, of the quickstart parameters.
fn checkpoint_dir() -> PathBuf {
    let run = common::fixtures::scratch("fuzz-checkpoint");
    let (params, _) = read_safetensors(&artifacts().join("params.safetensors")).unwrap();
    let raw: Vec<RawTensor> = params.iter().map(|t| RawTensor::of_f32(&t.name, t.shape.clone(), &t.data)).collect();
    let moments: Vec<RawTensor> = params.iter().map(|t| RawTensor::of_f32(&t.name, t.shape.clone(), &t.data)).collect();
    let state = TrainerState {
        step: 3,
        position: Default::default(),
        tokens: 300,
        skipped_nonfinite: 0,
        updates: 3,
        run_key: "k".into(),
        margin_stats: Default::default(),
        epsilon_beta: None,
        loss_scale: None,
    };
    checkpoint::save(&run, &state, &raw, &moments, 2).unwrap()
}

#[test]
fn checkpoints() {
    let dir = checkpoint_dir();
    let load = |d: &Path| checkpoint::load(d).map(|_| ());
    fuzz_file("trainer_state.json", &dir, run_layout::STATE, cases("trainer_state.json"), 3, load);
    fuzz_file("checkpoint params", &dir, run_layout::PARAMS, cases("checkpoint params"), 4, load);
    fuzz_file("checkpoint moments", &dir, run_layout::OPTIMIZER, cases("checkpoint moments"), 5, load);
    // counters a resume would do arithmetic with: corrupt beyond any real run
    let state = std::fs::read_to_string(dir.join(run_layout::STATE)).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&state).unwrap();
    v["position"]["epoch"] = serde_json::json!(u64::MAX);
    std::fs::write(dir.join(run_layout::STATE), v.to_string()).unwrap();
    let err = checkpoint::load(&dir).err().expect("refused").to_string();
    assert!(err.contains("position.epoch 18446744073709551615 is beyond any real run"), "{err}");
    std::fs::write(dir.join(run_layout::STATE), state.replace("\"updates\": 3", "\"updates\": 4")).unwrap();
    let err = checkpoint::load(&dir).err().expect("refused").to_string();
    assert!(err.contains("updates 4 and skipped steps 0 cannot exceed steps 3"), "{err}");
}

/// Standard and conversational rows, tokenized: what `train` does with a tokenizer and its config.
fn tokenize_sample(dir: &Path) -> betadpo::Result<()> {
    let tok = PairTokenizer::from_files(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")))?;
    for file in ["test_conversational.jsonl", "test_implicit.jsonl"] {
        let data = load_preferences(&dir.join(file), &LoadOptions::default())?;
        tok.tokenize_all(&data.rows[..3], &TruncationConfig { max_length: Some(64), mode: TruncationMode::KeepEnd })?;
    }
    Ok(())
}

fn tokenizer_dir(name: &str) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    for f in ["tokenizer.json", "tokenizer_config.json", "test_conversational.jsonl", "test_implicit.jsonl"] {
        std::fs::copy(quickstart().join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn tokenizer_and_config() {
    let dir = tokenizer_dir("fuzz-tokenizer");
    fuzz_file("tokenizer_config.json", &dir, "tokenizer_config.json", cases("tokenizer_config.json"), 6, tokenize_sample);
    fuzz_file("tokenizer.json", &dir, "tokenizer.json", cases("tokenizer.json"), 7, tokenize_sample);
}

/// Rows loaded and tokenized (conversational ones rendered with the chat template).
fn load_and_tokenize(path: &Path) -> betadpo::Result<()> {
    static TOK: OnceLock<PairTokenizer> = OnceLock::new();
    let tok = TOK.get_or_init(|| PairTokenizer::from_files(&quickstart().join("tokenizer.json"), None).unwrap());
    for skip_bad_rows in [false, true] {
        let data = load_preferences(path, &LoadOptions { skip_bad_rows, ..Default::default() })?;
        tok.tokenize_all(&data.rows, &TruncationConfig { max_length: Some(64), ..Default::default() })?;
    }
    Ok(())
}

#[test]
fn preference_data() {
    let fixtures = common::fixtures::repo().join("tests/fixtures/data");
    let dir = common::fixtures::scratch("fuzz-data");
    let q = quickstart();
    let conversational: String = std::fs::read_to_string(q.join("test_conversational.jsonl")).unwrap().lines().take(8).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("conversational.jsonl"), conversational).unwrap();
    for (k, file) in ["conversational.jsonl", "array.json", "standard.jsonl", "implicit.jsonl"].into_iter().enumerate() {
        if !dir.join(file).exists() {
            std::fs::copy(fixtures.join(file), dir.join(file)).unwrap();
        }
        let f = file.to_string();
        fuzz_file(file, &dir, file, cases(file), 8 + 800 * k as u64, move |d| load_and_tokenize(&d.join(&f)));
    }
}

/// The Hugging Face name map the artifacts carry, read and checked as `export --hf` does before
/// it writes anything.
#[test]
fn hf_name_map() {
    let dir = copy_dir(artifacts(), "fuzz-hf-map");
    let read = |d: &Path| betadpo::dpo::export::hf::map::HfMap::load(&d.join("hf_export.json")).map(|_| ());
    fuzz_file("hf_export.json", &dir, "hf_export.json", cases("hf_export.json"), 40, read);
}

/// Chat templates (`chat_template.jinja` beside a tokenizer whose config has none) compiled and
/// rendered on conversational rows, under their fuel, output and memory limits.
#[test]
fn chat_templates() {
    let dir = tokenizer_dir("fuzz-template");
    let config = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let template = cfg.as_object_mut().unwrap().remove("chat_template").unwrap();
    std::fs::write(&config, cfg.to_string()).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), template.as_str().unwrap()).unwrap();
    let render = |d: &Path| {
        let tok = PairTokenizer::from_files(&d.join("tokenizer.json"), None)?;
        let data = load_preferences(&d.join("test_conversational.jsonl"), &LoadOptions::default())?;
        data.rows[..3].iter().try_for_each(|row| tok.texts(row).map(|_| ()))
    };
    fuzz_file("chat_template.jinja", &dir, "chat_template.jinja", cases("chat_template.jinja"), 41, render);
}

/// Rows read under a small row-size limit, JSONL streamed and JSON arrays split, as `train` and
/// `infer --file` read them: long rows refused (or skipped) before they are parsed.
#[test]
fn rows_under_a_size_limit() {
    let fixtures = common::fixtures::repo().join("tests/fixtures/data");
    for (k, file) in ["standard.jsonl", "array.json"].into_iter().enumerate() {
        let dir = common::fixtures::scratch(&format!("fuzz-rows-{k}"));
        std::fs::copy(fixtures.join(file), dir.join(file)).unwrap();
        let f = file.to_string();
        let read = move |d: &Path| {
            for skip_bad_rows in [false, true] {
                load_preferences(&d.join(&f), &LoadOptions { skip_bad_rows, max_row_bytes: 160, ..Default::default() })?;
            }
            Ok(())
        };
        fuzz_file(file, &dir, file, cases("rows under a size limit") / 2, 42 + k as u64, read);
    }
}

fn betadpo(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_betadpo")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into())
}

fn assert_one_error_line(err: &str, what: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() == 1 && lines[0].starts_with("error: "), "{what}: {err}");
}

/// Whole commands on mutated artifacts and data: `validate` on a mutated manifest or parameters
/// file, `train` on mutated data. A failure is one line, and a failed `train` leaves no run
/// directory.
#[test]
fn commands_end_to_end() {
    let q = quickstart();
    let (mut ok, mut refused) = (0, 0);
    for (k, file) in ["manifest.json", "params.safetensors"].iter().enumerate() {
        let dir = copy_dir(artifacts(), &format!("fuzz-e2e-{k}"));
        let seed = std::fs::read(dir.join(file)).unwrap();
        for i in 0..case_count(4) {
            std::fs::write(dir.join(file), Mutator::new(SEED * 17 + (k * 100 + i) as u64).mutate(&seed)).unwrap();
            let before = snapshot(&dir);
            let (code, err) = betadpo(&["validate", dir.to_str().unwrap()]);
            assert_eq!(before, snapshot(&dir), "validate changed the artifacts");
            if code == 0 {
                ok += 1;
            } else {
                refused += 1;
                // validate reports failed checks in its table; errors before the checks are one line
                if err.trim().lines().count() > 0 {
                    assert_one_error_line(&err, &format!("validate, mutated {file} case {i}"));
                }
            }
        }
    }
    let dir = common::fixtures::scratch("fuzz-e2e-train");
    let data = std::fs::read(common::fixtures::repo().join("tests/fixtures/data/standard.jsonl")).unwrap();
    for i in 0..case_count(4) {
        let path = dir.join(format!("data-{i}.jsonl"));
        std::fs::write(&path, Mutator::new(SEED * 19 + i as u64).mutate(&data)).unwrap();
        let out = dir.join(format!("run-{i}"));
        let (code, err) = betadpo(&[
            "train",
            "--artifacts",
            artifacts().to_str().unwrap(),
            "--data",
            path.to_str().unwrap(),
            "--tokenizer",
            q.join("tokenizer.json").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--max-steps",
            "1",
            "--batch-size",
            "1",
        ]);
        if code == 0 {
            ok += 1;
        } else {
            refused += 1;
            assert_one_error_line(&err, &format!("train, mutated data case {i}"));
            assert!(!out.exists(), "a failed start must not create {}", out.display());
        }
    }
    eprintln!("commands end to end: {ok} succeeded, {refused} refused");
    assert!(refused > 0);
}
