//! beta-DPO's graph (`--beta-method beta-dpo`) against the paper's formulas, computed here in
//! float64 from the graph's own per-pair log-probs: the running statistics, the kept set, the batch
//! beta and the loss; the Gumbel-top-k filter's selection frequencies against the sampling weights;
//! and its gradient against central differences (alpha = 0, where beta is constant) and against
//! standard DPO's graph at the same beta (alpha > 0, where the paper detaches beta).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use betadpo::dpo::manifest::Manifest;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::validate::{random_batch, validate, ValidateOptions};
use betadpo::dpo::{build_artifacts, BetaDpoConfig, BuildOptions, LossKind, ObjectiveConfig};
use betadpo::runtime::{f32_output, run, HostTensor, SessionConfig};
use betadpo::store::read_safetensors;
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;

use common::fixtures::{quickstart_model as model, scratch};

fn build(dir: &Path, name: &str, objective: ObjectiveConfig, layout: LayoutChoice) -> PathBuf {
    let out = dir.join(name);
    build_artifacts(&model(), &out, &BuildOptions { objective, layout, ..Default::default() }).unwrap_or_else(|e| panic!("build-graph {name}: {e}"));
    out
}

fn beta_dpo(d: BetaDpoConfig) -> ObjectiveConfig {
    ObjectiveConfig { beta_dpo: Some(d), ..Default::default() }
}

/// One graph of some artifacts with their stored parameters.
struct Graph {
    session: ort::session::Session,
    manifest: Manifest,
    which: &'static str,
    params: HashMap<String, ArrayD<f32>>,
}

impl Graph {
    fn open(art: &Path, which: &'static str) -> Self {
        let manifest = Manifest::load(art).unwrap();
        let session = SessionConfig::default().session_from_file(&art.join(&manifest.graph(which).unwrap().file)).unwrap();
        let (tensors, _) = read_safetensors(&art.join(&manifest.parameters_file)).unwrap();
        let params = tensors.into_iter().map(|t| (t.name, ArrayD::from_shape_vec(IxDyn(&t.shape), t.data).unwrap())).collect();
        Graph { session, manifest, which, params }
    }

    /// A random batch of `pairs` pairs (seeded), in this graph's inputs.
    fn batch(&self, seed: u64, pairs: usize) -> Vec<(String, HostTensor)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        random_batch(&self.manifest, self.manifest.graph(self.which).unwrap(), &mut rng, pairs, 10)
    }

    /// Runs on `batch` (inputs this graph lacks are left out), with `replace` overriding inputs by name.
    fn run(&mut self, batch: &[(String, HostTensor)], replace: &[(&str, HostTensor)]) -> Vec<(String, HostTensor)> {
        let spec = self.manifest.graph(self.which).unwrap();
        let mut feeds: Vec<(&str, HostTensor)> = Vec::new();
        for i in &spec.inputs {
            let given = replace.iter().find(|(n, _)| *n == i.name).map(|(_, t)| t.clone());
            let t = match given.or_else(|| batch.iter().find(|(n, _)| *n == i.name).map(|(_, t)| t.clone())) {
                Some(t) => t,
                None if i.role == "parameter" => HostTensor::F32(self.params[&i.name].clone()),
                None => panic!("no value for input {}", i.name),
            };
            feeds.push((i.name.as_str(), t));
        }
        run(&mut self.session, &feeds).unwrap()
    }
}

fn floats(outs: &[(String, HostTensor)], name: &str) -> Vec<f64> {
    f32_output(outs, name).unwrap().iter().map(|&x| x as f64).collect()
}

fn input(batch: &[(String, HostTensor)], name: &str) -> Vec<f64> {
    batch.iter().find(|(n, _)| n == name).and_then(|(_, t)| t.as_f32()).unwrap().iter().map(|&x| x as f64).collect()
}

