//! The DPO objective appended to the language model: sequence log-probs over answer tokens, the
//! beta head, the preference loss, and the per-pair values metrics are computed from.
//!
//! Batch layout (TRL's): rows `0..B` are the chosen and rows `B..2B` the rejected sequences,
//! right-padded; `completion_mask[r, t] = 1` marks answer tokens, whose log-prob is read from
//! `logits[r, t-1]`.
//!
//! Its parts: what the user chose ([`config`]), answer-token log-probs ([`answer_logps`], and
//! [`chunked_logps`] that never holds the full logits), and the beta methods beside the learned head
//! ([`beta_dpo`]'s batch beta and margin filter, [`epsilon_dpo`]'s per-pair beta).

pub mod answer_logps;
pub mod beta_dpo;
pub mod chunked_logps;
pub mod config;
pub mod epsilon_dpo;

use answer_logps::{tokens_to_sequences, AnswerTokens};
use beta_dpo::BatchBeta;
use config::{inverse_softplus, BetaAggregate, BetaSource, HeadInput, LossKind, ObjectiveConfig};
use epsilon_dpo::PairBeta;

use crate::autodiff::STOP_GRADIENT;
use crate::dpo::packing::{objective as packed, Layout};
use crate::graph::Builder;
use crate::onnx::{attr_i, dtype, tensor_f32, Dim, TensorProto, ValueInfoProto};

pub use answer_logps::{ModelTensors, REF_LOGPS};

/// The prefix of the names of the objective's nodes (the phases after it tell them from the model's by it).
pub const NODE_PREFIX: &str = "dpo/";
pub const HEAD_WEIGHT: &str = "beta_head.weight";
pub const HEAD_BIAS: &str = "beta_head.bias";
pub const COMPLETION_MASK: &str = "completion_mask";

/// Names of the objective's tensors.
#[derive(Clone, Debug)]
pub struct Objective {
    pub loss: String,
    pub policy_logps: String,
    pub beta: String,
    pub chosen_rewards: String,
    pub rejected_rewards: String,
    /// New graph inputs (completion mask, reference log-probs, beta-DPO's running statistics).
    pub inputs: Vec<ValueInfoProto>,
    /// beta-DPO's kept-pair mask and updated running statistics.
    pub beta_dpo: Option<BatchBeta>,
    /// epsilon-DPO's steps and next global beta.
    pub epsilon_dpo: Option<PairBeta>,
    /// Initial values of the head (empty with a fixed beta).
    pub head: Vec<TensorProto>,
}

fn rows_dims() -> Vec<Dim> {
    vec![Dim::Sym("rows".into()), Dim::Sym("sequence".into())]
}

/// `x` [2B, ...] -> (`x[0:B]`, `x[B:2B]`).
fn halves(b: &mut Builder, x: &str, name: &str) -> (String, String) {
    let shape = b.ints(&[2, -1]);
    let pairs = b.op("Reshape", &[x, &shape], vec![], &format!("{name}/pairs"));
    let zero = b.int(0);
    let one = b.int(1);
    let c = b.op("Gather", &[&pairs, &zero], vec![attr_i("axis", 0)], &format!("{name}/chosen"));
    let r = b.op("Gather", &[&pairs, &one], vec![attr_i("axis", 0)], &format!("{name}/rejected"));
    (c, r)
}

/// Labels and their mask shifted left by one (and padded), so position `t` holds the token that
/// `logits[t]` predicts: no [rows, T, vocab] slice is ever made.
fn shifted_labels(b: &mut Builder, m: &ModelTensors, mask: &str) -> (String, String) {
    let one = b.ints(&[1]);
    let big = b.ints(&[i64::MAX]);
    let next_ids = b.op("Slice", &[m.input_ids, &one, &big, &one], vec![], "dpo/next_ids");
    let next_mask = b.op("Slice", &[mask, &one, &big, &one], vec![], "dpo/next_mask");
    let col_shape = {
        let rows = b.dim(m.input_ids, 0, "dpo/rows");
        b.op("Concat", &[&rows, &one], vec![attr_i("axis", 0)], "dpo/col_shape")
    };
    let zero_i = crate::onnx::tensor_i64("", &[1], &[0]);
    let pad_ids = b.op("ConstantOfShape", &[&col_shape], vec![crate::onnx::attr_t("value", zero_i)], "dpo/pad_ids");
    let zero_f = tensor_f32("", &[1], &[0.0]);
    let pad_mask = b.op("ConstantOfShape", &[&col_shape], vec![crate::onnx::attr_t("value", zero_f)], "dpo/pad_mask");
    let labels = b.op("Concat", &[&next_ids, &pad_ids], vec![attr_i("axis", 1)], "dpo/labels");
    let label_mask = b.op("Concat", &[&next_mask, &pad_mask], vec![attr_i("axis", 1)], "dpo/label_mask");
    (labels, label_mask)
}

