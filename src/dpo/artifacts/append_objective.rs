//! Phase 5: the DPO objective appended to the laid-out model — the beta head (or a fixed, batch or
//! per-pair beta), the answer log-probs, the loss and TRL's metrics — with the batch inputs it reads.
//! epsilon-DPO also gets a frozen copy of the model here, whose logits it reads.

use crate::dpo::manifest::TensorSpec;
use crate::dpo::model::reference_copy::{self, ReferenceCopy};
use crate::dpo::model::LmSignature;
use crate::dpo::objective::chunked_logps::VocabChunks;
use crate::dpo::objective::{self, ModelTensors, Objective, COMPLETION_MASK, REF_LOGPS};
use crate::dpo::objective::{beta_dpo, epsilon_dpo};
use crate::dpo::packing;
use crate::dpo::ObjectiveConfig;
use crate::graph::Builder;
use crate::Result;

use super::layout::LaidOut;
use super::specs::{lm_inputs, metric_outputs, set_outputs};

pub struct Appended {
    pub obj: Objective,
    /// The batch's inputs (tokens, layout, reference log-probs, a method's own), without parameters.
    pub batch_inputs: Vec<TensorSpec>,
    /// The loss and metrics; `differentiate` adds the gradients.
    pub outputs: Vec<TensorSpec>,
    pub reference: Option<ReferenceCopy>,
}

/// With `chunks`, the policy's answer log-probs are computed a vocabulary slice at a time.
pub fn append(laid: &mut LaidOut, sig: &LmSignature, cfg: &ObjectiveConfig, chunks: Option<VocabChunks>) -> Result<Appended> {
    let graph = &mut laid.graph;
    let reference = match cfg.epsilon_dpo {
        Some(_) => Some(reference_copy::add_reference_copy(graph, sig)?),
        None => None,
    };
    let reference_tensors = reference.as_ref().map(|r| epsilon_dpo::reference_tensors(r, sig, laid.layout));
    let mut tensors = ModelTensors::of(sig, true);
    tensors.layout = laid.layout;
    tensors.reference = reference_tensors.as_ref();
    tensors.vocab_chunks = chunks;
    let batch_inputs = batch_inputs(sig, laid.own_positions, cfg);
    let mut names = graph.names.clone();
    let mut b = Builder::new(&mut names, objective::NODE_PREFIX);
    let obj = objective::build(&mut b, &tensors, cfg);
    graph.nodes.extend(b.take());
    graph.names = names;
    graph.inputs.extend(obj.inputs.iter().cloned());
    graph.initializers.extend(obj.head.iter().cloned());
    let outputs = metric_outputs(&obj, cfg);
    set_outputs(graph, &outputs);
    graph.prune();
    Ok(Appended { obj, batch_inputs, outputs, reference })
}

/// What a batch feeds: the layout's token inputs, the cached reference log-probs, and the inputs
/// beta-DPO (running margin statistics, selection noise) and epsilon-DPO read.
fn batch_inputs(sig: &LmSignature, own_positions: Option<bool>, cfg: &ObjectiveConfig) -> Vec<TensorSpec> {
    let mut v = match own_positions {
        None => {
            let mut v = lm_inputs(sig);
            v.push(TensorSpec::float_named(COMPLETION_MASK, "completion_mask", &["rows", "sequence"]));
            v
        }
        Some(own) => packing::inputs::specs(sig, own),
    };
    v.push(TensorSpec::float_named(REF_LOGPS, "ref_logps", &["rows"]));
    if cfg.beta_dpo.is_some() {
        v.push(TensorSpec::float(beta_dpo::MARGIN_STATS, "margin_stats", &[2]).described("beta-DPO's running mean and std of the margin, before this batch"));
        v.push(TensorSpec::float_named(beta_dpo::SELECTION_NOISE, "selection_noise", &["pairs"]).described("standard Gumbel noise for beta-DPO's filter"));
    }
    if cfg.epsilon_dpo.is_some() {
        v.push(epsilon_dpo::input_spec());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::layout::choose;
    use crate::dpo::artifacts::load::{load, tests::quickstart_model};
    use crate::dpo::packing::LayoutChoice;

    /// After the phase, every input the objective reads is either a batch input the manifest
    /// describes or the model's own, and the graph's outputs are exactly the metrics.
    #[test]
    fn the_objective_reads_only_described_inputs_and_outputs_the_metrics() {
        let m = load(&quickstart_model(), None).unwrap();
        for choice in [LayoutChoice::Padded, LayoutChoice::Packed] {
            let mut laid = choose(&m.base, &m.sig, choice).unwrap();
            let cfg = ObjectiveConfig::default();
            let a = append(&mut laid, &m.sig, &cfg, None).unwrap();
            let outs: Vec<&str> = laid.graph.outputs.iter().map(|o| o.name.as_str()).collect();
            let want: Vec<&str> = a.outputs.iter().map(|o| o.name.as_str()).collect();
            assert_eq!(outs, want);
            for i in &laid.graph.inputs {
                assert!(a.batch_inputs.iter().any(|s| s.name == i.name), "{choice:?}: input {} is not described", i.name);
            }
        }
    }
}
