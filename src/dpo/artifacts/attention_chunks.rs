//! Phase 6a (after [`super::probe`], before [`super::parameters`]; `--attention-chunks`): every
//! attention of the model computed in query chunks, each against the keys its causal queries see
//! (`graph::chunk_attention`): no `[rows, heads, T, T]` tensor exists, about half the products go,
//! and the backward pass keeps the lower triangle of the probabilities only. Same values up to float
//! summation order.

use crate::graph::{chunk_attention, Graph, TensorInfos};

/// Cuts every attention of `graph` into `chunks` query chunks (none below 2); `infos` gets the new
/// tensors. Returns how many attentions were cut.
pub fn attention_in_chunks(graph: &mut Graph, infos: &mut TensorInfos, chunks: usize) -> usize {
    chunk_attention(graph, infos, chunks)
}
