//! Recognising a causal LM export: its token inputs, its `logits` output, and the final hidden
//! state (the activation input of the MatMul/Gemm that produces the logits).

use crate::graph::Graph;
use crate::{Error, Result};

pub struct LmSignature {
    pub input_ids: String,
    pub attention_mask: String,
    pub position_ids: Option<String>,
    pub logits: String,
    pub hidden: String,
    pub hidden_size: i64,
    /// The lm_head weight the hidden state is multiplied with.
    pub lm_head: String,
    /// How `logits` is computed when it comes straight from the lm_head product (no soft-capping or
    /// other op after it), so the objective can apply the same head to answer positions only.
    pub projection: Option<Projection>,
}

/// `logits = hidden @ W (+ bias)`: a MatMul, or a Gemm with transA = 0, alpha = beta = 1.
#[derive(Clone, Debug)]
pub struct Projection {
    pub weight: String,
    pub trans_b: bool,
    pub bias: Option<String>,
}

fn projection_of(n: &crate::onnx::NodeProto, weight: &str) -> Option<Projection> {
    use crate::onnx::NodeAttrs;
    match n.op_type.as_str() {
        "MatMul" if n.input[1] == weight => Some(Projection { weight: weight.to_string(), trans_b: false, bias: None }),
        "Gemm" if n.input[1] == weight && n.int_or("transA", 0) == 0 && n.float_or("alpha", 1.0) == 1.0 && n.float_or("beta", 1.0) == 1.0 => {
            Some(Projection { weight: weight.to_string(), trans_b: n.int_or("transB", 0) != 0, bias: n.input.get(2).filter(|c| !c.is_empty()).cloned() })
        }
        _ => None,
    }
}

/// Ops the walk from `logits` back to the lm_head may pass through (casts, reshapes,
/// soft-capping, scaling, a bias).
const PASS_THROUGH: &[&str] = &["Identity", "Cast", "Reshape", "Tanh", "Mul", "Div", "Add", "Squeeze", "Unsqueeze", "Flatten"];

pub fn recognise(graph: &Graph, hidden_override: Option<&str>) -> Result<LmSignature> {
    let input = |names: &[&str]| graph.inputs.iter().find(|i| names.contains(&i.name.as_str())).map(|i| i.name.clone());
    let input_ids = input(&["input_ids"]).ok_or_else(|| {
        Error::graph(format!("the model has no `input_ids` input (inputs: {})", graph.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")))
    })?;
    let attention_mask = input(&["attention_mask"]).ok_or_else(|| Error::graph("the model has no `attention_mask` input"))?;
    let position_ids = input(&["position_ids"]);
    let extra: Vec<&str> = graph
        .inputs
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| ![input_ids.as_str(), attention_mask.as_str(), "position_ids"].contains(n) && graph.initializer(n).is_none())
        .collect();
    if !extra.is_empty() {
        return Err(Error::graph(format!(
            "the model has inputs besides input_ids/attention_mask/position_ids (and a KV cache: past_key_values.*, use_cache_branch): {}",
            extra.join(", ")
        )));
    }
    let logits = graph.outputs.iter().find(|o| o.name == "logits").map(|o| o.name.clone()).ok_or_else(|| {
        Error::graph(format!("the model has no `logits` output (outputs: {})", graph.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", ")))
    })?;
    let producers = graph.producers();
    let params: std::collections::HashSet<&str> = graph.initializers.iter().map(|t| t.name.as_str()).collect();
    let is_weightish = |name: &str| -> bool {
        params.contains(name)
            || producers
                .get(name)
                .map(|&i| {
                    matches!(graph.nodes[i].op_type.as_str(), "Transpose" | "Constant" | "Identity")
                        && graph.nodes[i].input.first().map(|x| params.contains(x.as_str())).unwrap_or(true)
                })
                .unwrap_or(false)
    };
    let mut cur = logits.clone();
    // what the walk passes: the logits and what computes them from the lm_head's product
    let mut after_head: Vec<String> = Vec::new();
    for _ in 0..16 {
        after_head.push(cur.clone());
        let Some(&i) = producers.get(cur.as_str()) else { break };
        let n = &graph.nodes[i];
        match n.op_type.as_str() {
            "MatMul" | "Gemm" => {
                let (act, w) = if is_weightish(&n.input[1]) { (&n.input[0], &n.input[1]) } else { (&n.input[1], &n.input[0]) };
                if let Some(h) = hidden_override.filter(|h| after_head.iter().any(|a| a == h)) {
                    return Err(Error::BadFlag {
                        flag: "--hidden-state".into(),
                        detail: format!("{h} comes after the lm_head (the logits, one value per vocabulary entry); the beta head reads a hidden state, such as the lm_head's input {act}"),
                    });
                }
                let hidden = hidden_override.map(str::to_string).unwrap_or_else(|| act.clone());
                let hidden_size = weight_hidden_size(graph, n, w)
                    .ok_or_else(|| Error::graph(format!("cannot tell the hidden size from the lm_head weight {w} of node {}", n.name)))?;
                let projection = if cur == logits && hidden_override.is_none() { projection_of(n, w) } else { None };
                return Ok(LmSignature { input_ids, attention_mask, position_ids, logits, hidden, hidden_size, lm_head: w.clone(), projection });
            }
            op if PASS_THROUGH.contains(&op) => {
                // follow the non-constant input
                let next = n
                    .input
                    .iter()
                    .find(|x| !params.contains(x.as_str()) && producers.get(x.as_str()).map(|&j| graph.nodes[j].op_type != "Constant").unwrap_or(false));
                match next {
                    Some(x) => cur = x.clone(),
                    None => break,
                }
            }
            _ => break,
        }
    }
    Err(Error::graph("cannot find the final hidden state: no MatMul/Gemm produces `logits`; name it with --hidden-state NAME"))
}

