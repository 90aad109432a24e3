//! `export --hf DIR` on LoRA artifacts: a PEFT adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors`) that `PeftModel.from_pretrained(model, DIR)` loads on the Hugging
//! Face model the artifacts were built from, with the beta head and tokenizer files beside it.
//!
//! betadpo's `A` is `[in, r]` and `B` is `[r, out]` (the product's orientation, `y = x·W`); PEFT's
//! `lora_A.weight` is `[r, in]` and `lora_B.weight` is `[out, r]`, their transposes, under
//! `base_model.model.<module>.lora_{A,B}.weight`.

use std::path::Path;

use serde_json::json;

use super::map::HfMap;
use super::{beta_head, claim, tokenizer_files, write_checkpoint, write_export_dir, write_json, ExportSource, HfReport, TokenizerSource};
use crate::dpo::export::lora::{trained_adapters, TrainedAdapter};
use crate::dpo::manifest::Manifest;
use crate::dpo::model::lora::LoraSpec;
use crate::store::{read_safetensors, NamedTensor};
use crate::{Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

pub(super) fn export_peft(
    artifacts: &Path,
    manifest: &Manifest,
    lora: &LoraSpec,
    map: &HfMap,
    params: &Path,
    out: &Path,
    tokenizer: Option<&TokenizerSource>,
    base_model: Option<&str>,
) -> Result<HfReport> {
    claim(out)?;
    let tokenizer_files = match tokenizer {
        Some(t) => tokenizer_files(t)?,
        None => Vec::new(),
    };
    let (trained, _) = read_safetensors(params)?;
    let adapters = trained_adapters(lora, &trained)?;
    let tensors = peft_tensors(&adapters)?;
    let base_model = base_model.map(str::to_string).or_else(|| recorded_base(map));
    let config = peft_config(lora, &adapters, fan_in_fan_out(&adapters, map)?, base_model.as_deref());
    let head = beta_head(manifest, &trained, params)?;
    let source = ExportSource { artifacts, params, tokenizer };
    let files = write_export_dir(out, manifest, source, &tokenizer_files, head.as_deref(), |dir, files| {
        write_json(dir, ADAPTER_CONFIG, &config, files)?;
        write_checkpoint(dir, ADAPTER_WEIGHTS, &tensors, files)
    })?;
    Ok(HfReport { files, tensors: tensors.len(), tied: Vec::new(), peft: true, base_model })
}

/// The model export_hf.py loaded, else the `_name_or_path` save_pretrained left in the config
/// (empty for models built in memory, such as the tests' tiny ones).
fn recorded_base(map: &HfMap) -> Option<String> {
    let from_config = map.config.get("_name_or_path").and_then(|v| v.as_str()).map(str::to_string);
    map.source_model.clone().or(from_config).filter(|s| !s.is_empty())
}

/// PEFT's checkpoint tensors for the adapters.
pub fn peft_tensors(adapters: &[TrainedAdapter]) -> Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    for ad in adapters {
        let module = ad.spec.module.as_deref().ok_or_else(|| {
            Error::NotExportable(format!(
                "the adapter on {} has no PyTorch module name; rebuild the artifacts from a model exported by scripts/tools/export_hf.py (its hf_export.json names the modules)",
                ad.spec.base_weight
            ))
        })?;
        for (which, m) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
            let t = m.t().as_standard_layout().into_owned();
            out.push(NamedTensor { name: format!("base_model.model.{module}.{which}.weight"), shape: t.shape().to_vec(), data: t.into_raw_vec_and_offset().0 });
        }
    }
    Ok(out)
}

/// Whether the adapted modules store their weight `[in, out]` (GPT-2's `Conv1D`): PEFT then needs
/// `fan_in_fan_out`, one flag for the whole adapter. The checkpoint's layout is the ONNX weight's,
/// transposed when the map says the exporter stored the transpose.
fn fan_in_fan_out(adapters: &[TrainedAdapter], map: &HfMap) -> Result<bool> {
    let mut layouts = Vec::new();
    for ad in adapters {
        let name = format!("{}.weight", ad.spec.module.as_deref().unwrap_or_default());
        let t = map.tensors.iter().find(|t| t.name == name).ok_or_else(|| Error::NotExportable(format!("the Hugging Face name map has no tensor {name}")))?;
        let checkpoint_out_in = ad.spec.weight_out_in != t.transposed;
        layouts.push((checkpoint_out_in, name));
    }
    match (layouts.iter().find(|l| l.0), layouts.iter().find(|l| !l.0)) {
        (Some(linear), Some(conv1d)) => Err(Error::NotExportable(format!(
            "{} is stored [out, in] and {} [in, out]: PEFT's fan_in_fan_out is one flag for the whole adapter; narrow --lora-targets to one kind",
            linear.1, conv1d.1
        ))),
        (None, Some(_)) => Ok(true),
        _ => Ok(false),
    }
}

/// PEFT's `adapter_config.json`, naming every adapted module in full.
pub fn peft_config(spec: &LoraSpec, adapters: &[TrainedAdapter], fan_in_fan_out: bool, base_model: Option<&str>) -> serde_json::Value {
    let modules: Vec<&str> = adapters.iter().filter_map(|a| a.spec.module.as_deref()).collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}
