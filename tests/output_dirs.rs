//! betadpo never deletes or overwrites what it did not write: `quickstart --out`, `build-graph
//! --out`, `train --out` and `export --out` refuse a user's directory or file in one line and leave
//! it byte for byte as it was, while their own earlier output is still replaced or resumed.

mod common;

use std::path::{Path, PathBuf};

use common::cli::{assert_one_line_error, betadpo};

/// A user's directory: a note and a sub-directory, checked unchanged after every refusal.
fn notes(dir: &Path) -> PathBuf {
    let notes = dir.join("notes");
    std::fs::create_dir_all(notes.join("drafts")).unwrap();
    std::fs::write(notes.join("todo.md"), "keep me").unwrap();
    std::fs::write(notes.join("drafts/a.txt"), "and me").unwrap();
    notes
}

fn assert_untouched(notes: &Path) {
    let mut names: Vec<String> = walk(notes).iter().map(|p| p.strip_prefix(notes).unwrap().display().to_string()).collect();
    names.sort();
    assert_eq!(names, ["drafts", "drafts/a.txt", "todo.md"], "{} changed", notes.display());
    assert_eq!(std::fs::read_to_string(notes.join("todo.md")).unwrap(), "keep me");
    assert_eq!(std::fs::read_to_string(notes.join("drafts/a.txt")).unwrap(), "and me");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        v.push(e.path());
        if e.path().is_dir() {
            v.extend(walk(&e.path()));
        }
    }
    v
}

fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &common::tiny_lm::model(&["Tanh"]));
    path
}

#[test]
fn build_graph_replaces_only_its_own_artifacts() {
    let dir = common::fixtures::scratch("own-build");
    let model = tiny_model(&dir);
    let m = model.to_str().unwrap();
    let notes = notes(&dir);
    assert_one_line_error(&["build-graph", "--model", m, "--out", notes.to_str().unwrap()], "does not hold betadpo artifacts");
    assert_untouched(&notes);
    let file = dir.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    assert_one_line_error(&["build-graph", "--model", m, "--out", file.to_str().unwrap()], "is not a directory");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    // A symbolic link to artifacts is not replaced either (the link would be lost).
    let art = dir.join("art");
    let (code, _, err) = betadpo(&["build-graph", "--model", m, "--out", art.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let link = dir.join("link");
    std::os::unix::fs::symlink(&art, &link).unwrap();
    assert_one_line_error(&["build-graph", "--model", m, "--out", link.to_str().unwrap()], "symbolic link");
    // Its own artifacts are rebuilt in place; an empty directory is taken.
    let (code, _, err) = betadpo(&["build-graph", "--model", m, "--out", art.to_str().unwrap(), "--quiet", "--fixed-beta", "0.2"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read_to_string(art.join("manifest.json")).unwrap().contains("\"fixed_beta\": 0.2"));
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, err) = betadpo(&["build-graph", "--model", m, "--out", empty.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn quickstart_clears_only_an_earlier_quickstart() {
    let dir = common::fixtures::scratch("own-quickstart");
    let notes = notes(&dir);
    assert_one_line_error(&["quickstart", "--out", notes.to_str().unwrap(), "--quiet"], "does not hold an earlier quickstart's output");
    assert_untouched(&notes);
    // Artifacts are betadpo's, but not a quickstart's: clearing them would be a surprise too.
    let art = dir.join("art");
    let model = tiny_model(&dir);
    let (code, _, err) = betadpo(&["build-graph", "--model", model.to_str().unwrap(), "--out", art.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    assert_one_line_error(&["quickstart", "--out", art.to_str().unwrap(), "--quiet"], "quickstart");
    assert!(art.join("manifest.json").exists());
}

#[test]
fn train_writes_only_into_its_own_runs() {
    let dir = common::fixtures::scratch("own-train");
    let notes = notes(&dir);
    let args = |out: &Path| -> Vec<String> {
        ["train", "--artifacts", "unused", "--data", "unused.jsonl", "--tokenizer", "unused.json", "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let a = args(&notes);
    assert_one_line_error(&a.iter().map(String::as_str).collect::<Vec<_>>(), "does not hold a betadpo run");
    assert_untouched(&notes);
    // A run directory of an earlier run (its marker) is not refused: the error is about the next thing.
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("reference-cache.bin"), "x").unwrap();
    std::fs::write(run.join(".betadpo-output"), "run").unwrap();
    let a = args(&run);
    let (code, _, err) = betadpo(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0);
    assert!(!err.contains("does not hold") && err.contains("manifest.json"), "{err}");
}

#[test]
fn export_overwrites_only_models_it_wrote() {
    let dir = common::fixtures::scratch("own-export");
    let model = tiny_model(&dir);
    let art = dir.join("art");
    let (code, _, err) = betadpo(&["build-graph", "--model", model.to_str().unwrap(), "--out", art.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    // A run whose parameters are the initial ones: export needs only its config and parameters.
    let run = dir.join("run");
    std::fs::create_dir_all(run.join(betadpo::run_layout::FINAL_DIR)).unwrap();
    std::fs::copy(art.join("params.safetensors"), run.join("final/params.safetensors")).unwrap();
    let cfg = serde_json::to_string(&betadpo::train::config::TrainConfig { artifacts: art.clone(), ..Default::default() }).unwrap();
    std::fs::write(run.join("train_config.json"), cfg).unwrap();
    let r = run.to_str().unwrap();
    // The user's own model, and a file that is no model at all, stay as they are.
    let theirs = dir.join("theirs.onnx");
    std::fs::copy(&model, &theirs).unwrap();
    let before = std::fs::read(&theirs).unwrap();
    assert_one_line_error(&["export", "--run", r, "--out", theirs.to_str().unwrap()], "is not an ONNX model written by betadpo");
    assert_eq!(std::fs::read(&theirs).unwrap(), before);
    let text = dir.join("notes.txt");
    std::fs::write(&text, "keep me").unwrap();
    assert_one_line_error(&["export", "--run", r, "--out", text.to_str().unwrap()], "is not an ONNX model written by betadpo");
    assert_eq!(std::fs::read_to_string(&text).unwrap(), "keep me");
    let orphan = dir.join("orphan.onnx");
    std::fs::write(dir.join("orphan.onnx.data"), "weights of something else").unwrap();
    assert_one_line_error(&["export", "--run", r, "--out", orphan.to_str().unwrap()], "exists beside a model that does not");
    // Its own export is overwritten.
    let ours = dir.join("ours.onnx");
    for _ in 0..2 {
        let (code, _, err) = betadpo(&["export", "--run", r, "--out", ours.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
}
