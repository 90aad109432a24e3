//! Phase 2: the Hugging Face name map (`hf_export.json`) written beside the model by
//! `scripts/tools/export_hf.py`: copied into the artifacts for `export --hf`, and read for LoRA's module names.

use std::collections::HashMap;
use std::path::Path;

use crate::dpo::export::hf::map::{beside_model, HfMap};
use crate::graph::Graph;
use crate::run_layout::HF_MAP_FILE;

/// The map's text, or why the one beside the model was skipped (it belongs to another model).
#[derive(Default)]
pub struct HfNames {
    pub map: Option<String>,
    pub skipped: Option<String>,
}

/// The map betadpo wrote with the graph (`written`, from a Hugging Face folder), else the one beside the model.
pub fn find(model_path: &Path, base: &Graph, written: Option<String>) -> HfNames {
    if written.is_some() {
        return HfNames { map: written, skipped: None };
    }
    match beside_model(model_path, base) {
        None => HfNames::default(),
        Some(Ok(text)) => HfNames { map: Some(text), skipped: None },
        Some(Err(why)) => HfNames { map: None, skipped: Some(why) },
    }
}

impl HfNames {
    /// The context the model was configured for (`max_position_embeddings`, gpt2's `n_positions`)
    /// in the Hugging Face config the map carries.
    pub fn context_length(&self) -> Option<usize> {
        let map = self.map.as_deref().and_then(|text| HfMap::parse(text, Path::new(HF_MAP_FILE)).ok())?;
        ["max_position_embeddings", "n_positions", "n_ctx"]
            .iter()
            .find_map(|k| map.config.get(*k).and_then(serde_json::Value::as_u64))
            .filter(|&n| (2..=crate::limits::MAX_COUNT as u64).contains(&n))
            .map(|n| n as usize)
    }

    /// PyTorch module names of the model's weights (`x.weight` -> `x`), tied copies included.
    pub fn module_names(&self) -> HashMap<String, String> {
        let Some(map) = self.map.as_deref().and_then(|text| HfMap::parse(text, Path::new(HF_MAP_FILE)).ok()) else { return Default::default() };
        let mut out = HashMap::new();
        for t in &map.tensors {
            let Some(module) = t.name.strip_suffix(".weight") else { continue };
            for init in std::iter::once(&t.initializer).chain(t.tied_copies.iter().map(|c| &c.initializer)) {
                out.insert(init.clone(), module.to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quickstart model's map (written by `scripts/tools/export_hf.py` with PyTorch's names) is found,
    /// and every module it names is a PyTorch module path of a weight the model has.
    #[test]
    fn finds_the_map_written_beside_the_quickstart_model() {
        let model = super::super::load::tests::quickstart_model();
        let base = super::super::load::load(&model, None).unwrap().base;
        let names = find(&model, &base, None);
        assert!(names.skipped.is_none(), "{:?}", names.skipped);
        let modules = names.module_names();
        assert!(!modules.is_empty());
        for (init, module) in &modules {
            assert!(base.initializer(init).is_some(), "{init} is not an initializer of the model");
            assert!(module.starts_with("model.") || module == "lm_head", "{module}");
        }
    }
}
