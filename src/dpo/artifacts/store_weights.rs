//! Phase 13: the weights' storage. Trainable parameters' initial values go to `params.safetensors`
//! (the model's float32 bytes passed through without a copy); frozen weights stay in the graphs,
//! stored in `--frozen-dtype` and cast to float32 where they are read.

use std::collections::HashSet;

use crate::dpo::model::params::Param;
use crate::dpo::objective::Objective;
use crate::graph::{cast_per_use, drop_exact_round_trips, materialize_deferred, store_frozen, Graph, HalfOrigin, StoredWeights};
use crate::onnx::DType;
use crate::store::RawTensor;
use crate::{Error, Result};

/// Initial values of every trainable parameter, read from the model (or the head's init).
pub fn initial_values<'a>(base: &'a Graph, obj: &'a Objective, params: &'a [Param], half_origin: &HalfOrigin) -> Result<Vec<RawTensor<'a>>> {
    let mut out = Vec::new();
    for p in params.iter().filter(|p| p.trainable) {
        let t = base
            .initializer(&p.name)
            .or_else(|| obj.head.iter().find(|h| h.name == p.name))
            .ok_or_else(|| Error::graph(format!("no initial value for parameter {}", p.name)))?;
        let bytes = half_origin.float32_bytes(t)?;
        out.push(RawTensor { name: &p.name, shape: p.dims.iter().map(|&d| d as usize).collect(), bytes });
    }
    Ok(out)
}

/// Stores every graph's frozen weights (shared between graphs through `StoredWeights`); returns how
/// many are stored in half precision.
pub fn store_frozen_weights(graphs: [&mut Graph; 3], params: &[Param], to: Option<DType>, half_origin: &HalfOrigin) -> Result<usize> {
    let frozen: HashSet<String> = params.iter().filter(|p| !p.trainable).flat_map(|p| p.initializers.iter().map(|r| r.name.clone())).collect();
    let mut stored = StoredWeights::default();
    let mut half_frozen = 0;
    for g in graphs {
        half_frozen = half_frozen.max(store_frozen(g, &frozen, to, half_origin, &mut stored)?);
        materialize_deferred(g, half_origin, &mut stored)?;
        drop_exact_round_trips(g);
        cast_per_use(g);
    }
    Ok(half_frozen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::test_model::{parameter_feeds, prepared};
    use crate::dpo::ObjectiveConfig;

    /// The initial values are the model's weights as written (and the head's init); a frozen weight
    /// stored in float16 is half precision in the graph and cast where it is read.
    #[test]
    fn initial_values_are_the_models_and_frozen_weights_are_stored_in_the_asked_dtype() {
        let p = prepared(&ObjectiveConfig::default());
        for (name, t) in parameter_feeds(&p) {
            let want = match p.model.base.initializer(&name) {
                Some(init) => crate::onnx::tensor_to_f32(init).unwrap(),
                None => crate::onnx::tensor_to_f32(p.appended.obj.head.iter().find(|h| h.name == name).unwrap()).unwrap(),
            };
            assert_eq!(t.as_f32().unwrap().iter().copied().collect::<Vec<f32>>(), want, "{name}");
        }
        let mut params = p.params.clone();
        let frozen = params.iter().position(|q| q.name == "emb.weight").unwrap();
        params[frozen].trainable = false;
        let mut graph = p.model.base.clone();
        let (mut g2, mut g3) = (graph.clone(), graph.clone());
        let half = store_frozen_weights([&mut graph, &mut g2, &mut g3], &params, Some(crate::onnx::dtype::FLOAT16), &p.model.half_origin).unwrap();
        assert_eq!(half, 1);
        let stored = graph.initializers.iter().find(|t| t.name.starts_with("emb.weight")).unwrap();
        assert_eq!(stored.data_type, crate::onnx::dtype::FLOAT16);
        // computing with it is computing with the float32 weights rounded to float16
        let mut rounded = p.model.base.clone();
        let emb = rounded.initializers.iter_mut().find(|t| t.name == "emb.weight").unwrap();
        let values: Vec<f32> = crate::onnx::tensor_to_f32(emb).unwrap().iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
        *emb = crate::onnx::tensor_f32("emb.weight", &emb.dims.clone(), &values);
        let batch = crate::dpo::artifacts::test_model::padded_batch();
        let logits = |g: &Graph| crate::dpo::artifacts::test_model::output(&crate::dpo::artifacts::test_model::run_graph(g, &batch), "logits").clone();
        assert_eq!(logits(&graph), logits(&rounded));
        assert_ne!(logits(&graph), logits(&p.model.base), "float16 rounding changes these weights");
    }
}