/// Sum over answer tokens of log softmax(logits[t-1])[token t], per row. When the lm_head is a
/// plain product, it is applied to the positions that predict an answer token only: the
/// vocabulary-sized work then scales with the answer tokens, not the batch.
pub fn sequence_logps(b: &mut Builder, m: &ModelTensors, mask: &str) -> String {
    if m.projection.is_some() {
        let tokens = padded_answer_tokens(b, m, mask);
        return tokens_to_sequences(b, m, &tokens);
    }
    let (labels, label_mask) = shifted_labels(b, m, mask);
    let last = b.ints(&[-1]);
    let axis1 = b.ints(&[1]);
    let logp = b.op("LogSoftmax", &[m.logits], vec![attr_i("axis", -1)], "dpo/logp");
    let labels3 = b.op("Unsqueeze", &[&labels, &last], vec![], "dpo/labels3");
    let picked = b.op("GatherElements", &[&logp, &labels3], vec![attr_i("axis", 2)], "dpo/token_logp3");
    let tok = b.op("Squeeze", &[&picked, &last], vec![], "dpo/token_logp");
    let masked = b.op("Mul", &[&tok, &label_mask], vec![], "dpo/answer_logp");
    b.op("ReduceSum", &[&masked, &axis1], vec![attr_i("keepdims", 0)], "policy_logps")
}

/// The answer tokens of a right-padded batch whose answers `mask` marks.
pub(crate) fn padded_answer_tokens(b: &mut Builder, m: &ModelTensors, mask: &str) -> AnswerTokens {
    let (labels, label_mask) = shifted_labels(b, m, mask);
    let on = b.op("Cast", &[&label_mask], vec![attr_i("to", dtype::BOOL as i64)], "dpo/answer_positions_mask");
    let nz = b.op("NonZero", &[&on], vec![], "dpo/answer_positions_nz");
    let at = b.op("Transpose", &[&nz], vec![crate::onnx::attr_ints("perm", &[1, 0])], "dpo/answer_positions");
    let lab = b.op("GatherND", &[&labels, &at], vec![], "dpo/answer_labels");
    let zero = b.int(0);
    let row = b.op("Gather", &[&at, &zero], vec![attr_i("axis", 1)], "dpo/answer_row");
    let rows = b.dim_scalar(m.input_ids, 0, "dpo/rows_count");
    AnswerTokens { at, labels: lab, seq: row, count: rows }
}

/// Per-row token weights [rows, T] selecting where the head reads the hidden state.
fn head_weights(b: &mut Builder, m: &ModelTensors, mask: &str, cfg: &ObjectiveConfig) -> String {
    let am = b.op("Cast", &[m.attention_mask], vec![attr_i("to", dtype::FLOAT as i64)], "beta/attention");
    let axis1 = b.ints(&[1]);
    let region = match cfg.beta_source {
        // prompt tokens: attended and not part of the answer
        BetaSource::Prompt => b.op("Sub", &[&am, mask], vec![], "beta/prompt_tokens"),
        BetaSource::Sequence => am.clone(),
    };
    match cfg.beta_aggregate {
        BetaAggregate::Mean => {
            let n = b.op("ReduceSum", &[&region, &axis1], vec![attr_i("keepdims", 1)], "beta/count");
            b.op("Div", &[&region, &n], vec![], "beta/token_weights")
        }
        BetaAggregate::Last => {
            // The last token of the region: right padding makes it index count-1.
            let n = b.op("ReduceSum", &[&region, &axis1], vec![attr_i("keepdims", 1)], "beta/count");
            let one = b.scalar(1.0, dtype::FLOAT);
            let last = b.op("Sub", &[&n, &one], vec![], "beta/last_index");
            let t = b.dim_scalar(m.input_ids, 1, "beta/seq_len");
            let z = b.int(0);
            let o = b.int(1);
            let pos = b.op("Range", &[&z, &t, &o], vec![], "beta/positions");
            let posf = b.op("Cast", &[&pos], vec![attr_i("to", dtype::FLOAT as i64)], "beta/positions_f");
            let hit = b.op("Equal", &[&posf, &last], vec![], "beta/is_last");
            b.op("Cast", &[&hit], vec![attr_i("to", dtype::FLOAT as i64)], "beta/token_weights")
        }
    }
}

