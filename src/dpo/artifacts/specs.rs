//! The manifest's descriptions of the graphs' inputs and outputs, and the graph edits that make a
//! graph's outputs and input order match them. Shared by the phases; not a phase itself.

use crate::dpo::manifest::{SpecDim, TensorSpec};
use crate::dpo::model::params::Param;
use crate::dpo::model::LmSignature;
use crate::dpo::objective::epsilon_dpo;
use crate::dpo::objective::Objective;
use crate::dpo::{BetaSource, ObjectiveConfig};
use crate::graph::Graph;
use crate::onnx::{dtype, value_info, Dim};

/// The model's own token inputs, padded rows.
pub fn lm_inputs(sig: &LmSignature) -> Vec<TensorSpec> {
    let token_ids = |name: &str, role: &str| TensorSpec::new(name, role, "int64", &[SpecDim::Named("rows"), SpecDim::Named("sequence")]);
    let mut v = vec![token_ids(&sig.input_ids, "input_ids"), token_ids(&sig.attention_mask, "attention_mask")];
    if let Some(p) = &sig.position_ids {
        v.push(token_ids(p, "position_ids"));
    }
    v
}

/// The trainable parameters, which the graphs take as inputs.
pub fn param_inputs(params: &[Param]) -> Vec<TensorSpec> {
    params.iter().filter(|p| p.trainable).map(|p| TensorSpec::float(&p.name, "parameter", &p.dims).of_parameter(&p.name)).collect()
}

/// The loss and the metrics `train` reads, in TRL's terms.
pub fn metric_outputs(obj: &Objective, cfg: &ObjectiveConfig) -> Vec<TensorSpec> {
    let beta_shape = if cfg.beta_source == BetaSource::Sequence && cfg.has_head() { "rows" } else { "pairs" };
    let per = if beta_shape == "rows" { "sequence" } else { "pair" };
    let mut v = vec![
        TensorSpec::float(&obj.loss, "loss", &[]).described("mean preference loss (plus the beta regulariser)"),
        TensorSpec::float_named(&obj.chosen_rewards, "metric", &["pairs"])
            .described("rewards/chosen: beta x (policy - reference) log-prob of the chosen answer"),
        TensorSpec::float_named(&obj.rejected_rewards, "metric", &["pairs"]).described("rewards/rejected"),
        TensorSpec::float_named(&obj.policy_logps, "metric", &["rows"]).described("logps: policy log-prob of each row's answer"),
        TensorSpec::float_named(&obj.beta, "beta", &[beta_shape]).described(&format!("beta per {per}")),
    ];
    if let Some(bb) = &obj.beta_dpo {
        v.push(TensorSpec::float(&bb.stats_next, "margin_stats", &[2]).described("beta-DPO's running mean and std of the margin, after this batch"));
        v.push(TensorSpec::float_named(&bb.kept, "kept", &["pairs"]).described("1 for the pairs beta-DPO's filter keeps"));
    }
    if let Some(pb) = &obj.epsilon_dpo {
        v.extend(epsilon_dpo::outputs(pb));
    }
    v
}

/// Makes `specs` the graph's outputs, with their dtypes and (named or fixed) dimensions.
pub fn set_outputs(graph: &mut Graph, specs: &[TensorSpec]) {
    graph.outputs = specs
        .iter()
        .map(|s| {
            let t = if s.dtype == "int64" { dtype::INT64 } else { dtype::FLOAT };
            let dims: Vec<Dim> = s
                .shape
                .iter()
                .map(|d| match d.as_i64() {
                    Some(v) => Dim::Fixed(v),
                    None => Dim::Sym(d.as_str().unwrap_or("").to_string()),
                })
                .collect();
            value_info(&s.name, t, &dims)
        })
        .collect();
}

/// Graph inputs in the manifest's order (people read graphs in viewers too).
pub fn order_inputs(graph: &mut Graph, specs: &[TensorSpec]) {
    let pos = |n: &str| specs.iter().position(|s| s.name == n).unwrap_or(usize::MAX);
    graph.inputs.sort_by_key(|i| pos(&i.name));
}