fn vector(v: &[f32]) -> HostTensor {
    HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The paper's reference code (junkangwu/beta-DPO, `preference_loss` and
/// `update_and_sync_tensor_mean`) in float64, with the kept set given by the top-k of the scores.
struct ClosedForm {
    stats: [f64; 2],
    kept: Vec<bool>,
    beta: f64,
    loss: f64,
}

fn closed_form(d: &BetaDpoConfig, margins: &[f64], prev: [f64; 2], noise: &[f64]) -> ClosedForm {
    let n = margins.len() as f64;
    let mean = margins.iter().sum::<f64>() / n;
    let std = (margins.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let m0 = d.momentum * prev[0] + (1.0 - d.momentum) * mean;
    let s0 = d.momentum * prev[1] + (1.0 - d.momentum) * std;
    let score: Vec<f64> = margins.iter().zip(noise).map(|(m, g)| -0.5 * ((m - m0) / s0).powi(2) + g).collect();
    let k = ((n * (1.0 - d.rho)).floor() as usize).max(1);
    let mut order: Vec<usize> = (0..margins.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    let mut kept = vec![false; margins.len()];
    for &i in &order[..k] {
        kept[i] = true;
    }
    let kept_mean = (0..margins.len()).filter(|&i| kept[i]).map(|i| margins[i]).sum::<f64>() / k as f64;
    let beta = (d.beta0 * (1.0 + d.alpha * (kept_mean - m0))).max(1e-3);
    let loss = (0..margins.len()).filter(|&i| kept[i]).map(|i| softplus(-beta * margins[i])).sum::<f64>() / k as f64;
    ClosedForm { stats: [m0, s0], kept, beta, loss }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

/// The margins `(pi - ref)(chosen) - (pi - ref)(rejected)` from the graph's policy log-probs.
fn margins(outs: &[(String, HostTensor)], batch: &[(String, HostTensor)]) -> Vec<f64> {
    let logps = floats(outs, "policy_logps");
    let refs = input(batch, "ref_logps");
    let b = logps.len() / 2;
    (0..b).map(|i| (logps[i] - refs[i]) - (logps[b + i] - refs[b + i])).collect()
}

#[test]
fn beta_filter_and_loss_match_the_paper() {
    let dir = scratch("beta-dpo-closed-form");
    for layout in [LayoutChoice::Padded, LayoutChoice::Packed] {
        let d = BetaDpoConfig { beta0: 0.1, alpha: 0.6, rho: 0.3, momentum: 0.9 };
        let art = build(&dir, &format!("{layout:?}"), beta_dpo(d), layout);
        let mut g = Graph::open(&art, "eval");
        for seed in 0..4u64 {
            let pairs = 5 + seed as usize;
            let batch = g.batch(seed, pairs);
            let prev = [0.5f32 * seed as f32 - 0.7, 0.3 + 0.4 * seed as f32];
            let outs = g.run(&batch, &[("margin_stats", vector(&prev))]);
            let noise = input(&batch, "selection_noise");
            let m = margins(&outs, &batch);
            let want = closed_form(&d, &m, [prev[0] as f64, prev[1] as f64], &noise);
            let what = format!("{layout:?}, seed {seed}, {pairs} pairs");

            let stats = floats(&outs, "margin_stats_next");
            assert!(close(stats[0], want.stats[0], 1e-5) && close(stats[1], want.stats[1], 1e-5), "{what}: running stats {stats:?}, want {:?}", want.stats);
            let kept: Vec<bool> = floats(&outs, "kept").iter().map(|&k| k == 1.0).collect();
            assert_eq!(kept, want.kept, "{what}: kept set");
            assert_eq!(kept.iter().filter(|&&k| k).count(), (pairs as f64 * 0.7).floor() as usize, "{what}: floor(B (1 - rho)) kept");
            let beta = floats(&outs, "beta");
            assert_eq!(beta.len(), pairs);
            assert!(beta.iter().all(|&b| close(b, want.beta, 1e-5)), "{what}: beta {beta:?}, want {}", want.beta);
            let loss = floats(&outs, "loss")[0];
            assert!(close(loss, want.loss, 1e-5), "{what}: loss {loss}, want {}", want.loss);
            let rewards = floats(&outs, "chosen_rewards");
            let logps = floats(&outs, "policy_logps");
            let refs = input(&batch, "ref_logps");
            for i in 0..pairs {
                assert!(close(rewards[i], want.beta * (logps[i] - refs[i]), 1e-5), "{what}: chosen reward {i}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Top-k of `log w + Gumbel noise` with k = 1 picks pair i with probability `w_i / sum(w)`, what
/// `torch.multinomial(w, 1)` does (the reference code's sampling).
#[test]
fn filter_samples_by_the_gaussian_weight() {
    let dir = scratch("beta-dpo-sampling");
    let d = BetaDpoConfig { beta0: 0.1, alpha: 0.6, rho: 0.75, momentum: 0.9 };
    let art = build(&dir, "art", beta_dpo(d), LayoutChoice::Padded);
    let mut g = Graph::open(&art, "eval");
    let batch = g.batch(7, 4);
    let prev = [0.0f32, 1.0];
    let zero = g.run(&batch, &[("margin_stats", vector(&prev)), ("selection_noise", vector(&[0.0; 4]))]);
    let m = margins(&zero, &batch);
    let stats = floats(&zero, "margin_stats_next");
    let w: Vec<f64> = m.iter().map(|x| (-0.5 * ((x - stats[0]) / stats[1]).powi(2)).exp()).collect();
    let total: f64 = w.iter().sum();
    let draws = 1500u64;
    let mut hits = [0u64; 4];
    for draw in 0..draws {
        let noise = betadpo::train::batch_beta::gumbel_noise(11, draw, 4);
        let outs = g.run(&batch, &[("margin_stats", vector(&prev)), ("selection_noise", vector(&noise))]);
        let kept = floats(&outs, "kept");
        assert_eq!(kept.iter().sum::<f64>(), 1.0);
        hits[kept.iter().position(|&k| k == 1.0).unwrap()] += 1;
    }
    for i in 0..4 {
        let p = w[i] / total;
        let sd = (p * (1.0 - p) / draws as f64).sqrt();
        let freq = hits[i] as f64 / draws as f64;
        assert!((freq - p).abs() < 4.0 * sd + 1e-3, "pair {i}: picked {freq:.3} of draws, weight share {p:.3} (weights {w:?})");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `validate`'s central differences: with alpha = 0 beta is the constant beta_0 and the kept set is
/// locally constant, so they differentiate the graph's own loss, filter included; with alpha > 0
/// they differentiate the loss at the batch beta and kept set held fixed (the paper detaches both),
/// which `validate` computes from the graph's log-probs after checking it equals the graph's loss.
#[test]
fn gradient_matches_central_differences() {
    let dir = scratch("beta-dpo-fd");
    for (layout, alpha, loss) in [
        (LayoutChoice::Padded, 0.0, LossKind::Sigmoid),
        (LayoutChoice::Packed, 0.0, LossKind::Sigmoid),
        (LayoutChoice::Padded, 0.6, LossKind::Ipo),
        (LayoutChoice::Packed, 0.6, LossKind::Hinge),
    ] {
        let d = BetaDpoConfig { beta0: 0.1, alpha, rho: 0.5, momentum: 0.9 };
        let art = build(&dir, &format!("{layout:?}-{alpha}-{loss:?}"), ObjectiveConfig { loss, ..beta_dpo(d) }, layout);
        let checks = validate(&art, &ValidateOptions { pairs: 4, ..Default::default() }).unwrap();
        for c in &checks {
            assert!(c.ok, "{layout:?}, alpha {alpha}, {loss:?}: {}: {}", c.name, c.detail);
        }
        assert!(checks.iter().any(|c| c.name == "train: directional derivatives"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// With alpha > 0 the paper detaches beta (`beta_used.detach()`): the gradient is standard DPO's
/// at that beta. With rho = 0 every pair is kept, so it must equal the gradient of the fixed-beta
/// graph (itself checked against PyTorch and central differences) with `--fixed-beta` = the batch beta.
#[test]
fn gradient_is_standard_dpo_at_the_detached_beta() {
    let dir = scratch("beta-dpo-detached");
    let d = BetaDpoConfig { beta0: 0.1, alpha: 0.6, rho: 0.0, momentum: 0.9 };
    let art = build(&dir, "beta-dpo", beta_dpo(d), LayoutChoice::Padded);
    let mut g = Graph::open(&art, "train");
    let batch = g.batch(3, 6);
    // A running mean 1 below the batch's keeps beta = beta_0 (1 + alpha momentum) clear of its floor,
    // where it would carry no gradient anyway.
    let m = margins(&g.run(&batch, &[]), &batch);
    let below = (m.iter().sum::<f64>() / m.len() as f64 - 1.0) as f32;
    let outs = g.run(&batch, &[("margin_stats", vector(&[below, 1.0]))]);
    let beta = floats(&outs, "beta")[0];
    assert!(close(beta, d.beta0 * (1.0 + d.alpha * d.momentum), 1e-4), "batch beta {beta}");
    let fixed = build(&dir, "fixed", ObjectiveConfig { fixed_beta: Some(beta), ..Default::default() }, LayoutChoice::Padded);
    let mut f = Graph::open(&fixed, "train");
    let fixed_outs = f.run(&batch, &[]);
    assert!(close(floats(&outs, "loss")[0], floats(&fixed_outs, "loss")[0], 1e-6));
    let grads = |g: &Graph, outs: &[(String, HostTensor)]| -> Vec<(String, Vec<f64>)> {
        let spec = g.manifest.graph("train").unwrap();
        let mut v: Vec<(String, Vec<f64>)> =
            spec.outputs.iter().filter(|o| o.role == "gradient").map(|o| (o.parameter.clone().unwrap(), floats(outs, &o.name))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (a, b) = (grads(&g, &outs), grads(&f, &fixed_outs));
    assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>());
    let norm: f64 = b.iter().flat_map(|(_, v)| v.iter()).map(|x| x * x).sum::<f64>().sqrt();
    assert!(norm > 0.0);
    let diff: f64 = a.iter().zip(&b).flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).powi(2))).sum::<f64>().sqrt();
    assert!(diff <= 1e-5 * norm, "beta-DPO's gradient differs from standard DPO's at beta {beta}: |diff| {diff:.3e}, |grad| {norm:.3e}");
    let _ = std::fs::remove_dir_all(&dir);
}
