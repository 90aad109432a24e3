//! Answer-token log-probs that never hold the `[answer tokens, vocab]` logits: the lm_head is
//! applied to one static slice of the vocabulary at a time, each slice reduced at once to its
//! log-sum-exp `[N, 1]`, and the label's logit is picked from the slice that holds it. Each slice's
//! nodes are marked (see [`chunk_of`]) so that the build recomputes them in the backward pass
//! (`graph::recompute`); without that the backward pass would keep every slice's logits and the peak
//! would be the full tensor again.

use crate::dpo::model::Projection;
use crate::graph::dependency::{exists_after, gate};
use crate::graph::Builder;
use crate::onnx::{attr_i, attr_ints};

/// How the vocabulary is cut: `vocab` words in slices of `size` (the last one shorter), and the
/// lm_head's weight as stored (`[vocab, hidden]` when `trans_b`, else `[hidden, vocab]`), which may
/// be the initializer behind the model's own transposed copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabChunks {
    pub vocab: i64,
    pub size: i64,
    /// The graph's opset: reductions take their axes as an input from opset 18.
    pub opset: i64,
    pub weight: String,
    pub trans_b: bool,
}

impl VocabChunks {
    fn projection(&self) -> Projection {
        Projection { weight: self.weight.clone(), trans_b: self.trans_b, bias: None }
    }

    fn sizes(&self) -> Vec<i64> {
        let size = self.size.max(1);
        (0..self.vocab).step_by(size as usize).map(|start| size.min(self.vocab - start)).collect()
    }
}

const CHUNK_MARK: &str = "vocab_chunk";

/// The vocabulary slice a node of [`token_logps`] computes, read from its name.
pub fn chunk_of(node_name: &str) -> Option<usize> {
    let at = node_name.find(CHUNK_MARK)? + CHUNK_MARK.len();
    let digits: String = node_name[at..].chars().take_while(char::is_ascii_digit).collect();
    if node_name[at + digits.len()..].starts_with('/') {
        digits.parse().ok()
    } else {
        None
    }
}

/// `[N]`: log softmax(h W)[label] for answer hidden states `h` [N, H] and `labels` [N] under the
/// plain lm_head (no bias) that `chunks` names.
pub fn token_logps(b: &mut Builder, h: &str, labels: &str, chunks: &VocabChunks) -> String {
    let p = &chunks.projection();
    let sizes = chunks.sizes();
    let split = b.ints(&sizes);
    let vocab_axis = if p.trans_b { 0 } else { 1 };
    // one Split (not a Slice per chunk): its gradient is one Concat, where slices would each pad
    // their gradient to the full weight's size
    let weights = b.op_n("Split", &[&p.weight, &split], sizes.len(), vec![attr_i("axis", vocab_axis)], "dpo/lm_head_slice");
    // the label's logit is read from the slice that holds it, at its place in the slice: its gradient
    // is then a scatter into a slice's logits gradient, not one into a zero tensor the size of the
    // whole head (a dot product with the label's row of the head)
    let size = b.int(chunks.size.max(1));
    let within = b.op("Mod", &[labels, &size], vec![], "dpo/label_within_slice");
    let axis1 = b.ints(&[1]);
    let place = b.op("Unsqueeze", &[&within, &axis1], vec![], "dpo/label_place");
    let mut sums: Vec<String> = Vec::with_capacity(weights.len());
    let mut picks: Vec<String> = Vec::with_capacity(weights.len());
    for (k, w) in weights.iter().enumerate() {
        let mark = format!("dpo/{CHUNK_MARK}{k}/");
        // one slice's logits at a time in the forward pass too: a slice starts once the previous one is
        // reduced (ONNX Runtime otherwise ran all 16 of Llama 3's slice products first, 750 MB at a
        // 1,787-token row); the recomputation orders them in the backward pass
        let previous = match (sums.last(), picks.last()) {
            (Some(sum), Some(pick)) => exists_after(b, &[sum.as_str(), pick.as_str()], &format!("dpo/slice_order{k}/")),
            _ => None,
        };
        let h = &gate(b, h, previous.as_deref(), &format!("dpo/slice_order{k}/"));
        let z = if p.trans_b {
            b.op("Gemm", &[h, w], vec![attr_i("transB", 1)], &format!("{mark}logits"))
        } else {
            b.op("MatMul", &[h, w], vec![], &format!("{mark}logits"))
        };
        sums.push(reduce(b, "ReduceLogSumExp", &z, 1, true, chunks.opset, &format!("{mark}log_sum_exp")));
        let place = if sizes[k] < chunks.size {
            // a short last slice: the places of labels in other slices may lie past its end
            let end = b.int(sizes[k]);
            let fits = b.op("Less", &[&place, &end], vec![], &format!("{mark}label_fits"));
            let start = b.int(0);
            b.op("Where", &[&fits, &place, &start], vec![], &format!("{mark}label_place"))
        } else {
            place.clone()
        };
        picks.push(b.op("GatherElements", &[&z, &place], vec![attr_i("axis", 1)], &format!("{mark}label_logit")));
    }
    let refs: Vec<&str> = sums.iter().map(String::as_str).collect();
    let per_chunk = b.op("Concat", &refs, vec![attr_i("axis", 1)], "dpo/chunk_log_sum_exp");
    let log_z = reduce(b, "ReduceLogSumExp", &per_chunk, 1, false, chunks.opset, "dpo/log_sum_exp");
    let refs: Vec<&str> = picks.iter().map(String::as_str).collect();
    let per_slice = b.op("Concat", &refs, vec![attr_i("axis", 1)], "dpo/slice_label_logits");
    let slice = b.op("Div", &[labels, &size], vec![], "dpo/label_slice");
    let slice = b.op("Unsqueeze", &[&slice, &axis1], vec![], "dpo/label_slice_index");
    let label_logit = b.op("GatherElements", &[&per_slice, &slice], vec![attr_i("axis", 1)], "dpo/label_logit");
    let flat = b.ints(&[-1]);
    let label_logit = b.op("Reshape", &[&label_logit, &flat], vec![], "dpo/label_logit_flat");
    b.op("Sub", &[&label_logit, &log_z], vec![], "dpo/token_logp")
}

/// A reduction over one axis, with the axes as an attribute or an input as the opset wants.
fn reduce(b: &mut Builder, op: &str, x: &str, axis: i64, keep: bool, opset: i64, hint: &str) -> String {
    let keepdims = attr_i("keepdims", i64::from(keep));
    if (op == "ReduceSum" && opset >= 13) || opset >= 18 {
        let axes = b.ints(&[axis]);
        b.op(op, &[x, &axes], vec![keepdims], hint)
    } else {
        b.op(op, &[x], vec![keepdims, attr_ints("axes", &[axis])], hint)
    }
}

#[cfg(test)]
mod tests {
    use super::{chunk_of, VocabChunks};

    #[test]
    fn sizes_cover_the_vocabulary_and_chunk_names_parse() {
        assert_eq!(VocabChunks { vocab: 10, size: 4, opset: 18, weight: String::new(), trans_b: true }.sizes(), vec![4, 4, 2]);
        assert_eq!(VocabChunks { vocab: 8, size: 8, opset: 18, weight: String::new(), trans_b: true }.sizes(), vec![8]);
        assert_eq!(chunk_of("dpo/dpo/vocab_chunk12/logits"), Some(12));
        assert_eq!(chunk_of("dpo/dpo/vocab_chunk_sizes"), None);
        assert_eq!(chunk_of("dpo/label_rows"), None);
    }
}
