//! beta-DPO (Wu et al. 2024, arXiv 2407.08639): one beta per batch from the batch's reward
//! margins, and the margin filter that keeps a random fraction `1 - rho` of the pairs, sampled
//! with a Gaussian weight around the running mean margin.
//!
//! As in the paper's reference code, the margin is `M_i = (pi - ref)(chosen) - (pi - ref)(rejected)`
//! of the current parameters, from the same forward pass, and neither beta nor the filter carries a
//! gradient. The graph computes them itself behind a stop-gradient, so no second forward is needed:
//!
//! - `M_0 <- m M_0 + (1 - m) mean(M)` and `S_0 <- m S_0 + (1 - m) std(M)` (unbiased std, momentum
//!   `m`), updated with this batch first. The trainer feeds the running pair `[M_0, S_0]` in and
//!   keeps the updated pair the graph returns (and checkpoints it).
//! - Sampling `floor(B (1 - rho))` pairs without replacement with weights `w_i = exp(-(M_i - M_0)^2
//!   / (2 S_0^2))` is done as top-k of `log w_i + g_i` with Gumbel noise `g_i` the trainer feeds
//!   (the Gumbel-top-k trick draws exactly that distribution).
//! - `beta = max(beta_0 (1 + alpha (mean of kept M - M_0)), 1e-3)`; the loss is the mean over kept pairs.

use crate::autodiff::STOP_GRADIENT;
use crate::dpo::objective::config::{BetaDpoConfig, LossKind, ObjectiveConfig};
use crate::graph::Builder;
use crate::onnx::{attr_i, dtype, Dim, ValueInfoProto};
use crate::runtime::HostTensor;
use ndarray::{ArrayD, IxDyn};

pub const MARGIN_STATS: &str = "margin_stats";
pub const SELECTION_NOISE: &str = "selection_noise";
pub const MARGIN_STATS_NEXT: &str = "margin_stats_next";
pub const KEPT: &str = "kept";

/// The floor on beta, as in the reference code's `clamp(min=1e-3)`.
pub const BETA_FLOOR: f64 = 1e-3;
/// Keeps the Gaussian weight finite while the running spread is still zero (every margin equal).
const SPREAD_FLOOR: f64 = 1e-6;

/// What beta-DPO adds to the objective.
#[derive(Clone, Debug)]
pub struct BatchBeta {
    /// beta for every pair (one value, repeated).
    pub beta: String,
    /// 1 for the pairs the filter keeps, 0 otherwise.
    pub kept: String,
    /// How many pairs are kept (a scalar).
    pub kept_count: String,
    pub stats_next: String,
}

pub fn inputs() -> Vec<ValueInfoProto> {
    vec![
        crate::onnx::value_info(MARGIN_STATS, dtype::FLOAT, &[Dim::Fixed(2)]),
        crate::onnx::value_info(SELECTION_NOISE, dtype::FLOAT, &[Dim::Sym("pairs".into())]),
    ]
}

/// Values for the shape probes' batches of `pairs` pairs.
pub fn probe_inputs(pairs: usize) -> Vec<(String, HostTensor)> {
    vec![
        (MARGIN_STATS.into(), HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.0, 1.0]).expect("two values"))),
        (SELECTION_NOISE.into(), HostTensor::F32(ArrayD::zeros(IxDyn(&[pairs])))),
    ]
}

