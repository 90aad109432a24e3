//! Locating test fixtures: the shared PyTorch-generated ones (skipped with a notice when absent on
//! a developer's machine, a failure under `CI=true`) and the repository's own under tests/fixtures.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bundled quickstart folder (`graphs/quickstart`): tiny model, tokenizer and data in every clone, so a test
/// that uses it needs no `../shared`.
pub fn quickstart() -> PathBuf {
    repo().join("graphs/quickstart")
}

/// The quickstart folder's model.
pub fn quickstart_model() -> PathBuf {
    quickstart().join("model.onnx")
}

/// Artifacts of the quickstart model with the default options, built in-process into `dir/art`.
pub fn quickstart_artifacts(dir: &Path) -> PathBuf {
    let art = dir.join("art");
    betadpo::dpo::build_artifacts(&quickstart_model(), &art, &Default::default()).unwrap();
    art
}

/// Says why the caller skips. CI always has `../shared` and the Python packages `.ci/run`
/// installs, so under `CI=true` a skip is a failure, never silent.
pub fn skip(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "CI=true and {why}: a test may not skip in CI (.ci/run installs what the tests need)");
    eprintln!("notice: {why}; skipping");
}

/// Whether `python3` can import `modules` (e.g. "onnxruntime, numpy"); otherwise says why the caller
/// skips `purpose` (see [`skip`]).
pub fn python_imports(modules: &str, purpose: &str) -> bool {
    let ok = std::process::Command::new("python3").args(["-c", &format!("import {modules}")]).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        skip(&format!("python3 cannot import {modules} ({purpose})"));
    }
    ok
}

/// `../shared/fixtures/<sub>` when present; otherwise says why the caller skips (see [`skip`]).
pub fn shared(sub: &str) -> Option<PathBuf> {
    let p = repo().join("../shared/fixtures").join(sub);
    if p.exists() {
        Some(p)
    } else {
        skip(&format!("{} is absent", p.display()));
        None
    }
}

/// The repository's own fixture models (tests/fixtures/models/<family>) that carry goldens.
pub fn own_models() -> Vec<PathBuf> {
    let dir = repo().join("tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("golden.safetensors").exists()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// All fixture model directories with goldens: shared first, then our own.
pub fn all_models() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for s in ["tiny-gpt2-ts", "tiny-llama-dynamo"] {
        if let Some(p) = shared(s) {
            v.push(p);
        }
    }
    v.extend(own_models());
    v
}

/// A fresh directory for one test's files. Each test process first removes the scratch directories of test
/// processes that have ended, so a run keeps its own files for inspection until the next run, and no more.
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_scratch_of_ended_processes);
    // tests run in parallel threads of one process: two tests asking for the same name would share (and
    // delete) each other's folder, so a claim from a second test fails here rather than as a race (one
    // test may reuse its own name: its uses are sequential)
    static CLAIMED: std::sync::Mutex<Vec<(String, std::thread::ThreadId)>> = std::sync::Mutex::new(Vec::new());
    let me = std::thread::current().id();
    let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    let other = claimed.iter().any(|(c, by)| c == name && *by != me);
    assert!(!other, "scratch folder {name:?} claimed by two tests of this binary: give each its own name");
    claimed.push((name.to_string(), me));
    drop(claimed);
    let d = std::env::temp_dir().join(format!("betadpo-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn remove_scratch_of_ended_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("betadpo-test-").and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The float32 and int64 tensors of a fixture's safetensors file (goldens, references).
pub struct Tensors {
    pub f32s: HashMap<String, ArrayD<f32>>,
    pub i64s: HashMap<String, ArrayD<i64>>,
}

pub fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t = Tensors { f32s: HashMap::new(), i64s: HashMap::new() };
    for (name, v) in st.tensors() {
        let shape = IxDyn(v.shape());
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let d: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                t.f32s.insert(name, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            safetensors::Dtype::I64 => {
                let d: Vec<i64> = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                t.i64s.insert(name, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            other => panic!("{}: unexpected dtype {other:?}", path.display()),
        }
    }
    t
}
