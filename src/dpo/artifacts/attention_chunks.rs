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

#[cfg(test)]
mod tests {
    use super::super::differentiate::{train_and_eval, Objectives};
    use super::super::test_model::{padded_batch, parameter_feeds, prepared_from, run_graph, Prepared};
    use super::*;
    use crate::dpo::ObjectiveConfig;
    use crate::runtime::HostTensor;

    /// The train graph of `p` with its attentions in `chunks` query chunks, and how many were cut.
    fn train_graph(p: &Prepared, chunks: usize) -> (usize, Graph) {
        let objectives = Objectives { obj: &p.appended.obj, batch_inputs: &p.appended.batch_inputs, metric_outputs: &p.appended.outputs };
        let (mut graph, mut infos) = (p.laid.graph.clone(), p.infos.clone());
        let cut = attention_in_chunks(&mut graph, &mut infos, chunks);
        (cut, train_and_eval(graph, &mut infos, &p.params, objectives, false).unwrap().train)
    }

    /// Eight chunks of a 5-token batch (so three are empty): the train graph's loss, metrics and every
    /// gradient equal the unchunked graph's (ONNX Runtime runs both), and no Softmax sees a whole row.
    #[test]
    fn more_chunks_than_tokens_give_the_whole_attentions_values() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
        let p = prepared_from(tempfile::tempdir().unwrap(), &folder, &ObjectiveConfig::default(), &Default::default()).unwrap();
        let (none, whole) = train_graph(&p, 1);
        let (cut, chunked) = train_graph(&p, 8);
        assert_eq!((none, cut), (0, 2), "the fixture's two attentions");
        let softmaxes = |g: &Graph| g.nodes.iter().filter(|n| n.op_type == "Softmax" && !n.name.contains("dpo")).count();
        assert_eq!(softmaxes(&chunked), softmaxes(&whole) + 2 * 7);

        let mut feeds = padded_batch();
        feeds.push(("position_ids".into(), HostTensor::I64(ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 5]), |ix| ix[1] as i64))));
        feeds.extend(parameter_feeds(&p));
        let (want, got) = (run_graph(&whole, &feeds), run_graph(&chunked, &feeds));
        assert_eq!(want.len(), got.len());
        for ((name, a), (_, b)) in want.iter().zip(&got) {
            let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            let worst = a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-6 * scale, "{name}: differs by {worst:e} (largest value {scale:e})");
        }
    }
}