/// beta and the kept set from the per-pair log-ratios `dc`, `dr` [B].
pub fn batch_beta(b: &mut Builder, dc: &str, dr: &str, cfg: &BetaDpoConfig) -> BatchBeta {
    let margin = b.op("Sub", &[dc, dr], vec![], "beta_dpo/margin_live");
    let margin = b.op("Identity", &[&margin], vec![], &format!("{STOP_GRADIENT}beta_dpo/margin"));
    let (mean, std) = mean_and_std(b, &margin);

    let zero = b.int(0);
    let one = b.int(1);
    let prev_mean = b.op("Gather", &[MARGIN_STATS, &zero], vec![attr_i("axis", 0)], "beta_dpo/prev_mean");
    let prev_std = b.op("Gather", &[MARGIN_STATS, &one], vec![attr_i("axis", 0)], "beta_dpo/prev_std");
    let m0 = moving_average(b, &prev_mean, &mean, cfg.momentum, "beta_dpo/m0");
    let s0 = moving_average(b, &prev_std, &std, cfg.momentum, "beta_dpo/s0");
    let axis0 = b.ints(&[0]);
    let m0v = b.op("Unsqueeze", &[&m0, &axis0], vec![], "beta_dpo/m0_vec");
    let s0v = b.op("Unsqueeze", &[&s0, &axis0], vec![], "beta_dpo/s0_vec");
    let stats_next = b.op("Concat", &[&m0v, &s0v], vec![attr_i("axis", 0)], MARGIN_STATS_NEXT);

    let (kept, kept_count) = filter(b, &margin, &m0, &s0, cfg.rho);
    let kept_margin = b.op("Mul", &[&kept, &margin], vec![], "beta_dpo/kept_margin");
    let kept_sum = b.op("ReduceSum", &[&kept_margin], vec![attr_i("keepdims", 0)], "beta_dpo/kept_margin_sum");
    let kept_mean = b.op("Div", &[&kept_sum, &kept_count], vec![], "beta_dpo/kept_margin_mean");
    let gap = b.op("Sub", &[&kept_mean, &m0], vec![], "beta_dpo/kept_minus_m0");
    let alpha = b.scalar(cfg.alpha, dtype::FLOAT);
    let scaled = b.op("Mul", &[&gap, &alpha], vec![], "beta_dpo/alpha_gap");
    let one_f = b.scalar(1.0, dtype::FLOAT);
    let factor = b.op("Add", &[&scaled, &one_f], vec![], "beta_dpo/factor");
    let beta0 = b.scalar(cfg.beta0, dtype::FLOAT);
    let beta = b.op("Mul", &[&factor, &beta0], vec![], "beta_dpo/beta_raw");
    let floor = b.scalar(BETA_FLOOR, dtype::FLOAT);
    let beta = b.op("Max", &[&beta, &floor], vec![], "beta_dpo/beta");
    let shape = b.op("Shape", &[dc], vec![], "beta_dpo/pair_shape");
    let beta = b.op("Expand", &[&beta, &shape], vec![], "beta");
    BatchBeta { beta, kept, kept_count, stats_next }
}

/// Mean and unbiased standard deviation (as `torch.std`) of a vector, as scalars. One pair has
/// no spread: its deviation is divided by 1 instead of 0.
fn mean_and_std(b: &mut Builder, x: &str) -> (String, String) {
    let mean = b.op("ReduceMean", &[x], vec![attr_i("keepdims", 0)], "beta_dpo/batch_mean");
    let dev = b.op("Sub", &[x, &mean], vec![], "beta_dpo/deviation");
    let sq = b.op("Mul", &[&dev, &dev], vec![], "beta_dpo/deviation_sq");
    let ss = b.op("ReduceSum", &[&sq], vec![attr_i("keepdims", 0)], "beta_dpo/deviation_ss");
    let n = b.dim_scalar(x, 0, "beta_dpo/pairs");
    let n = b.op("Cast", &[&n], vec![attr_i("to", dtype::FLOAT as i64)], "beta_dpo/pairs_f");
    let one = b.scalar(1.0, dtype::FLOAT);
    let dof = b.op("Sub", &[&n, &one], vec![], "beta_dpo/dof");
    let dof = b.op("Max", &[&dof, &one], vec![], "beta_dpo/dof_at_least_1");
    let var = b.op("Div", &[&ss, &dof], vec![], "beta_dpo/batch_var");
    let std = b.op("Sqrt", &[&var], vec![], "beta_dpo/batch_std");
    (mean, std)
}

