//! Hostile artifacts and output folders (issue 24): a rebuild over artifacts that hold a run, an
//! export or a user's files; quickstart over a folder with a user's file; a directory another
//! process holds; FIFOs, devices and links out of the folder in place of the artifacts' files;
//! `--model`, `--data` and `--tokenizer` that are FIFOs; a `--train` pattern matching nothing.
//! Each command runs under a timeout; each refusal is one line, a non-zero exit, and nothing the
//! command was pointed at changes.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures::scratch;
use common::fixtures::{quickstart, quickstart_artifacts as artifacts};
use common::hostile::{assert_unchanged, fifo, fingerprint, link, refused, run_ok, strs, train_args};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn build_args<'a>(model: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["build-graph", "--model", s(model), "--out", s(out), "-q"]
}

#[test]
fn a_rebuild_over_artifacts_holding_a_run_an_export_and_notes_is_refused() {
    let dir = scratch("rebuild-foreign");
    let art = artifacts(&dir);
    let model = quickstart().join("model.onnx");
    // a rebuild over artifacts holding only betadpo's files replaces them
    run_ok(&build_args(&model, &art));
    run_ok(&strs(&train_args(&art, &art.join("myrun"), 1)));
    run_ok(&["export", "--run", s(&art.join("myrun")), "--out", s(&art.join("m.onnx"))]);
    std::fs::write(art.join("NOTES.md"), "my notes").unwrap();
    std::fs::copy(quickstart().join("tokenizer.json"), art.join("tokenizer.json")).unwrap();
    let before = fingerprint(&dir);
    refused(&build_args(&model, &art), &["NOTES.md", "m.onnx", "myrun", "tokenizer.json", "which betadpo did not write there"]);
    assert_unchanged(&dir, &before, "a refused rebuild");
}

#[test]
fn quickstart_refuses_a_folder_of_its_own_holding_a_users_file() {
    let q = scratch("quickstart-foreign").join("q");
    std::fs::create_dir_all(q.join("artifacts")).unwrap();
    std::fs::write(q.join(betadpo::output_dir::MARKER), "quickstart").unwrap();
    std::fs::write(q.join("NOTES.md"), "keep me").unwrap();
    let before = fingerprint(&q);
    refused(&["quickstart", "--steps", "2", "--out", s(&q), "--quiet"], &["NOTES.md", "which betadpo did not write there"]);
    assert_unchanged(&q, &before, "a refused quickstart");
}

#[test]
fn a_directory_another_process_holds_is_refused_naming_its_pid() {
    let dir = scratch("held-artifacts");
    let art = artifacts(&dir);
    // stand in for a live betadpo process: hold the lock as it would, with its pid in the file
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(art.join(betadpo::dir_lock::LOCK_FILE)).unwrap();
    // the build above held the lock in this process: a child that another test thread forked meanwhile
    // holds a copy of that descriptor until it executes its program (close-on-exec), so wait for that
    let waited = std::time::Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if waited.elapsed() < std::time::Duration::from_secs(30) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    std::fs::write(art.join(betadpo::dir_lock::LOCK_FILE), "4242 build-graph\n").unwrap();
    let before = fingerprint(&dir);
    let model = quickstart().join("model.onnx");
    refused(&build_args(&model, &art), &["in use by betadpo process 4242 (build-graph)"]);
    assert_unchanged(&dir, &before, "a rebuild of held artifacts");
    drop(lock);
    run_ok(&build_args(&model, &art));
}

/// Every command reading `art` is refused with `needles` and changes nothing.
fn readers_refused(dir: &Path, art: &Path, needles: &[&str]) {
    let before = fingerprint(dir);
    let run = dir.join(format!("run-{}", before.len()));
    refused(&strs(&train_args(art, &run, 2)), needles);
    assert!(!run.exists(), "a refused train left {}", run.display());
    refused(&["validate", s(art)], needles);
    let out = dir.join("export.onnx");
    refused(&["export", "--artifacts", s(art), "--out", s(&out)], needles);
    assert!(!out.exists());
    assert_unchanged(dir, &before, &format!("readers refused with {needles:?}"));
}

#[test]
fn fifos_devices_and_links_out_of_the_artifacts_are_refused_without_hanging() {
    let dir = scratch("artifacts-hostile-files");
    let art = artifacts(&dir);
    let params = art.join("params.safetensors");
    let keep = std::fs::read(&params).unwrap();
    link(&params, Path::new("/dev/zero"));
    readers_refused(&dir, &art, &["params.safetensors", "kernel file"]);
    // a real parameters file, but elsewhere: not followed out of the artifacts
    let elsewhere = dir.join("elsewhere.safetensors");
    std::fs::write(&elsewhere, &keep).unwrap();
    link(&params, &elsewhere);
    readers_refused(&dir, &art, &["params.safetensors", "outside"]);
    for name in ["params.safetensors", "train.onnx", "manifest.json"] {
        let file = art.join(name);
        let keep_this = if name == "params.safetensors" { keep.clone() } else { std::fs::read(&file).unwrap() };
        fifo(&file);
        readers_refused(&dir, &art, &[name, "is a FIFO"]);
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, &keep_this).unwrap();
    }
    // a link inside the artifacts to a file inside them is allowed
    let inner = art.join("params-copy.safetensors");
    std::fs::write(&inner, &keep).unwrap();
    link(&params, Path::new("params-copy.safetensors"));
    run_ok(&["validate", s(&art)]);
}

#[test]
fn a_model_data_or_tokenizer_that_is_a_fifo_is_refused_without_hanging() {
    let dir = scratch("fifo-inputs");
    let q = quickstart();
    let model = dir.join("model.onnx");
    fifo(&model);
    let out = dir.join("art");
    refused(&build_args(&model, &out), &["model.onnx", "is a FIFO"]);
    assert!(!out.exists());
    let art = artifacts(&dir);
    let run = dir.join("run");
    let mut args = train_args(&art, &run, 2);
    let data = dir.join("train.jsonl");
    fifo(&data);
    let at = args.iter().position(|a| a == "--data").unwrap() + 1;
    args[at] = s(&data).into();
    refused(&strs(&args), &["train.jsonl", "is a FIFO"]);
    args[at] = s(&q.join("train.jsonl")).into();
    let tok = dir.join("tokenizer.json");
    fifo(&tok);
    let at = args.iter().position(|a| a == "--tokenizer").unwrap() + 1;
    args[at] = s(&tok).into();
    refused(&strs(&args), &["tokenizer.json", "is a FIFO"]);
    assert!(!run.exists());
    refused(&["build-graph", "--model", "/dev/zero", "--out", s(&dir.join("art2"))], &["/dev/zero", "kernel file"]);
}

#[test]
fn a_train_pattern_that_matches_no_weight_is_refused() {
    let dir = scratch("train-nomatch");
    let model = quickstart().join("model.onnx");
    let out = dir.join("art");
    for flag in ["--train", "--freeze"] {
        let mut args = build_args(&model, &out);
        args.extend([flag, "nomatch"]);
        refused(&args, &[flag, "\"nomatch\" matches none of the model's"]);
        assert!(!out.exists());
    }
}

/// The files a rebuild replaces are only betadpo's: a rebuild of clean artifacts succeeds and
/// leaves no lock or temporary file in the parent folder.
#[test]
fn a_rebuild_of_clean_artifacts_succeeds() {
    let dir = scratch("rebuild-clean");
    let art = artifacts(&dir);
    run_ok(&build_args(&quickstart().join("model.onnx"), &art));
    let names: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(names, [art], "only the artifacts in {}", dir.display());
}
