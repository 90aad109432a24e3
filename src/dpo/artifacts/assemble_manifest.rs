//! Phase 12: the manifest — what each graph file takes and returns, the parameters and their
//! initial values' file, the model's signature, the objective, layout and precision — so any ONNX
//! Runtime binding can drive the artifacts without betadpo.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dpo::manifest::{GraphSpec, Manifest, ModelSpec, ParameterSpec, FORMAT, FORMAT_VERSION};
use crate::dpo::model::lora::LoraSpec;
use crate::dpo::model::params::Param;
use crate::dpo::packing::{self, Layout};
use crate::dpo::ObjectiveConfig;
use crate::graph::MixedPrecision;

use super::load::LoadedModel;
use crate::run_layout::PARAMS;

/// The parameters as the manifest lists them; weight decay applies to matrices, never to the head.
pub fn parameter_specs(params: &[Param]) -> Vec<ParameterSpec> {
    params
        .iter()
        .map(|p| ParameterSpec {
            name: p.name.clone(),
            shape: p.dims.clone(),
            trainable: p.trainable,
            beta_head: p.beta_head,
            initializers: p.initializers.clone(),
            weight_decay: p.dims.len() >= 2 && !p.beta_head,
        })
        .collect()
}

pub struct ManifestParts<'a> {
    pub model_path: &'a Path,
    pub model: &'a LoadedModel,
    pub objective: &'a ObjectiveConfig,
    pub layout: Layout,
    pub graphs: BTreeMap<String, GraphSpec>,
    pub parameters: Vec<ParameterSpec>,
    pub lora: Option<LoraSpec>,
    pub precision: MixedPrecision,
    /// The context the model's Hugging Face config gives (see [`super::hf_names::HfNames::context_length`]).
    pub context_length: Option<usize>,
    pub memory: crate::dpo::manifest::MemorySpec,
}

pub fn assemble(p: ManifestParts) -> Manifest {
    let (sig, base) = (&p.model.sig, &p.model.base);
    let max_positions = crate::dpo::model::position_table_rows(base, &sig.input_ids);
    Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        betadpo_version: env!("CARGO_PKG_VERSION").into(),
        model: ModelSpec {
            // a Hugging Face folder by its absolute path: `train` finds its tokenizer there from any directory
            source: match crate::model_import::is_hf_folder(p.model_path) {
                true => p.model_path.canonicalize().unwrap_or(p.model_path.to_path_buf()),
                false => p.model_path.to_path_buf(),
            }
            .display()
            .to_string(),
            input_ids: sig.input_ids.clone(),
            attention_mask: sig.attention_mask.clone(),
            position_ids: sig.position_ids.clone(),
            logits: sig.logits.clone(),
            hidden_state: sig.hidden.clone(),
            hidden_size: sig.hidden_size,
            vocab_size: p.model.vocab,
            opset: base.opset(),
            max_positions,
            context_length: p.context_length,
        },
        objective: p.objective.clone(),
        layout: p.layout,
        // the packed mask was verified for this many tokens, and the model takes no more than its positions
        max_sequence_tokens: (p.layout == Layout::Packed).then_some(packing::VERIFIED_SEQUENCE_TOKENS.min(max_positions.unwrap_or(usize::MAX))),
        graphs: p.graphs,
        parameters: p.parameters,
        parameters_file: PARAMS.into(),
        lora: p.lora,
        precision: p.precision.precision,
        precision_emulated: p.precision.emulated,
        memory: p.memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::test_model::prepared;

    /// Weight decay applies to the model's matrices only: not to vectors, never to the head.
    #[test]
    fn weight_decay_applies_to_matrices_but_not_the_head() {
        let p = prepared(&ObjectiveConfig::default());
        let specs = parameter_specs(&p.params);
        for s in &specs {
            assert_eq!(s.weight_decay, s.shape.len() == 2 && !s.beta_head, "{}", s.name);
        }
        assert!(specs.iter().any(|s| s.weight_decay) && specs.iter().any(|s| s.beta_head && !s.weight_decay));
    }
}