fn moving_average(b: &mut Builder, prev: &str, batch: &str, momentum: f64, name: &str) -> String {
    let keep = b.scalar(momentum, dtype::FLOAT);
    let take = b.scalar(1.0 - momentum, dtype::FLOAT);
    let old = b.op("Mul", &[prev, &keep], vec![], &format!("{name}_old"));
    let new = b.op("Mul", &[batch, &take], vec![], &format!("{name}_new"));
    b.op("Add", &[&old, &new], vec![], name)
}

/// The kept mask [B] and its count: the `floor(B (1 - rho))` (at least one) largest
/// `-(M - M_0)^2 / (2 S_0^2) + noise`.
fn filter(b: &mut Builder, margin: &str, m0: &str, s0: &str, rho: f64) -> (String, String) {
    let floor = b.scalar(SPREAD_FLOOR, dtype::FLOAT);
    let s = b.op("Max", &[s0, &floor], vec![], "beta_dpo/spread");
    let d = b.op("Sub", &[margin, m0], vec![], "beta_dpo/from_m0");
    let z = b.op("Div", &[&d, &s], vec![], "beta_dpo/z");
    let z2 = b.op("Mul", &[&z, &z], vec![], "beta_dpo/z_sq");
    let minus_half = b.scalar(-0.5, dtype::FLOAT);
    let log_w = b.op("Mul", &[&z2, &minus_half], vec![], "beta_dpo/log_weight");
    let score = b.op("Add", &[&log_w, SELECTION_NOISE], vec![], "beta_dpo/score");

    let n = b.dim(margin, 0, "beta_dpo/pair_count");
    let n = b.op("Cast", &[&n], vec![attr_i("to", dtype::FLOAT as i64)], "beta_dpo/pair_count_f");
    let keep = b.scalar(1.0 - rho, dtype::FLOAT);
    let k = b.op("Mul", &[&n, &keep], vec![], "beta_dpo/k_real");
    let k = b.op("Floor", &[&k], vec![], "beta_dpo/k_floor");
    let one = b.scalar(1.0, dtype::FLOAT);
    let k = b.op("Max", &[&k, &one], vec![], "beta_dpo/k_at_least_1");
    let k = b.op("Cast", &[&k], vec![attr_i("to", dtype::INT64 as i64)], "beta_dpo/k");
    let top = b.op_n("TopK", &[&score, &k], 2, vec![attr_i("axis", 0)], "beta_dpo/top");
    let threshold = b.op("ReduceMin", &[&top[0]], vec![attr_i("keepdims", 0)], "beta_dpo/threshold");
    let below = b.op("Less", &[&score, &threshold], vec![], "beta_dpo/below");
    let hit = b.op("Not", &[&below], vec![], "beta_dpo/kept_bool");
    let kept = b.op("Cast", &[&hit], vec![attr_i("to", dtype::FLOAT as i64)], KEPT);
    let count = b.op("ReduceSum", &[&kept], vec![attr_i("keepdims", 0)], "beta_dpo/kept_count");
    (kept, count)
}

/// The mean loss over the `kept` pairs at the betas `betas` (one per pair), from the pairs' margins `u`
/// (policy minus reference log-ratio, chosen minus rejected), in float64. With the betas and the kept
/// set held at the values of some parameters, this is the function whose gradient the train graph
/// returns there (beta-DPO detaches its batch beta and filter, epsilon-DPO its per-pair betas), so
/// `validate` differentiates it numerically.
pub fn detached_loss(cfg: &ObjectiveConfig, betas: &[f64], kept: &[f32], u: &[f64]) -> f64 {
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let per_pair = |beta: f64, u: f64| match cfg.loss {
        LossKind::Sigmoid => (1.0 - cfg.label_smoothing) * softplus(-beta * u) + cfg.label_smoothing * softplus(beta * u),
        LossKind::Ipo => (u - 1.0 / (2.0 * beta)).powi(2),
        LossKind::Hinge => (1.0 - beta * u).max(0.0),
    };
    let kept_pairs = kept.iter().zip(betas).zip(u).filter(|((k, _), _)| **k > 0.5);
    let (sum, count) = kept_pairs.fold((0.0, 0.0), |(s, n), ((_, &beta), &u)| (s + per_pair(beta, u), n + 1.0));
    sum / count
}
