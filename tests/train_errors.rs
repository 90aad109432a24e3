//! A training run that fails before starting leaves no run directory behind.

mod common;

use std::process::Command;

#[test]
fn failed_start_leaves_no_run_directory() {
    let q = common::fixtures::quickstart();
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

/// Packed artifacts were checked for sequences up to `max_sequence_tokens`; a longer one is refused
/// in one line that names the flag to change, before any work.
#[test]
fn packed_artifacts_refuse_sequences_longer_than_verified() {
    use betadpo::dpo::packing::LayoutChoice;
    use betadpo::dpo::BuildOptions;
    let q = common::fixtures::quickstart();
    let dir = common::fixtures::scratch("train-packed-limit");
    let art = dir.join("art");
    let report = betadpo::dpo::build_artifacts(&q.join("model.onnx"), &art, &BuildOptions { layout: LayoutChoice::Packed, ..Default::default() }).unwrap();
    assert_eq!(report.manifest.max_sequence_tokens, Some(betadpo::dpo::packing::VERIFIED_SEQUENCE_TOKENS));
    // the same artifacts, as if the model's mask had been checked for 8 tokens only
    let manifest = art.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["max_sequence_tokens"] = serde_json::json!(8);
    std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
    let out = dir.join("run");
    let res = Command::new(env!("CARGO_BIN_EXE_betadpo"))
        .args(["train", "--artifacts", art.to_str().unwrap(), "--data", q.join("train.jsonl").to_str().unwrap()])
        .args(["--tokenizer", q.join("tokenizer.json").to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet", "--max-steps", "1"])
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--max-length") && err.contains("verified for up to 8") && err.trim().lines().count() == 1, "{err}");
    assert!(!out.exists(), "a failed start must not create {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every flag value that cannot work is refused before any work, in one line naming the flag, and
/// leaves no run directory.
#[test]
fn impossible_flag_values_are_refused_by_name() {
    let q = common::fixtures::quickstart();
    let dir = common::fixtures::scratch("train-bad-flags");
    let out = dir.join("run");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--artifacts", dir.join("art").to_str().unwrap(), "--data", q.join("train.jsonl").to_str().unwrap()]
            .iter()
            .chain(["--tokenizer", q.join("tokenizer.json").to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"].iter())
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--max-prompt-length", "0"], "--max-prompt-length"),
        (&["--max-length", "1"], "--max-length"),
        (&["--max-prompt-length", "64"], "no longer a flag"),
        (&["--truncation-mode", "keep_middle"], "--truncation-mode"),
        (&["--max-grad-norm", "-1"], "--max-grad-norm"),
        (&["--max-grad-norm", "nan"], "--max-grad-norm"),
        (&["--threads", "0"], "--threads"),
        (&["--group-by", ""], "--group-by"),
        (&["--eval-every", "10"], "--eval-every"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--grad-accum", "0"], "--grad-accum"),
        (&["--lr", "-1e-3"], "--lr"),
        (&["--head-lr", "inf"], "--head-lr"),
        (&["--weight-decay", "-0.1"], "--weight-decay"),
        (&["--epochs", "0"], "--epochs"),
        (&["--epochs", "nan", "--max-steps", "3"], "--epochs"),
        (&["--max-steps", "0"], "--max-steps"),
        (&["--pack-tokens", "0"], "--pack-tokens"),
        (&["--lr-schedule", "sideways"], "--lr-schedule"),
        (&["--ep", "abacus"], "--ep"),
        (&["--optimizer", "sgd"], "--optimizer"),
        (&["--batch-size", "-2"], "--batch-size"),
    ];
    for (extra, flag) in cases {
        let args = base(extra);
        common::cli::assert_one_line_error(&args.iter().map(String::as_str).collect::<Vec<_>>(), flag);
        assert!(!out.exists(), "{extra:?}: a refused start must not create {}", out.display());
    }
    common::cli::assert_one_line_error(&["quickstart", "--steps", "0", "--out", out.to_str().unwrap()], "--steps");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
