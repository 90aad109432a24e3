//! Phase 9b (after [`super::differentiate`]): `--gradient-checkpointing` and `--vocab-chunk` — which
//! parts of the train graph's forward pass the backward pass recomputes (`graph::recompute`) instead
//! of keeping: each decoder block (only block inputs live from the forward to the backward pass),
//! and each vocabulary slice of the answer log-probs ([`crate::dpo::objective::chunked_logps`], which phase 5
//! builds when [`vocab_chunks`] says so).

use crate::autodiff::Gradients;
use crate::dpo::model::LmSignature;
use crate::dpo::objective::chunked_logps::{chunk_of, VocabChunks};
use crate::graph::{decoder_blocks, recompute, Graph, Recomputed};
use crate::onnx::NodeAttrs;

/// The words per vocabulary slice with `--gradient-checkpointing` when `--vocab-chunk` is not
/// given: big enough that each slice's product is a full-speed matrix product, small enough that
/// `answer tokens x 8192 x 4` bytes is a small share of memory (4,096 answer tokens: 134 MB, against
/// 2.1 GB for a 128,256-word vocabulary).
pub const DEFAULT_VOCAB_CHUNK: i64 = 8192;

/// Query chunks per attention with `--gradient-checkpointing` when `--attention-chunks` is not
/// given: SmolLM2-135M, 8 pairs of 1,023 tokens, recomputed: peak 7.53 GiB whole, 6.49 GiB in 8
/// chunks (docs/long-sequences.md).
pub const DEFAULT_ATTENTION_CHUNKS: usize = 8;

/// What the train graph keeps for its backward pass. [`MemoryOptions::default`] keeps everything
/// (fastest at short rows); [`MemoryOptions::long_rows`] is what `--gradient-checkpointing` means.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Recompute each decoder block's forward pass in the backward pass.
    pub gradient_checkpointing: bool,
    /// Words per vocabulary slice of the answer log-probs; 0 computes the whole vocabulary at once.
    pub vocab_chunk: i64,
    /// Query chunks per attention (phase 6a); 0 or 1 computes each attention whole.
    pub attention_chunks: usize,
}

impl MemoryOptions {
    /// Blocks recomputed, attention in query chunks and the vocabulary in slices: memory over
    /// speed. The slices are not the default without recomputation: splitting the head and
    /// concatenating its gradient cost 5% of SmolLM2's step at 44-token rows (1.265 against
    /// 1.174 s, docs/long-sequences.md), and rows long enough for the logits to matter need
    /// recomputation anyway.
    pub fn long_rows() -> Self {
        MemoryOptions { gradient_checkpointing: true, vocab_chunk: DEFAULT_VOCAB_CHUNK, attention_chunks: DEFAULT_ATTENTION_CHUNKS }
    }

    /// The manifest's record of these options, as far as they applied (`sliced`: the vocabulary was
    /// cut; `chunked`: attentions were found to cut).
    pub fn spec(&self, sliced: bool, chunked: bool) -> crate::dpo::manifest::MemorySpec {
        crate::dpo::manifest::MemorySpec {
            gradient_checkpointing: self.gradient_checkpointing,
            attention_chunks: if chunked { self.attention_chunks } else { 0 },
            vocab_chunk: if sliced { self.vocab_chunk } else { 0 },
        }
    }
}

/// The vocabulary slices of the answer log-probs, when the lm_head is a plain product (no bias)
/// whose weight is an initializer of `graph` with `vocab` words, or the transpose of one (as
/// dynamo exports a tied head), and `vocab_chunk` cuts it at least in two.
pub fn vocab_chunks(opts: &MemoryOptions, graph: &Graph, sig: &LmSignature, vocab: i64) -> Option<VocabChunks> {
    let p = sig.projection.as_ref()?;
    if p.bias.is_some() || opts.vocab_chunk <= 0 || opts.vocab_chunk >= vocab {
        return None;
    }
    let (weight, trans_b) = match graph.initializer(&p.weight) {
        Some(_) => (p.weight.clone(), p.trans_b),
        None => {
            let producer = graph.nodes.iter().find(|n| n.output.iter().any(|o| o == &p.weight))?;
            let perm = producer.ints_attr("perm");
            let swaps = perm.is_none_or(|perm| perm == [1, 0]);
            (producer.op_type == "Transpose" && swaps).then(|| (producer.input[0].clone(), !p.trans_b))?
        }
    };
    let dims = &graph.initializer(&weight)?.dims;
    let vocab_dim = if trans_b { 0 } else { 1 };
    (dims.len() == 2 && dims[vocab_dim] == vocab).then(|| VocabChunks { vocab, size: opts.vocab_chunk, opset: graph.opset(), weight, trans_b })
}

/// Recomputes the vocabulary slices, and with `--gradient-checkpointing` the decoder blocks, of
/// the train graph whose backward pass `grads` describes (its last nodes).
pub fn recompute_segments(graph: &mut Graph, grads: &Gradients, opts: &MemoryOptions) -> Recomputed {
    let forward_len = graph.nodes.len() - grads.nodes_added;
    let seed = grads.seed.as_str();
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    for (i, n) in graph.nodes[..forward_len].iter().enumerate() {
        if let Some(k) = chunk_of(&n.name) {
            if chunks.len() <= k {
                chunks.resize(k + 1, Vec::new());
            }
            chunks[k].push(i);
        }
    }
    let in_chunk: std::collections::HashSet<usize> = chunks.iter().flatten().copied().collect();
    let mut segments: Vec<Vec<usize>> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
    // one vocabulary slice's logits and their gradient at a time
    let slices: Vec<usize> = (0..segments.len()).collect();
    if opts.gradient_checkpointing {
        for mut block in decoder_blocks(graph, forward_len) {
            block.retain(|i| !in_chunk.contains(i));
            segments.push(block);
        }
    }
    recompute(graph, forward_len, seed, &segments, &slices)
}
