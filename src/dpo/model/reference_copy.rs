//! The reference model inside the train graph. epsilon-DPO compares the policy with the reference
//! token by token at every step, so the graph needs the reference's logits on the batch, not just
//! the sequence log-probs the trainer precomputes. Two phases:
//!
//! 1. [`add_reference_copy`], before the objective is built: every node of the language model is
//!    copied under `ref/` names; graph inputs (the batch) and initializers (the weights) are shared
//!    by name.
//! 2. [`freeze_reference`], once the trainable set is known and before it is lifted to inputs: the
//!    copy's reads of trainable weights are redirected to frozen `ref/` copies of their initial
//!    values. Frozen weights stay shared, so the copy costs the trainable weights once more (all of
//!    the model in full fine-tuning, as TRL's separate reference model does).
//!
//! LoRA hook: with adapters added as a graph transform on frozen base weights, the reference is the
//! base model with adapters off. Copy the graph *before* the adapters are added (phase 1) and phase 2
//! then finds no trainable weight read by the copy: every base weight is shared and nothing is
//! duplicated.

use std::collections::{HashMap, HashSet};

use crate::dpo::model::params::Param;
use crate::dpo::model::{LmSignature, Projection};
use crate::graph::Graph;
use crate::onnx::NodeProto;
use crate::{Error, Result};

pub const REF_PREFIX: &str = "ref/";

/// Where the copy's tensors are.
#[derive(Clone, Debug)]
pub struct ReferenceCopy {
    pub logits: String,
    pub hidden: String,
    /// The lm_head as the copy reads it (through `ref/` views of its weight and bias).
    pub projection: Option<Projection>,
    /// Names of the copy's nodes.
    nodes: HashSet<String>,
}

/// Phase 1: appends a copy of every node of `graph` (the language model, before the objective).
pub fn add_reference_copy(graph: &mut Graph, sig: &LmSignature) -> Result<ReferenceCopy> {
    if let Some(n) = graph.nodes.iter().find(|n| n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())) {
        return Err(Error::graph(format!("epsilon-DPO's reference copy: node {} ({}) has a subgraph, which the copy cannot rename", n.name, n.op_type)));
    }
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut copies = Vec::with_capacity(graph.nodes.len() + 2);
    for n in &graph.nodes {
        let mut c = n.clone();
        c.name = graph.names.fresh(&format!("{REF_PREFIX}{}", n.name));
        for i in c.input.iter_mut() {
            if let Some(r) = renamed.get(i.as_str()) {
                *i = r.clone();
            }
        }
        for o in c.output.iter_mut().filter(|o| !o.is_empty()) {
            let r = graph.names.fresh(&format!("{REF_PREFIX}{o}"));
            renamed.insert(o.clone(), r.clone());
            *o = r;
        }
        copies.push(c);
    }
    let mut view = |weight: &str| -> String {
        let out = graph.names.fresh(&format!("{REF_PREFIX}{weight}/view"));
        copies.push(NodeProto {
            name: graph.names.fresh(&format!("{REF_PREFIX}{weight}/view")),
            op_type: "Identity".into(),
            input: vec![renamed.get(weight).cloned().unwrap_or_else(|| weight.to_string())],
            output: vec![out.clone()],
            ..Default::default()
        });
        out
    };
    let projection = sig.projection.as_ref().map(|p| Projection { weight: view(&p.weight), trans_b: p.trans_b, bias: p.bias.as_deref().map(&mut view) });
    let lookup = |name: &str| {
        renamed.get(name).cloned().ok_or_else(|| Error::graph(format!("epsilon-DPO's reference copy: {name} is not computed by the model's nodes")))
    };
    let copy = ReferenceCopy { logits: lookup(&sig.logits)?, hidden: lookup(&sig.hidden)?, projection, nodes: copies.iter().map(|n| n.name.clone()).collect() };
    graph.nodes.extend(copies);
    Ok(copy)
}

/// Phase 2: the copy's reads of trainable weights go to frozen `ref/` copies of their initial
/// values. Returns how many initializers were copied.
pub fn freeze_reference(graph: &mut Graph, copy: &ReferenceCopy, params: &[Param]) -> usize {
    let trainable: HashSet<&str> = params.iter().filter(|p| p.trainable && !p.beta_head).flat_map(|p| p.initializers.iter().map(|r| r.name.as_str())).collect();
    // ordered, so the copies' initializers (and the artifacts' bytes) are the same on every build
    let read: std::collections::BTreeSet<String> =
        graph.nodes.iter().filter(|n| copy.nodes.contains(&n.name)).flat_map(|n| n.input.iter().filter(|i| trainable.contains(i.as_str())).cloned()).collect();
    let mut frozen: HashMap<String, String> = HashMap::new();
    for name in &read {
        let Some(t) = graph.initializer(name).cloned() else { continue };
        let fresh = graph.names.fresh(&format!("{REF_PREFIX}{name}"));
        graph.initializers.push(crate::onnx::TensorProto { name: fresh.clone(), ..t });
        frozen.insert(name.clone(), fresh);
    }
    for n in graph.nodes.iter_mut().filter(|n| copy.nodes.contains(&n.name)) {
        for i in n.input.iter_mut() {
            if let Some(f) = frozen.get(i.as_str()) {
                *i = f.clone();
            }
        }
    }
    frozen.len()
}