/// beta = beta_min + softplus(w . h + b), one value per row. A finite beta_max bounds it smoothly:
/// beta = beta_min + R tanh(softplus(.) / R) with R = beta_max - beta_min. A hard clip would stop
/// the gradient of every context that reached the bound, and the head could never bring it back.
pub fn beta_head(b: &mut Builder, m: &ModelTensors, mask: &str, cfg: &ObjectiveConfig) -> String {
    let weights = head_weights(b, m, mask, cfg);
    let last = b.ints(&[-1]);
    let w3 = b.op("Unsqueeze", &[&weights, &last], vec![], "beta/token_weights3");
    let weighted = b.op("Mul", &[m.hidden, &w3], vec![], "beta/weighted_hidden");
    let axis1 = b.ints(&[1]);
    let h = b.op("ReduceSum", &[&weighted, &axis1], vec![attr_i("keepdims", 0)], "beta/hidden");
    head_on_context(b, &h, m.hidden_size, cfg)
}

/// The width at which the normalized head steps like the raw one on unit-RMS states: the head
/// learning rate's default was tuned on 64-wide models.
pub const HEAD_REFERENCE_WIDTH: f64 = 64.0;

/// The head on per-row context vectors `h` [rows, H].
fn head_on_context(b: &mut Builder, h: &str, hidden_size: i64, cfg: &ObjectiveConfig) -> String {
    let detached;
    let h = if cfg.detach_head_input {
        detached = b.op("Identity", &[h], vec![], &format!("{STOP_GRADIENT}beta/hidden"));
        detached.as_str()
    } else {
        h
    };
    let z = match cfg.head_input {
        HeadInput::Raw => b.op("MatMul", &[h, HEAD_WEIGHT], vec![], "beta/head_matmul"),
        HeadInput::Normalized => {
            let last = b.ints(&[-1]);
            let inv_width = b.scalar(1.0 / hidden_size as f64, dtype::FLOAT);
            let sq = b.op("Mul", &[h, h], vec![], "beta/hidden_sq");
            // ReduceSum, not ReduceMean: the latter takes its axes as an input only from opset 18.
            let ss = b.op("ReduceSum", &[&sq, &last], vec![attr_i("keepdims", 1)], "beta/hidden_ss");
            let ms = b.op("Mul", &[&ss, &inv_width], vec![], "beta/hidden_ms");
            // Keeps an all-zero context (a padding row) finite.
            let eps = b.scalar(1e-6, dtype::FLOAT);
            let ms = b.op("Add", &[&ms, &eps], vec![], "beta/hidden_ms_eps");
            let rms = b.op("Sqrt", &[&ms], vec![], "beta/hidden_rms");
            let unit = b.op("Div", &[h, &rms], vec![], "beta/hidden_unit");
            let z = b.op("MatMul", &[&unit, HEAD_WEIGHT], vec![], "beta/head_matmul");
            let scale = b.scalar(HEAD_REFERENCE_WIDTH / hidden_size as f64, dtype::FLOAT);
            b.op("Mul", &[&z, &scale], vec![], "beta/head_scaled")
        }
    };
    let z = b.op("Add", &[&z, HEAD_BIAS], vec![], "beta/logit");
    let mut beta = b.op("Softplus", &[&z], vec![], "beta/softplus");
    if cfg.beta_max.is_finite() {
        let range = cfg.beta_max - cfg.beta_min;
        let inv = b.scalar(1.0 / range, dtype::FLOAT);
        let r = b.scalar(range, dtype::FLOAT);
        let scaled = b.op("Mul", &[&beta, &inv], vec![], "beta/scaled");
        let squashed = b.op("Tanh", &[&scaled], vec![], "beta/squashed");
        beta = b.op("Mul", &[&squashed, &r], vec![], "beta/bounded");
    }
    if cfg.beta_min > 0.0 {
        let lo = b.scalar(cfg.beta_min, dtype::FLOAT);
        beta = b.op("Add", &[&beta, &lo], vec![], "beta/floored");
    }
    b.op("Identity", &[&beta], vec![], "beta_rows")
}

/// A zero weight and the bias that makes every context's beta exactly `beta_init`.
pub fn head_initial_values(hidden_size: i64, cfg: &ObjectiveConfig) -> Vec<TensorProto> {
    let above_min = cfg.beta_init - cfg.beta_min;
    let softplus_value = if cfg.beta_max.is_finite() {
        let range = cfg.beta_max - cfg.beta_min;
        range * (above_min / range).atanh()
    } else {
        above_min
    };
    let bias = inverse_softplus(softplus_value) as f32;
    vec![tensor_f32(HEAD_WEIGHT, &[hidden_size], &vec![0.0; hidden_size as usize]), tensor_f32(HEAD_BIAS, &[1], &[bias])]
}

