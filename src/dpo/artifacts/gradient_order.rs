//! Phase 9a (after [`super::differentiate`], before [`super::recompute`]; with `--gradient-checkpointing`): each decoder block's weight
//! gradients computed as soon as the backward pass has been through the block (`graph::gradient_order`),
//! so that the block's activations and the gradients flowing into it die there instead of at the end of
//! the run. Values are unchanged.

use crate::autodiff::Gradients;
use crate::graph::{decoder_blocks, tie_weight_gradients, Graph, Ordered};

/// Ties the weight gradients of `train`'s decoder blocks into its backward pass (described by `grads`,
/// whose count of backward nodes grows by the gates added).
pub fn weight_gradients_with_their_blocks(train: &mut Graph, grads: &mut Gradients) -> Ordered {
    let forward_len = train.nodes.len() - grads.nodes_added;
    let blocks = decoder_blocks(train, forward_len);
    let before = train.nodes.len();
    let ordered = tie_weight_gradients(train, forward_len, &grads.seed, &blocks, &grads.by_param);
    grads.nodes_added += train.nodes.len() - before;
    ordered
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::super::differentiate::{train_and_eval, Objectives};
    use super::super::test_model::{padded_batch, parameter_feeds, prepared_from, run_graph};
    use super::*;
    use crate::dpo::ObjectiveConfig;
    use crate::runtime::HostTensor;

    /// The tensors `t` is computed from, through the graph's nodes.
    fn ancestors(g: &Graph, t: &str) -> HashSet<String> {
        let producer: HashMap<&str, usize> = g.producers();
        let (mut seen, mut stack) = (HashSet::new(), vec![t.to_string()]);
        while let Some(x) = stack.pop() {
            if let Some(&i) = producer.get(x.as_str()) {
                for input in &g.nodes[i].input {
                    if seen.insert(input.clone()) {
                        stack.push(input.clone());
                    }
                }
            }
        }
        seen
    }

    /// Afterwards the lower block's weight gradients are computed from the upper block's (a data
    /// dependency any runtime honours), where before nothing made the upper ones come first; every
    /// output keeps its value (the same graph run by ONNX Runtime).
    #[test]
    fn lower_blocks_wait_for_the_upper_blocks_weight_gradients() {
        // a model written from a Hugging Face folder: its weights name their layers (the tiny test model's do not)
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
        let p = prepared_from(tempfile::tempdir().unwrap(), &folder, &ObjectiveConfig::default(), &Default::default()).unwrap();
        let objectives = Objectives { obj: &p.appended.obj, batch_inputs: &p.appended.batch_inputs, metric_outputs: &p.appended.outputs };
        let mut infos = p.infos.clone();
        let plain = train_and_eval(p.laid.graph.clone(), &mut infos, &p.params, objectives, false).unwrap();
        let (mut tied, mut grads) = (plain.train.clone(), plain.grads.clone());
        let ordered = weight_gradients_with_their_blocks(&mut tied, &mut grads);
        assert!(ordered.blocks >= 2 && ordered.gated >= 1, "{ordered:?}");
        assert_eq!(grads.nodes_added, plain.grads.nodes_added + tied.nodes.len() - plain.train.nodes.len());

        let forward_len = plain.train.nodes.len() - plain.grads.nodes_added;
        let blocks = decoder_blocks(&plain.train, forward_len);
        let grad_of = |block: &Vec<usize>| -> String {
            let reads: HashSet<&str> = block.iter().flat_map(|&i| plain.train.nodes[i].input.iter().map(String::as_str)).collect();
            plain.grads.by_param.iter().find(|(param, _)| reads.contains(param.as_str())).map(|(_, g)| g.clone()).expect("a block weight's gradient")
        };
        let (lower, upper) = (grad_of(&blocks[0]), grad_of(&blocks[blocks.len() - 1]));
        assert!(!ancestors(&plain.train, &lower).contains(&upper), "already ordered without the phase");
        assert!(ancestors(&tied, &lower).contains(&upper), "{lower} does not wait for {upper}");

        let mut feeds = padded_batch();
        feeds.push(("position_ids".into(), HostTensor::I64(ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 5]), |ix| ix[1] as i64))));
        feeds.extend(parameter_feeds(&p));
        let (before, after) = (run_graph(&plain.train, &feeds), run_graph(&tied, &feeds));
        assert_eq!(before.len(), after.len());
        for ((name, a), (_, b)) in before.iter().zip(&after) {
            assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap(), "{name}");
        }
    }
}
