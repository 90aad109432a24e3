//! Where an exported decoder's blocks are: the layer index in node names (`/h.3/` in GPT-2
//! TorchScript exports) or in the names of the weights a node reads (`model.layers.3.` in dynamo
//! exports, whose node names carry none). Used to cut the forward pass into segments for
//! [`super::recompute`]; any cut gives the same values, a good one keeps less memory.

use super::Graph;

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
pub fn decoder_blocks(graph: &Graph, forward_len: usize) -> Vec<Vec<usize>> {
    let tag = |i: usize| {
        let n = &graph.nodes[i];
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

#[cfg(test)]
mod tests {
    use super::layer_index;

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