/// Appends the objective; returns its tensor names. Nodes go into `b`. In order: the answers'
/// log-ratios, a method's own beta (beta-DPO's batch beta, epsilon-DPO's per-pair beta), the beta
/// source, the rewards, the per-pair loss, its mean, and the beta regulariser.
pub fn build(b: &mut Builder, m: &ModelTensors, cfg: &ObjectiveConfig) -> Objective {
    let mut inputs = match m.layout {
        Layout::Padded => vec![crate::onnx::value_info(COMPLETION_MASK, dtype::FLOAT, &rows_dims())],
        Layout::Packed => packed::inputs(),
    };
    inputs.push(crate::onnx::value_info(REF_LOGPS, dtype::FLOAT, &[Dim::Sym("rows".into())]));
    let policy = match m.layout {
        Layout::Padded => sequence_logps(b, m, COMPLETION_MASK),
        Layout::Packed => packed::sequence_logps(b, m),
    };
    let delta = b.op("Sub", &[&policy, REF_LOGPS], vec![], "dpo/log_ratio");
    let (dc, dr) = halves(b, &delta, "dpo/log_ratio");

    let batch_beta = cfg.beta_dpo.as_ref().map(|d| {
        inputs.extend(beta_dpo::inputs());
        beta_dpo::batch_beta(b, &dc, &dr, d)
    });
    let pair_beta = cfg.epsilon_dpo.map(|e| {
        let reference = m.reference.expect("build_artifacts adds the reference copy for epsilon-DPO");
        inputs.extend(epsilon_dpo::inputs());
        let tokens = match m.layout {
            Layout::Padded => padded_answer_tokens(b, m, COMPLETION_MASK),
            Layout::Packed => packed::answer_tokens(b),
        };
        epsilon_dpo::pair_beta(b, m, reference, &tokens, e.epsilon)
    });
    let method_beta = batch_beta.as_ref().map(|bb| &bb.beta).or(pair_beta.as_ref().map(|pb| &pb.beta));
    let betas = betas(b, m, cfg, &dc, method_beta);
    let chosen_rewards = b.op("Mul", &[&betas.chosen, &dc], vec![], "chosen_rewards");
    let rejected_rewards = b.op("Mul", &[&betas.rejected, &dr], vec![], "rejected_rewards");
    let u = b.op("Sub", &[&chosen_rewards, &rejected_rewards], vec![], "dpo/logits");
    let per_pair = pair_loss(b, cfg, &u, (&dc, &dr), &betas);
    let loss = match &batch_beta {
        // the mean over the pairs beta-DPO's filter keeps
        Some(bb) => {
            let kept = b.op("Mul", &[&per_pair, &bb.kept], vec![], "beta_dpo/kept_loss");
            let sum = b.op("ReduceSum", &[&kept], vec![attr_i("keepdims", 0)], "beta_dpo/kept_loss_sum");
            b.op("Div", &[&sum, &bb.kept_count], vec![], "dpo/loss")
        }
        None => b.op("ReduceMean", &[&per_pair], vec![attr_i("keepdims", 0)], "dpo/loss"),
    };
    let loss = with_beta_regulariser(b, cfg, loss, &betas.out);
    let loss = b.op("Identity", &[&loss], vec![], "loss");
    let Betas { out: beta, head, .. } = betas;
    Objective { loss, policy_logps: policy, beta, chosen_rewards, rejected_rewards, inputs, head, beta_dpo: batch_beta, epsilon_dpo: pair_beta }
}

/// The beta each answer's reward uses, the beta the graph outputs, and the head's initial values.
struct Betas {
    chosen: String,
    rejected: String,
    out: String,
    head: Vec<TensorProto>,
}

