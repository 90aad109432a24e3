//! Phase 1: load the exported model and bring it to the form every later phase assumes — float32
//! compute, an opset with ScatterElements' `reduction`, no KV cache, nodes in topological order — then
//! recognise its causal-LM signature.

use std::path::Path;

use crate::dpo::model::kv_cache::{remove_kv_cache, CacheRemoval};
use crate::dpo::model::{recognise, LmSignature};
use crate::graph::{compute_in_float32, raise_to_scatter_add_opset, Graph, HalfOrigin};
use crate::onnx::{value_info_type, Dim, MappedData};
use crate::{Error, Result};

/// The model as the rest of the build sees it.
pub struct LoadedModel {
    pub base: Graph,
    /// The model's external data, memory-mapped: frozen weights are written from it without a copy.
    pub data: Vec<MappedData>,
    /// Which initializers were half precision in the file (they compute in float32 from here on).
    pub half_origin: HalfOrigin,
    pub sig: LmSignature,
    pub vocab: i64,
    /// The model's opset when it was older than the graphs' (see `graph::raise_to_scatter_add_opset`).
    pub opset_raised_from: Option<i64>,
    pub cache_removal: CacheRemoval,
    /// The Hugging Face name map of a graph betadpo wrote itself from a Hugging Face folder.
    pub written_hf_map: Option<String>,
}

pub fn load(model_path: &Path, hidden_state: Option<&str>) -> Result<LoadedModel> {
    // a Hugging Face folder: betadpo writes the graph itself (and knows the Hugging Face names)
    let crate::model_import::Loaded { model, data, hf_map: written_hf_map } = crate::model_import::load(model_path)?;
    let mut base = Graph::from_model(model)?;
    let half_origin = compute_in_float32(&mut base)?;
    let opset_raised_from = raise_to_scatter_add_opset(&mut base);
    let cache_removal = remove_kv_cache(&mut base)?;
    base.sort_topologically()?;
    let sig = recognise(&base, hidden_state)?;
    if !base.producers().contains_key(sig.hidden.as_str()) && !base.has_input(&sig.hidden) {
        return Err(Error::graph(format!("--hidden-state {}: no such tensor in the model", sig.hidden)));
    }
    let vocab = vocab_size(&base, &sig);
    Ok(LoadedModel { base, data, half_origin, sig, vocab, opset_raised_from, cache_removal, written_hf_map })
}

/// The vocabulary: the logits' last dimension when the model declares it, else the lm_head's other dimension.
fn vocab_size(graph: &Graph, sig: &LmSignature) -> i64 {
    let plausible = |v: i64| (1..=i32::MAX as i64).contains(&v);
    let out = graph.outputs.iter().find(|o| o.name == sig.logits);
    if let Some((_, Some(shape))) = out.and_then(value_info_type) {
        if let Some(&Dim::Fixed(v)) = shape.last() {
            if plausible(v) {
                return v;
            }
        }
    }
    let w = graph.initializer(&sig.lm_head).map(|t| t.dims.clone()).unwrap_or_default();
    w.iter().copied().find(|&d| d != sig.hidden_size && plausible(d)).unwrap_or(2)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runtime::{run, HostTensor, SessionConfig};
    use ndarray::{ArrayD, IxDyn};

    pub(crate) fn quickstart_model() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/quickstart/model.onnx")
    }

    /// What the phase recognised agrees with ONNX Runtime running the file itself: the logits' last
    /// dimension is the vocabulary, and the lm_head maps the hidden size to it.
    #[test]
    fn recognises_the_quickstart_llama_as_onnx_runtime_runs_it() {
        let m = load(&quickstart_model(), None).unwrap();
        assert!(m.cache_removal.is_empty() && m.opset_raised_from.is_none());
        let shape = IxDyn(&[1, 5]);
        let mut feeds = vec![
            (m.sig.input_ids.as_str(), HostTensor::I64(ArrayD::from_shape_fn(shape.clone(), |ix| ix[1] as i64 + 3))),
            (m.sig.attention_mask.as_str(), HostTensor::I64(ArrayD::ones(shape.clone()))),
        ];
        if let Some(p) = &m.sig.position_ids {
            feeds.push((p.as_str(), HostTensor::I64(ArrayD::from_shape_fn(shape, |ix| ix[1] as i64))));
        }
        let mut session = SessionConfig::default().session_from_file(&quickstart_model()).unwrap();
        let out = run(&mut session, &feeds).unwrap();
        let logits = out.iter().find(|(n, _)| n == &m.sig.logits).unwrap();
        assert_eq!(logits.1.shape(), &[1, 5, m.vocab as usize]);
        let head = m.base.initializer(&m.sig.lm_head).unwrap();
        let mut dims = head.dims.clone();
        dims.sort();
        let mut want = vec![m.sig.hidden_size, m.vocab];
        want.sort();
        assert_eq!(dims, want);
    }
}
