//! `betadpo train` on the TRL data formats (standard, conversational, implicit prompt) and on bad input:
//! one-line errors that name the file and the flag, nothing written.

mod common;

use std::path::{Path, PathBuf};

use betadpo::dpo::ObjectiveConfig;
use betadpo::run_layout;
use betadpo::train::config::TrainConfig;
use betadpo::train::trainer::train;
use serde_json::{Map, Value};

use common::fixtures::scratch;
use common::train_run::*;

// ---------------------------------------------------------------------------------------------
// TRL data formats through train

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
// Bad input

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
    assert!(!out.join(run_layout::METRICS_FILE).exists() && run_layout::list_checkpoints(&out).is_empty());

    // A malformed row: file:line, in one line; --skip-bad-rows counts it and trains on the rest.
    let mut lines: Vec<String> = std::fs::read_to_string(&good).unwrap().lines().map(String::from).collect();
    lines.insert(5, r#"{"prompt": "User: hi\nAssistant:", "chosen": " hello"}"#.into()); // line 6: no rejected
    lines.insert(9, r#"{"prompt": "User: hi\nAssistant:", "chosen": " hel"#.into()); // line 10: not JSON
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let out = dir.join("run-bad");
    assert_one_line_error(&run_bin(&base(&bad, &out), &[]), &["bad.jsonl:6", "rejected"], "malformed row");
    assert!(!out.join(run_layout::METRICS_FILE).exists());
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
    assert!(!out.join(run_layout::METRICS_FILE).exists() && run_layout::list_checkpoints(&out).is_empty(), "--ep cuda trained anyway");

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
        assert!(!out.join(run_layout::METRICS_FILE).exists(), "{flags:?} trained anyway");
    }

    // A run directory with checkpoints is not overwritten without --resume.
    let out = dir.join("run-existing");
    let (code, _, err) = run_bin(&with(base(&good, &out), &["--quiet"]), &[]);
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read(out.join(run_layout::METRICS_FILE)).unwrap();
    let ck = run_layout::list_checkpoints(&out).last().unwrap().1.join(run_layout::PARAMS);
    let ck_before = std::fs::read(&ck).unwrap();
    assert_one_line_error(&run_bin(&with(base(&good, &out), &["--quiet"]), &[]), &["already holds checkpoints", "--resume"], "existing run without --resume");
    assert_eq!(std::fs::read(out.join(run_layout::METRICS_FILE)).unwrap(), before, "metrics.jsonl was touched");
    assert_eq!(std::fs::read(&ck).unwrap(), ck_before, "the checkpoint was touched");
    // ... nor resumed with other optimizer flags or data.
    assert_one_line_error(
        &run_bin(&with(base(&good, &out), &["--quiet", "--resume", "--lr", "0.5"]), &[]),
        &["resume needs the same"],
        "resume with another --lr",
    );
    let other = head(&inp.train, 12, &dir, "other.jsonl");
    assert_one_line_error(&run_bin(&with(base(&other, &out), &["--quiet", "--resume"]), &[]), &["resume needs the same"], "resume with other data");
    assert_eq!(std::fs::read(out.join(run_layout::METRICS_FILE)).unwrap(), before);
    let _ = std::fs::remove_dir_all(&dir);
}
