//! `betadpo train`'s numerics: fp16 dynamic loss scaling (trains, resumes exactly, skips and halves on
//! overflow), non-finite losses, and micro-batches computed in parts (`--micro-batch-tokens`).

mod common;

use std::path::{Path, PathBuf};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BetaDpoConfig, BuildOptions, ObjectiveConfig};
use betadpo::graph::{MixedPrecision, Precision};
use betadpo::run_layout;
use betadpo::train::config::TrainConfig;
use betadpo::train::loss_scale::{LossScale, INITIAL_SCALE, MAX_SCALE};

use serde_json::{Map, Value};

use common::fixtures::scratch;
use common::train_run::*;

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
    let state = state_of(&run_layout::checkpoint_dir(&split, 8));
    assert_eq!(state.loss_scale, Some(LossScale { scale: INITIAL_SCALE, clean_steps: 8 }));

    let art32 = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let run32 = dir.join("fp32");
    run_train(&TrainConfig { grad_accum: 2, ..config(&art32, &data, &inp, &run32, 1) });
    let (n16, n32) = (f(&records[0], "grad_norm"), f(&train_records(&run32)[0], "grad_norm"));
    eprintln!("first step's gradient norm: fp16 {n16}, fp32 {n32}");
    assert!(((n16 - n32) / n32).abs() < 1e-3, "first step's gradient norm: fp16 {n16}, fp32 {n32}");
    assert!(state_of(&run_layout::checkpoint_dir(&run32, 1)).loss_scale.is_none());
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
        let state = state_of(&run_layout::checkpoints_dir(&run).join(format!("step-{}", r["step"])));
        assert_eq!((state.updates, state.loss_scale.unwrap().scale), (updates, scale), "step {}", r["step"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Non-finite loss

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
    assert_eq!(run_layout::list_checkpoints(&stop).iter().map(|c| c.0).collect::<Vec<_>>(), vec![1], "only the finite step is saved");
    assert_eq!(checkpoint_entries(&stop), vec!["step-1"]);
    let ck = run_layout::checkpoint_dir(&stop, 1);
    assert_complete_checkpoint(&ck);
    let step1 = params(&ck.join(run_layout::PARAMS));
    assert!(step1.iter().all(|t| t.data.iter().all(|x| x.is_finite())), "the checkpoint holds finite parameters");
    assert!(step1.iter().any(|t| t.data.iter().any(|x| x.abs() > 1e29)), "lr 1e30 should have moved the weights by ~1e30");
    assert_eq!(steps_of(&train_records(&stop)), vec![1], "the failed step is not logged");
    assert!(!stop.join(run_layout::FINAL_DIR).exists());

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
    assert_eq!(state_of(&run_layout::list_checkpoints(&skip).last().unwrap().1).skipped_nonfinite, 4);
    assert_bit_identical(&step1, &final_params(&skip), "skipped steps leave the step-1 weights unchanged");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Micro-batches in parts

/// A micro-batch computed in parts (`--micro-batch-tokens 1`: every pair, or packed row, a pass of its
/// own, its gradients weighted by its share of the micro-batch) trains as the whole micro-batch in one
/// pass does, on both layouts and with gradient accumulation: the same losses, gradient norms, reward
/// margins, evaluation and weights up to float rounding, where a wrong weight (a part's gradient
/// counted as the batch's) would scale the gradient norm by the parts' count. The first step's loss is
/// log 2 to the bit in both: each pair's reference log-probs are what the train graph computes for it.
/// The runs are not bit-identical: the parts did run.
#[test]
fn micro_batches_in_parts_train_as_the_whole_micro_batch() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("micro-parts");
    let data = head(&inp.train, 24, &dir, "train.jsonl");
    let eval = head(&inp.test, 10, &dir, "eval.jsonl");
    for (layout, grad_accum) in [(LayoutChoice::Padded, 1), (LayoutChoice::Packed, 2)] {
        let art = artifacts_in(layout, &inp.model, &dir.join(format!("{layout:?}")), ObjectiveConfig::default());
        let run = |parts: usize| {
            let out = dir.join(format!("{layout:?}-{parts}"));
            // packed rows of at most 64 tokens: each of these pairs gets a row of its own, so 4 rows
            let cfg = TrainConfig {
                micro_batch_tokens: Some(parts),
                grad_accum,
                pack_tokens: Some(64),
                eval_data: Some(eval.clone()),
                eval_every: 2,
                ..config(&art, &data, &inp, &out, 3)
            };
            run_train(&cfg);
            (train_records(&out), eval_records(&out), final_params(&out))
        };
        let ((whole, w_eval, w_params), (parts, p_eval, p_params)) = (run(0), run(1));
        let ln2 = f64::from(2f32.ln());
        assert_eq!((f(&whole[0], "loss"), f(&parts[0], "loss")), (ln2, ln2), "{layout:?}: step 1 is at the reference");
        let close = |whole: &[Map<String, Value>], parts: &[Map<String, Value>], keys: &[&str]| {
            assert!(!whole.is_empty() && whole.len() == parts.len(), "{layout:?}: {} records whole, {} in parts", whole.len(), parts.len());
            for (a, b) in whole.iter().zip(parts) {
                for key in keys {
                    let (x, y) = (f(a, key), f(b, key));
                    assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{layout:?} step {}: {key} {x} whole, {y} in parts", a["step"]);
                }
            }
        };
        close(&w_eval, &p_eval, &["eval/loss", "eval/rewards/margins"]);
        close(&whole, &parts, &["loss", "grad_norm", "rewards/margins"]);
        let max = w_params.iter().zip(&p_params).flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs())).fold(0.0f32, f32::max);
        let differing = w_params.iter().zip(&p_params).flat_map(|(x, y)| x.data.iter().zip(&y.data)).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        eprintln!("{layout:?}: final weights differ by at most {max:e} ({differing} values not bit-identical)");
        // Adam's update is about lr * sign(g) wherever |g| is well above its epsilon, so where a gradient
        // is a near-cancelling sum its rounding moves a weight by up to a fraction of lr (1e-3) a step
        assert!(max <= 3e-5, "{layout:?}: final weights differ by {max} after 3 steps at lr 1e-3");
        assert!(differing > 0, "{layout:?}: bit-identical weights: the micro-batches were not cut into parts");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// beta-DPO's filter reads the margins of the whole micro-batch: an explicit `--micro-batch-tokens`
/// is refused before anything is written, and without it beta-DPO runs its micro-batches whole.
#[test]
fn beta_dpo_refuses_micro_batches_in_parts() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("micro-parts-beta-dpo");
    let data = head(&inp.train, 8, &dir, "train.jsonl");
    let objective = ObjectiveConfig { beta_dpo: Some(BetaDpoConfig { beta0: 0.1, alpha: 0.6, rho: 0.3, momentum: 0.9 }), ..Default::default() };
    let art = artifacts(&inp.model, &dir, objective);
    let out = dir.join("run");
    let refused = run_bin(&train_args(&art, &data, &inp.tokenizer, &out, "--max-steps 1 --micro-batch-tokens 1"), &[]);
    assert_one_line_error(&refused, &["--micro-batch-tokens", "beta-DPO"], "beta-DPO with parts");
    assert!(!out.join("metrics.jsonl").exists(), "nothing trained");
    run_train(&config(&art, &data, &inp, &dir.join("whole"), 1));
    let _ = std::fs::remove_dir_all(&dir);
}
