//! A training run that fails before starting leaves no run directory behind.

mod common;

use std::process::Command;

#[test]
fn failed_start_leaves_no_run_directory() {
    let q = common::fixtures::repo().join("graphs/quickstart");
    let dir = common::fixtures::scratch("train-nothing-left");
    let art = dir.join("art");
    betadpo::dpo::build_artifacts(&q.join("model.onnx"), &art, &Default::default()).unwrap();
    let out = dir.join("run");
    let res = Command::new(env!("CARGO_BIN_EXE_betadpo"))
        .args(["train", "--artifacts", art.to_str().unwrap(), "--data", dir.join("missing.jsonl").to_str().unwrap()])
        .args(["--tokenizer", q.join("tokenizer.json").to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("missing.jsonl") && err.trim().lines().count() == 1, "{err}");
    assert!(!out.exists(), "a failed start must not create {}", out.display());
}
