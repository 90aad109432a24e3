//! Activity analysis: a tensor needs a gradient when it is a float tensor that depends on a
//! parameter (forward reachability) and the loss depends on it (backward reachability). Integer and
//! boolean tensors, and so all shape subgraphs, are never active.

use std::collections::HashSet;

use crate::graph::{Graph, TensorInfos};
use crate::onnx::dtype;

#[derive(Debug, Default)]
pub struct Activity {
    /// Active tensors.
    pub tensors: HashSet<String>,
    /// Indices of nodes with at least one active output, in graph order.
    pub nodes: Vec<usize>,
}

/// Ops whose outputs never carry a gradient even when their inputs do (their outputs are
/// piecewise constant in the inputs, or they read only shapes).
pub const NOT_DIFFERENTIABLE: &[&str] = &[
    "Shape",
    "Size",
    "ArgMax",
    "ArgMin",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "IsNaN",
    "IsInf",
    "NonZero",
    "ConstantOfShape",
    "EyeLike",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
    "Multinomial",
    "TopK_indices",
];

/// ONNX has no stop-gradient op: an `Identity` whose output name starts with this prefix is one.
/// Its output equals its input, but no gradient flows through it (e.g. beta-DPO's batch beta,
/// which the paper computes from detached margins).
pub const STOP_GRADIENT: &str = "stop_gradient/";

fn stops_gradient(n: &crate::onnx::NodeProto) -> bool {
    NOT_DIFFERENTIABLE.contains(&n.op_type.as_str()) || (n.op_type == "Identity" && n.output.iter().any(|o| o.starts_with(STOP_GRADIENT)))
}

pub fn analyze(graph: &Graph, params: &[String], loss: &str, infos: &TensorInfos) -> Activity {
    let is_float = |name: &str| infos.get(name).map(|i| dtype::is_float(i.dtype)).unwrap_or(false);
    let mut forward: HashSet<String> = params.iter().cloned().collect();
    for n in &graph.nodes {
        if stops_gradient(n) {
            continue;
        }
        if n.input.iter().any(|x| forward.contains(x)) {
            for o in &n.output {
                if !o.is_empty() && is_float(o) {
                    forward.insert(o.clone());
                }
            }
        }
    }
    let mut backward: HashSet<String> = HashSet::new();
    if forward.contains(loss) {
        backward.insert(loss.to_string());
    }
    let mut nodes = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate().rev() {
        if n.output.iter().any(|o| backward.contains(o)) {
            let mut any = false;
            for x in &n.input {
                if forward.contains(x) {
                    backward.insert(x.clone());
                    any = true;
                }
            }
            if any {
                nodes.push(i);
            }
        }
    }
    nodes.reverse();
    let tensors = forward.intersection(&backward).cloned().collect();
    Activity { tensors, nodes }
}
