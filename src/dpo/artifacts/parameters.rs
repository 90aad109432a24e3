//! Phase 7: the parameters — the model's weights that reach the loss, narrowed by `--train`/`--freeze`
//! (or LoRA's adapters only), plus the beta head — lifted from initializers to graph inputs, so
//! `train` feeds their current values and reads their gradients.

use crate::dpo::model::lora::LoraSpec;
use crate::dpo::model::params::{find_parameters, lift_parameters, InitializerRef, Param, Selection};
use crate::dpo::model::reference_copy::{self, ReferenceCopy};
use crate::dpo::objective::{Objective, HEAD_BIAS, HEAD_WEIGHT};
use crate::graph::{Graph, TensorInfos};
use crate::{Error, Result};

use super::adapters::train_adapters_only;

pub fn select(
    graph: &mut Graph,
    obj: &Objective,
    infos: &TensorInfos,
    selection: &Selection,
    lora: Option<&LoraSpec>,
    reference: Option<&ReferenceCopy>,
) -> Result<Vec<Param>> {
    let mut params = find_parameters(graph, &obj.loss, infos, selection)?;
    params.retain(|p| p.name != HEAD_WEIGHT && p.name != HEAD_BIAS);
    if let Some(l) = lora {
        train_adapters_only(&mut params, l)?;
    }
    params.extend(obj.head.iter().map(|t| Param {
        name: t.name.clone(),
        dims: t.dims.clone(),
        trainable: true,
        beta_head: true,
        initializers: vec![InitializerRef { name: t.name.clone(), transposed: false }],
    }));
    if !params.iter().any(|p| p.trainable) {
        return Err(Error::BadFlag { flag: "--train/--freeze".into(), detail: "no parameter is left trainable".into() });
    }
    if let Some(r) = reference {
        reference_copy::freeze_reference(graph, r, &params);
    }
    lift_parameters(graph, &params, true);
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::load::tests::quickstart_model;
    use crate::dpo::artifacts::test_model::prepared_from;
    use crate::dpo::ObjectiveConfig;
    use regex::Regex;

    /// Every float weight of the model with more than one element trains by default (the quickstart
    /// Llama's rotary frequencies are a buffer, not a parameter), the head trains, and each trainable
    /// parameter is a graph input afterwards, no longer an initializer.
    #[test]
    fn the_model_weights_and_the_head_become_inputs() {
        let p = prepared_from(tempfile::tempdir().unwrap(), &quickstart_model(), &ObjectiveConfig::default(), &Selection::default()).unwrap();
        assert_eq!(p.params.iter().filter(|p| p.beta_head).count(), 2);
        let base = &p.model.base;
        let weights = base
            .initializers
            .iter()
            .filter(|t| t.data_type == crate::onnx::dtype::FLOAT && t.dims.iter().product::<i64>() > 1 && !t.name.contains("inv_freq"))
            .count();
        assert_eq!(p.params.iter().filter(|p| p.trainable && !p.beta_head).map(|p| p.initializers.len()).sum::<usize>(), weights);
        for q in p.params.iter().filter(|q| q.trainable) {
            assert!(p.laid.graph.has_input(&q.name) && p.laid.graph.initializer(&q.name).is_none(), "{}", q.name);
        }
    }

    #[test]
    fn a_selection_that_leaves_nothing_trainable_is_refused() {
        let cfg = ObjectiveConfig { fixed_beta: Some(0.1), ..Default::default() };
        let sel = Selection { freeze: Some(Regex::new(".").unwrap()), ..Default::default() };
        let e = prepared_from(tempfile::tempdir().unwrap(), &quickstart_model(), &cfg, &sel).err().unwrap().to_string();
        assert!(e.contains("no parameter is left trainable"), "{e}");
    }
}
