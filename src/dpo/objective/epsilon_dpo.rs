//! epsilon-DPO (Lee et al. 2025, arXiv 2502.13177; reference code oddqueue/e-dpo `trainer.py`): a
//! per-pair beta from whether the policy's log-ratio is monotone between two perturbed policies.
//!
//! On the answer tokens, with policy logits `z` and reference logits `z_ref`, the perturbed policies
//! have logits `(1 + eps) z - eps z_ref` and `(1 - eps) z + eps z_ref`, each normalised by its own
//! log-softmax. With `lr`, `lr+` and `lr-` the chosen-minus-rejected sequence log-probs of the
//! policy and the two perturbed policies, a pair's step is +1 when `lr+ > lr > lr-`, -1 when
//! `lr- > lr > lr+`, else 0, and its beta is `beta / (1 + eps step)`. After each optimizer step the
//! trainer sets `beta <- beta / (1 + eps mean(step))` over the pairs of the whole step.
//!
//! None of this carries a gradient (the reference code computes it under `torch.no_grad()`): the
//! policy's answer logits enter behind a stop-gradient, the reference's come from the frozen copy
//! ([`crate::dpo::model::reference_copy`]). The graph takes the global beta as an input and returns the
//! pairs' betas and steps and the beta this batch alone would lead to (the trainer accumulates the
//! steps over the micro-batches of a step).

use crate::autodiff::STOP_GRADIENT;
use crate::dpo::manifest::TensorSpec;
use crate::dpo::model::reference_copy::ReferenceCopy;
use crate::dpo::model::LmSignature;
use crate::dpo::objective::answer_logps::{answer_logits, logits_to_sequences, AnswerTokens, ModelTensors};
use crate::dpo::packing::Layout;
use crate::graph::Builder;
use crate::onnx::{attr_i, dtype, Dim, ValueInfoProto};
use crate::runtime::HostTensor;
use ndarray::{ArrayD, IxDyn};

/// The global beta before this batch, [1].
pub const EPSILON_BETA: &str = "epsilon_beta";
/// Each pair's step in {-1, 0, +1} (float), [pairs].
pub const EPSILON_STEPS: &str = "epsilon_steps";
/// `beta / (1 + eps mean(step))` over this batch's pairs, [1].
pub const EPSILON_BETA_NEXT: &str = "epsilon_beta_next";

/// What epsilon-DPO adds to the objective.
#[derive(Clone, Debug)]
pub struct PairBeta {
    /// beta for every pair.
    pub beta: String,
    pub steps: String,
    pub beta_next: String,
}

pub fn inputs() -> Vec<ValueInfoProto> {
    vec![crate::onnx::value_info(EPSILON_BETA, dtype::FLOAT, &[Dim::Fixed(1)])]
}

/// The manifest's entry for the global-beta input.
pub fn input_spec() -> TensorSpec {
    TensorSpec::float(EPSILON_BETA, "epsilon_beta", &[1]).described("epsilon-DPO's global beta before this step")
}

/// The manifest's entries for what the graph returns besides the pairs' betas.
pub fn outputs(pb: &PairBeta) -> Vec<TensorSpec> {
    vec![
        TensorSpec::float_named(&pb.steps, "epsilon_steps", &["pairs"]).described("epsilon-DPO's step per pair: +1, -1 or 0"),
        TensorSpec::float(&pb.beta_next, "epsilon_beta_next", &[1]).described("beta / (1 + epsilon mean(step)) over this batch"),
    ]
}

/// The reference copy as the objective reads it: the batch inputs are the policy's.
pub fn reference_tensors<'a>(copy: &'a ReferenceCopy, sig: &'a LmSignature, layout: Layout) -> ModelTensors<'a> {
    ModelTensors {
        input_ids: &sig.input_ids,
        attention_mask: &sig.attention_mask,
        logits: &copy.logits,
        hidden: &copy.hidden,
        hidden_size: sig.hidden_size,
        projection: copy.projection.as_ref(),
        layout,
        reference: None,
        vocab_chunks: None,
    }
}

/// The global beta fed to the shape probes.
pub fn probe_inputs(beta0: f64) -> Vec<(String, HostTensor)> {
    vec![(EPSILON_BETA.into(), HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[1]), vec![beta0 as f32]).expect("one value")))]
}

