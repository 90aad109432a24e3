//! `betadpo train` learns: a context-dependent beta on data with a known answer, a fixed beta that stays
//! fixed, beta-DPO and epsilon-DPO (with exact resume), and packed artifacts training like padded ones.

mod common;

use std::path::Path;
use std::time::Instant;

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BetaDpoConfig, BuildOptions, EpsilonDpoConfig, ObjectiveConfig};
use betadpo::run_layout;
use betadpo::store::read_safetensors;
use betadpo::train::config::TrainConfig;
use serde_json::{Map, Value};

use common::fixtures::scratch;
use common::train_run::*;

// ---------------------------------------------------------------------------------------------
// Learning works

/// On data with clean / mixed / noise prompts (the shared fixtures, else graphs/quickstart), the
/// learned beta is high where labels are reliable and low where they are noise, and clean held-out
/// pairs are ranked right.
#[test]
fn learns_context_dependent_beta() {
    let Some(inp) = shared_inputs().or_else(quickstart_inputs) else {
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
    let last = state_of(&run_layout::checkpoint_dir(&out, 30));
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
    let state = state_of(&run_layout::checkpoint_dir(&split, 8));
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
    let state = state_of(&run_layout::checkpoint_dir(&split, 8));
    assert_eq!(state.epsilon_beta, Some(next(records.last().unwrap())), "the checkpoint holds the beta of step 9");
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
        let cfg = TrainConfig { eval_data: Some(eval.clone()), batch_size: 8, pack_tokens: Some(64), ..config(art, &data, &inp, &out, 1) };
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
