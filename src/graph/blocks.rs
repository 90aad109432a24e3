//! Where an exported decoder's blocks are: the layer index in node names (`/h.3/` in GPT-2
//! TorchScript exports) or in the names of the weights a node reads (`model.layers.3.` in dynamo
//! exports, whose node names carry none). Used to cut the forward pass into segments for
//! [`super::recompute`]; any cut gives the same values, a good one keeps less memory.

use std::collections::HashSet;

use super::Graph;
use crate::onnx::{value_info_type, Dim};

/// The decoder block a node name or weight name belongs to: the number after a `layers.`,
/// `layer.`, `h.` or `blocks.` path component.
pub fn layer_index(name: &str) -> Option<usize> {
    const MARKS: [&str; 4] = ["layers.", "layer.", "h.", "blocks."];
    let bytes = name.as_bytes();
    for mark in MARKS {
        for (at, _) in name.match_indices(mark) {
            let starts_component = at == 0 || matches!(bytes[at - 1], b'.' | b'/' | b'_');
            let digits: String = name[at + mark.len()..].chars().take_while(char::is_ascii_digit).collect();
            let end = at + mark.len() + digits.len();
            let ends_component = end == name.len() || matches!(bytes[end], b'.' | b'/' | b'_');
            if starts_component && !digits.is_empty() && ends_component {
                return digits.parse().ok();
            }
        }
    }
    None
}

/// The forward nodes (indices below `forward_len`) of each decoder block, in layer order: block
/// `l` runs from the first node tagged `l` to the node before the first node tagged `l + 1`; the
/// last block to its last tagged node, or as far as the block before it when that is longer (a
/// dynamo export tags only the norm weights by name: its MLP's weights are `val_N` constants).
/// Untagged nodes between tagged ones belong to the block they sit in. Empty when fewer than two
/// blocks are found.
///
/// Nodes computed from weights and constants alone (a weight's `Transpose`, a constant shape) do
/// not start blocks: they may sit anywhere before their readers (our Hugging Face importer writes
/// layer 1's weight transposes among layer 0's nodes), and a block that started at one would take
/// in the rest of the layer before it.
pub fn decoder_blocks(graph: &Graph, forward_len: usize) -> Vec<Vec<usize>> {
    let weight_only = weight_only_nodes(graph, forward_len);
    let tag = |i: usize| {
        let n = &graph.nodes[i];
        if weight_only[i] {
            return None;
        }
        layer_index(&n.name).or_else(|| n.input.iter().find_map(|x| layer_index(x)))
    };
    let tags: Vec<(usize, usize)> = (0..forward_len).filter_map(|i| tag(i).map(|l| (i, l))).collect();
    let mut starts: Vec<(usize, usize)> = Vec::new(); // (layer, first node)
    let mut last_of_final = 0;
    for &(i, l) in &tags {
        match starts.last() {
            Some(&(cur, _)) if l == cur => {}
            // a later layer starts; a stray tag of an earlier layer stays in the current block
            Some(&(cur, _)) if l < cur => continue,
            _ => starts.push((l, i)),
        }
        last_of_final = i;
    }
    if starts.len() < 2 {
        return Vec::new();
    }
    let mut blocks: Vec<Vec<usize>> = Vec::with_capacity(starts.len());
    for (k, &(_, from)) in starts.iter().enumerate() {
        let to = match starts.get(k + 1) {
            Some(&(_, next)) => next,
            None => (last_of_final + 1).max(from + blocks[k - 1].len()).min(forward_len),
        };
        blocks.push((from..to).collect());
    }
    blocks
}

/// Whether each forward node reads only weights (initializers, and graph inputs of a fixed shape:
/// the trainable parameters; batch inputs have a batch-sized axis) and what such nodes compute.
fn weight_only_nodes(graph: &Graph, forward_len: usize) -> Vec<bool> {
    let fixed_shape = |v: &crate::onnx::ValueInfoProto| match value_info_type(v) {
        Some((_, Some(dims))) => dims.iter().all(|d| matches!(d, Dim::Fixed(_))),
        _ => false,
    };
    let parameters = graph.inputs.iter().filter(|v| fixed_shape(v)).map(|v| v.name.as_str());
    let mut fixed: HashSet<&str> = parameters.chain(graph.initializers.iter().map(|t| t.name.as_str())).collect();
    let mut weight_only = vec![false; forward_len];
    for (i, n) in graph.nodes[..forward_len].iter().enumerate() {
        if n.input.iter().all(|x| x.is_empty() || fixed.contains(x.as_str())) {
            weight_only[i] = true;
            fixed.extend(n.output.iter().map(String::as_str));
        }
    }
    weight_only
}

#[cfg(test)]
mod tests {
    use super::{decoder_blocks, layer_index};
    use crate::graph::Graph;
    use crate::onnx::{dtype, value_info, Dim, NodeProto};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_weight_prepared_early_does_not_start_its_block() {
        // layer 1's weight transpose sits before layer 0's nodes, as our Hugging Face importer writes it
        let g = Graph {
            nodes: vec![
                node("Transpose", &["model.layers.1.q.weight"], "model.layers.1.q_t"),
                node("Mul", &["x", "model.layers.0.norm.weight"], "model.layers.0.norm"),
                node("Add", &["model.layers.0.norm", "x"], "model.layers.0.residual"),
                node("MatMul", &["model.layers.0.residual", "model.layers.1.q_t"], "model.layers.1.q"),
                node("Add", &["model.layers.1.q", "model.layers.0.residual"], "model.layers.1.residual"),
            ],
            inputs: vec![
                value_info("x", dtype::FLOAT, &[Dim::Sym("tokens".into()), Dim::Fixed(4)]),
                value_info("model.layers.0.norm.weight", dtype::FLOAT, &[Dim::Fixed(4)]),
                value_info("model.layers.1.q.weight", dtype::FLOAT, &[Dim::Fixed(4), Dim::Fixed(4)]),
            ],
            ..Default::default()
        };
        assert_eq!(decoder_blocks(&g, g.nodes.len()), vec![vec![1, 2], vec![3, 4]]);
    }

    #[test]
    fn layer_index_reads_torchscript_and_dynamo_names() {
        assert_eq!(layer_index("/m/transformer/h.11/attn/MatMul"), Some(11));
        assert_eq!(layer_index("m.model.layers.3.input_layernorm.weight"), Some(3));
        assert_eq!(layer_index("model.layers.0.self_attn.q_proj.lora_A"), Some(0));
        assert_eq!(layer_index("m.transformer.wte.weight"), None);
        assert_eq!(layer_index("graph.h.x"), None);
        assert_eq!(layer_index("mlp.h.2x"), None);
        assert_eq!(layer_index("/m/lm_head/MatMul"), None);
    }
}