/// Hidden size from the lm_head weight's shape ([H, V] for MatMul, [V, H] for Gemm with transB).
fn weight_hidden_size(graph: &Graph, node: &crate::onnx::NodeProto, w: &str) -> Option<i64> {
    use crate::onnx::NodeAttrs;
    let dims = match graph.initializer(w) {
        Some(t) => t.dims.clone(),
        None => {
            // tied weight recomputed by a Transpose of an initializer
            let p = graph.producers();
            let n = &graph.nodes[*p.get(w)?];
            let t = graph.initializer(n.input.first()?)?;
            if n.op_type == "Transpose" && t.dims.len() == 2 {
                vec![t.dims[1], t.dims[0]]
            } else {
                t.dims.clone()
            }
        }
    };
    if dims.len() != 2 {
        return None;
    }
    let trans_b = node.op_type == "Gemm" && node.int_or("transB", 0) != 0;
    Some(if trans_b { dims[1] } else { dims[0] }).filter(|&h| h > 0)
}
/// Rows of the position table the model gathers from (gpt2's `wpe`), the most positions it can
/// take: the smallest 2-D initializer read by a Gather whose indices come from a graph input
/// (through its shape, as `range(sequence)` does, or its values) but not from the token ids'
/// values (that Gather is the token embedding). `None` when the model has no such table (rotary
/// models compute positions and have no hard limit).
pub fn position_table_rows(graph: &Graph, input_ids: &str) -> Option<usize> {
    let producers = graph.producers();
    let inputs: std::collections::HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    // whether `start` depends on `target` (any graph input when `None`), optionally not through a Shape
    let reaches = |start: &str, target: Option<&str>, through_shape: bool| {
        let mut stack = vec![start.to_string()];
        let mut seen = std::collections::HashSet::new();
        while let Some(t) = stack.pop() {
            if target.map_or(inputs.contains(t.as_str()), |x| x == t) {
                return true;
            }
            if !seen.insert(t.clone()) || seen.len() > 100_000 {
                continue;
            }
            if let Some(&n) = producers.get(t.as_str()) {
                let node = &graph.nodes[n];
                if !through_shape && matches!(node.op_type.as_str(), "Shape" | "Size") {
                    continue;
                }
                stack.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
            }
        }
        false
    };
    graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Gather" && n.input.len() == 2)
        .filter_map(|n| {
            let table = graph.initializer(&n.input[0]).filter(|t| t.dims.len() == 2)?;
            let indices = &n.input[1];
            (reaches(indices, None, true) && !reaches(indices, Some(input_ids), false)).then_some(table.dims[0])
        })
        .filter(|&rows| rows >= 2)
        .min()
        .and_then(|rows| usize::try_from(rows).ok())
}