/// The pairs' betas and steps from the policy `m` and the reference copy `reference` on the answer
/// `tokens` (sequences `0..B` chosen, `B..2B` rejected).
pub fn pair_beta(b: &mut Builder, m: &ModelTensors, reference: &ModelTensors, tokens: &AnswerTokens, epsilon: f64) -> PairBeta {
    let z = answer_logits(b, m, &tokens.at);
    let z = b.op("Identity", &[&z], vec![], &format!("{STOP_GRADIENT}epsilon_dpo/policy_logits"));
    let z_ref = answer_logits(b, reference, &tokens.at);
    // the copy's weights are frozen already; this keeps the parameter search off the copy too
    let z_ref = b.op("Identity", &[&z_ref], vec![], &format!("{STOP_GRADIENT}epsilon_dpo/reference_logits"));
    let plus = mixture(b, &z, &z_ref, 1.0 + epsilon, -epsilon, "epsilon_dpo/p_epsilon_logits");
    let minus = mixture(b, &z, &z_ref, 1.0 - epsilon, epsilon, "epsilon_dpo/n_epsilon_logits");
    let lr = log_ratio(b, &z, tokens, "epsilon_dpo/logratios");
    let lr_plus = log_ratio(b, &plus, tokens, "epsilon_dpo/p_epsilon_logratios");
    let lr_minus = log_ratio(b, &minus, tokens, "epsilon_dpo/n_epsilon_logratios");

    let up = between(b, &lr_plus, &lr, &lr_minus, "epsilon_dpo/p_epsilon_steps");
    let down = between(b, &lr_minus, &lr, &lr_plus, "epsilon_dpo/n_epsilon_steps");
    let steps = b.op("Sub", &[&up, &down], vec![], EPSILON_STEPS);

    let eps = b.scalar(epsilon, dtype::FLOAT);
    let one = b.scalar(1.0, dtype::FLOAT);
    let scaled = b.op("Mul", &[&steps, &eps], vec![], "epsilon_dpo/eps_steps");
    let divisor = b.op("Add", &[&scaled, &one], vec![], "epsilon_dpo/divisor");
    let beta = b.op("Div", &[EPSILON_BETA, &divisor], vec![], "beta");

    let mean = b.op("ReduceMean", &[&steps], vec![attr_i("keepdims", 1)], "epsilon_dpo/mean_steps");
    let scaled = b.op("Mul", &[&mean, &eps], vec![], "epsilon_dpo/eps_mean_steps");
    let divisor = b.op("Add", &[&scaled, &one], vec![], "epsilon_dpo/next_divisor");
    let beta_next = b.op("Div", &[EPSILON_BETA, &divisor], vec![], EPSILON_BETA_NEXT);
    PairBeta { beta, steps, beta_next }
}

/// `a z + c z_ref`.
fn mixture(b: &mut Builder, z: &str, z_ref: &str, a: f64, c: f64, name: &str) -> String {
    let a = b.scalar(a, dtype::FLOAT);
    let c = b.scalar(c, dtype::FLOAT);
    let own = b.op("Mul", &[z, &a], vec![], &format!("{name}_own"));
    let other = b.op("Mul", &[z_ref, &c], vec![], &format!("{name}_ref"));
    b.op("Add", &[&own, &other], vec![], name)
}

/// Chosen minus rejected sequence log-prob [B] under answer logits `z`.
fn log_ratio(b: &mut Builder, z: &str, tokens: &AnswerTokens, name: &str) -> String {
    let logps = logits_to_sequences(b, z, tokens, &format!("{name}_logps"));
    let shape = b.ints(&[2, -1]);
    let pairs = b.op("Reshape", &[&logps, &shape], vec![], &format!("{name}_pairs"));
    let zero = b.int(0);
    let one = b.int(1);
    let c = b.op("Gather", &[&pairs, &zero], vec![attr_i("axis", 0)], &format!("{name}_chosen"));
    let r = b.op("Gather", &[&pairs, &one], vec![attr_i("axis", 0)], &format!("{name}_rejected"));
    b.op("Sub", &[&c, &r], vec![], name)
}

/// 1.0 where `hi > mid > lo`, else 0.0.
fn between(b: &mut Builder, hi: &str, mid: &str, lo: &str, name: &str) -> String {
    let above = b.op("Greater", &[hi, mid], vec![], &format!("{name}_upper"));
    let below = b.op("Greater", &[mid, lo], vec![], &format!("{name}_lower"));
    let both = b.op("And", &[&above, &below], vec![], &format!("{name}_both"));
    b.op("Cast", &[&both], vec![attr_i("to", dtype::FLOAT as i64)], name)
}
