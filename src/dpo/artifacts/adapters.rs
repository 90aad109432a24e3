//! Phase 3: LoRA adapters (`--lora-rank`) added to the model's linear layers, before the objective is
//! appended, so the train, eval and inference graphs all carry them.

use std::collections::HashMap;

use crate::dpo::model::lora::{self, LoraOptions, LoraSpec};
use crate::dpo::model::params::{Param, Selection};
use crate::dpo::model::LmSignature;
use crate::graph::Graph;
use crate::{Error, Result};

pub fn add(base: &mut Graph, sig: &LmSignature, opts: Option<&LoraOptions>, modules: &HashMap<String, String>) -> Result<Option<LoraSpec>> {
    opts.map(|l| lora::add_adapters(base, sig, l, modules)).transpose()
}

/// `--train`, `--freeze` and `--trainable head` choose among the model's weights, which LoRA freezes.
pub fn check_selection(opts: Option<&LoraOptions>, sel: &Selection) -> Result<()> {
    let Some(l) = opts else { return Ok(()) };
    l.validate()?;
    let flag = [(sel.train.is_some(), "--train"), (sel.freeze.is_some(), "--freeze"), (sel.head_only, "--trainable head")].into_iter().find(|(set, _)| *set);
    match flag {
        Some((_, flag)) => {
            Err(Error::BadFlag { flag: flag.into(), detail: "cannot be combined with --lora-rank (choose the adapted weights with --lora-targets)".into() })
        }
        None => Ok(()),
    }
}

/// With LoRA only the adapters and the beta head train: every model weight is frozen.
pub fn train_adapters_only(params: &mut [Param], spec: &LoraSpec) -> Result<()> {
    for p in params.iter_mut().filter(|p| !p.beta_head) {
        p.trainable = spec.is_adapter(&p.name);
    }
    for name in spec.adapters.iter().flat_map(|a| [&a.a, &a.b]) {
        if !params.iter().any(|p| &p.name == name && p.trainable) {
            return Err(Error::graph(format!("LoRA parameter {name} does not reach the loss")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::model::params::InitializerRef;

    fn param(name: &str, beta_head: bool) -> Param {
        Param { name: name.into(), dims: vec![2, 2], trainable: true, beta_head, initializers: vec![InitializerRef { name: name.into(), transposed: false }] }
    }

    /// On the quickstart Llama: every adapted weight is a 2-D initializer of the model, each adapter's
    /// B starts at zero (PEFT's init: the adapted model equals the model), and only adapters and the head train.
    #[test]
    fn adapts_the_quickstart_llama_and_trains_only_adapters_and_head() {
        let model = super::super::load::tests::quickstart_model();
        let loaded = super::super::load::load(&model, None).unwrap();
        let mut base = loaded.base.clone();
        let opts = LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: None };
        let spec = add(&mut base, &loaded.sig, Some(&opts), &HashMap::new()).unwrap().unwrap();
        assert!(!spec.adapters.is_empty());
        for a in &spec.adapters {
            assert_eq!(loaded.base.initializer(&a.base_weight).unwrap().dims.len(), 2);
            let b = crate::onnx::tensor_to_f32(base.initializer(&a.b).unwrap()).unwrap();
            assert!(b.iter().all(|v| *v == 0.0), "{} starts non-zero", a.b);
        }
        let mut params: Vec<Param> = spec.adapters.iter().flat_map(|a| [param(&a.a, false), param(&a.b, false)]).collect();
        params.push(param(&spec.adapters[0].base_weight, false));
        params.push(param("head.w", true));
        train_adapters_only(&mut params, &spec).unwrap();
        let trainable: Vec<&str> = params.iter().filter(|p| p.trainable).map(|p| p.name.as_str()).collect();
        assert_eq!(trainable.len(), 2 * spec.adapters.len() + 1);
        assert!(!trainable.contains(&spec.adapters[0].base_weight.as_str()));
    }

    #[test]
    fn a_weight_selection_with_lora_is_refused_naming_the_flag() {
        let opts = LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: None };
        let sel = Selection { head_only: true, ..Default::default() };
        let e = check_selection(Some(&opts), &sel).unwrap_err().to_string();
        assert!(e.contains("--trainable head") && e.contains("--lora-rank"), "{e}");
        assert!(check_selection(None, &sel).is_ok());
    }
}