/// A method's own beta, else a fixed beta, else the learned head (per prompt or per sequence).
fn betas(b: &mut Builder, m: &ModelTensors, cfg: &ObjectiveConfig, dc: &str, method_beta: Option<&String>) -> Betas {
    let same = |beta: String, head| Betas { chosen: beta.clone(), rejected: beta.clone(), out: beta, head };
    match (cfg.fixed_beta, method_beta) {
        (_, Some(beta)) => same(beta.clone(), vec![]),
        (Some(fixed), None) => {
            let k = b.scalar(fixed, dtype::FLOAT);
            let shape = b.op("Shape", &[dc], vec![], "beta/pair_shape");
            same(b.op("Expand", &[&k, &shape], vec![], "beta"), vec![])
        }
        (None, None) => {
            let rows = match m.layout {
                Layout::Padded => beta_head(b, m, COMPLETION_MASK, cfg),
                Layout::Packed => {
                    let h = packed::head_context(b, m);
                    head_on_context(b, &h, m.hidden_size, cfg)
                }
            };
            let head = head_initial_values(m.hidden_size, cfg);
            let (bc, br) = halves(b, &rows, "beta/rows");
            match cfg.beta_source {
                BetaSource::Prompt => same(b.op("Identity", &[&bc], vec![], "beta"), head),
                BetaSource::Sequence => Betas { chosen: bc, rejected: br, out: b.op("Identity", &[&rows], vec![], "beta"), head },
            }
        }
    }
}

/// Each pair's loss from `u` = chosen reward − rejected reward: sigmoid (cDPO with label smoothing),
/// IPO (on the log-ratios `d`), or hinge.
fn pair_loss(b: &mut Builder, cfg: &ObjectiveConfig, u: &str, (dc, dr): (&str, &str), betas: &Betas) -> String {
    match cfg.loss {
        LossKind::Sigmoid => {
            let nu = b.op("Neg", &[u], vec![], "dpo/neg_logits");
            let l = b.op("Softplus", &[&nu], vec![], "dpo/sigmoid_loss");
            if cfg.label_smoothing <= 0.0 {
                return l;
            }
            let eps = cfg.label_smoothing;
            let flipped = b.op("Softplus", &[u], vec![], "dpo/flipped_loss");
            let a = b.scalar(1.0 - eps, dtype::FLOAT);
            let e = b.scalar(eps, dtype::FLOAT);
            let l1 = b.op("Mul", &[&l, &a], vec![], "dpo/kept");
            let l2 = b.op("Mul", &[&flipped, &e], vec![], "dpo/smoothed");
            b.op("Add", &[&l1, &l2], vec![], "dpo/cdpo_loss")
        }
        LossKind::Ipo => {
            // (h - 1/(2 beta))^2 with h the difference of log-ratios (TRL's IPO)
            let h = b.op("Sub", &[dc, dr], vec![], "dpo/h");
            let beta = if cfg.beta_source == BetaSource::Sequence && cfg.has_head() {
                let s = b.op("Add", &[&betas.chosen, &betas.rejected], vec![], "dpo/beta_sum");
                let half = b.scalar(0.5, dtype::FLOAT);
                b.op("Mul", &[&s, &half], vec![], "dpo/beta_mean")
            } else {
                betas.chosen.clone()
            };
            let two = b.scalar(2.0, dtype::FLOAT);
            let tb = b.op("Mul", &[&beta, &two], vec![], "dpo/two_beta");
            let inv = b.op("Reciprocal", &[&tb], vec![], "dpo/ipo_target");
            let d = b.op("Sub", &[&h, &inv], vec![], "dpo/ipo_gap");
            b.op("Mul", &[&d, &d], vec![], "dpo/ipo_loss")
        }
        LossKind::Hinge => {
            let one = b.scalar(1.0, dtype::FLOAT);
            let d = b.op("Sub", &[&one, u], vec![], "dpo/hinge_gap");
            b.op("Relu", &[&d], vec![], "dpo/hinge_loss")
        }
    }
}

/// `loss + λ·mean((log β − log β_init)²)` with `--beta-reg λ` on a learned beta.
fn with_beta_regulariser(b: &mut Builder, cfg: &ObjectiveConfig, loss: String, beta: &str) -> String {
    if cfg.beta_reg <= 0.0 || !cfg.has_head() {
        return loss;
    }
    let lb = b.op("Log", &[beta], vec![], "beta/log");
    let l0 = b.scalar(cfg.beta_init.ln(), dtype::FLOAT);
    let d = b.op("Sub", &[&lb, &l0], vec![], "beta/log_drift");
    let sq = b.op("Mul", &[&d, &d], vec![], "beta/log_drift_sq");
    let m = b.op("ReduceMean", &[&sq], vec![attr_i("keepdims", 0)], "beta/reg_mean");
    let lam = b.scalar(cfg.beta_reg, dtype::FLOAT);
    let reg = b.op("Mul", &[&m, &lam], vec![], "beta/reg");
    b.op("Add", &[&loss, &reg], vec![], "dpo/regularised_loss")
}
