//! `export`: the inference graph (LM + beta head) with trained parameters baked in as
//! initializers, deployable in any ONNX Runtime binding (here), or LoRA adapters merged into it or
//! kept apart as an ONNX Runtime adapter file ([`lora`]), or the policy as a Hugging Face checkpoint
//! or PEFT adapter ([`hf`]).

pub mod hf;
pub mod lora;

use std::path::{Path, PathBuf};

use crate::dpo::manifest::Manifest;
use crate::graph::Graph;
use crate::onnx::{encode_adapter, load_model, read_adapter, save_model, tensor_f32, AdapterParameter, SaveOptions};
use crate::run_layout;
use crate::store::read_safetensors;
use crate::{Error, Result};
use lora::{merge_adapters, trained_adapters, TrainedAdapter};

/// Where a run's trained parameters are and which artifacts they belong to.
pub struct RunParams {
    pub params: PathBuf,
    pub artifacts: PathBuf,
    /// The tokenizer the run was trained with (and its config when given apart).
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
}

/// Finds `RUN/final/params.safetensors` (or the newest checkpoint when the run did not finish).
pub fn locate_run(run: &Path) -> Result<RunParams> {
    if !run.is_dir() {
        return Err(Error::NotFound { path: run.to_path_buf(), detail: "no such run directory".into() });
    }
    let final_params = run.join(run_layout::FINAL_DIR).join(run_layout::PARAMS);
    let params = if final_params.exists() {
        final_params
    } else {
        let newest = run_layout::list_checkpoints(run).pop();
        match newest {
            Some((_, dir)) => dir.join(run_layout::PARAMS),
            None => return Err(Error::NotFound { path: run.to_path_buf(), detail: "no final parameters and no checkpoint (did training run?)".into() }),
        }
    };
    let cfg_path = run.join(run_layout::CONFIG_FILE);
    let text = crate::fs_guard::read_to_string_inside(run, &cfg_path)?;
    let cfg: run_layout::RunRecord = serde_json::from_str(&text).map_err(|e| Error::BadManifest { path: cfg_path.to_path_buf(), detail: e.to_string() })?;
    Ok(RunParams { params, artifacts: cfg.artifacts, tokenizer: cfg.tokenizer, tokenizer_config: cfg.tokenizer_config })
}

/// Refuses to overwrite a file at `out` (or its `<out>.data`) unless it is a model betadpo wrote.
fn claim_model_file(out: &Path) -> Result<()> {
    let refuse = |path: &Path, what: &str| {
        Err(Error::Refused {
            path: path.to_path_buf(),
            detail: format!("{what}; betadpo overwrites only models it exported (choose another --out, or remove it yourself)"),
        })
    };
    let data = crate::onnx::external_data_path(out)?;
    if std::fs::symlink_metadata(out).is_ok() {
        if !out.is_file() {
            return refuse(out, "exists and is not a file");
        }
        if crate::onnx::producer_name(out)?.as_deref() != Some(crate::graph::PRODUCER) {
            return refuse(out, "exists and is not an ONNX model written by betadpo");
        }
    } else if std::fs::symlink_metadata(&data).is_ok() {
        return refuse(&data, "exists beside a model that does not");
    }
    Ok(())
}

/// How LoRA adapters appear in an exported model.
#[derive(Clone, Debug, Default)]
pub enum AdapterForm {
    /// `A` and `B` baked in as initializers beside the base weights (the graph as trained).
    #[default]
    Baked,
    /// Folded into the base weights: a plain model (`export --merge`).
    Merged,
    /// `A` and `B` left as inputs whose defaults give the base model, and their trained values in
    /// ONNX Runtime's adapter file at this path (`export --adapter`).
    OrtAdapter(PathBuf),
}

/// Writes the deployable model: inputs `input_ids`, `attention_mask` (and `position_ids` when the
/// model has it); outputs `logits` and `beta`.
pub fn export_model(artifacts: &Path, params: &Path, out: &Path, form: &AdapterForm) -> Result<()> {
    let m = Manifest::load(artifacts)?;
    let spec = m.graph("infer")?;
    let lora = match (&m.lora, form) {
        (None, AdapterForm::Baked) => None,
        (None, _) => {
            return Err(Error::NotExportable(format!(
                "{}: the artifacts train no LoRA adapters (--merge and --adapter are for --lora-rank builds)",
                artifacts.display()
            )))
        }
        (Some(l), _) => Some(l),
    };
    let model = load_model(&artifacts.join(&spec.file))?;
    let mut g = Graph::from_model(model)?;
    let (tensors, _) = read_safetensors(params)?;
    m.check_parameter_values(&tensors, params)?;
    for p in m.trainable() {
        let t = tensors.iter().find(|t| t.name == p.name).expect("checked above");
        let dims = p.shape.clone();
        let adapter_factor = lora.is_some_and(|l| l.is_adapter(&p.name));
        if adapter_factor && matches!(form, AdapterForm::OrtAdapter(_)) {
            // stays an input; its default (B = 0) leaves the base model unchanged
            let zeros = vec![0.0; t.data.len()];
            let is_b = lora.is_some_and(|l| l.adapters.iter().any(|a| a.b == p.name));
            let default = if is_b { &zeros } else { &t.data };
            g.initializers.push(tensor_f32(&p.name, &dims, default));
            continue;
        }
        g.inputs.retain(|i| i.name != p.name);
        g.initializers.push(tensor_f32(&p.name, &dims, &t.data));
    }
    if let Some(l) = lora {
        let trained = trained_adapters(l, &tensors)?;
        match form {
            AdapterForm::Merged => merge_adapters(&mut g, l, &trained)?,
            AdapterForm::OrtAdapter(file) => write_adapter_file(file, &trained)?,
            AdapterForm::Baked => {}
        }
    }
    claim_model_file(out)?;
    g.name = "betadpo_policy_with_beta".into();
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        crate::temp_files::remove_stale(parent, None);
    }
    let mut model = g.into_model();
    model.metadata_props.extend(limit_metadata(&m));
    save_model(&model, out, &SaveOptions::default())
}

/// Keys of an exported model's metadata that carry the model's limits to `infer`.
pub const MAX_POSITIONS_KEY: &str = "betadpo.max_positions";
pub const VOCAB_SIZE_KEY: &str = "betadpo.vocab_size";
pub const HIDDEN_SIZE_KEY: &str = "betadpo.hidden_size";

/// The model's limits, for `infer` to check prompts against before ONNX Runtime sees them.
fn limit_metadata(m: &Manifest) -> Vec<crate::onnx::proto::StringStringEntryProto> {
    let entry = |key: &str, value: String| crate::onnx::proto::StringStringEntryProto { key: key.into(), value };
    let mut v = vec![entry(VOCAB_SIZE_KEY, m.model.vocab_size.to_string()), entry(HIDDEN_SIZE_KEY, m.model.hidden_size.to_string())];
    v.extend(m.model.max_positions.or(m.model.context_length).map(|p| entry(MAX_POSITIONS_KEY, p.to_string())));
    v
}

/// ONNX Runtime's adapter file with every trained `A` and `B` (float32).
fn write_adapter_file(file: &Path, trained: &[TrainedAdapter]) -> Result<()> {
    if file.extension().is_none_or(|e| e != "onnx_adapter") {
        return Err(Error::BadFlag { flag: "--adapter".into(), detail: format!("{}: the file name must end in .onnx_adapter", file.display()) });
    }
    if std::fs::symlink_metadata(file).is_ok() && !is_our_adapter_file(file) {
        return Err(Error::Refused {
            path: file.to_path_buf(),
            detail: "exists and is not an adapter file betadpo wrote; choose another --adapter, or remove it yourself".into(),
        });
    }
    let bytes: Vec<(String, Vec<i64>, Vec<u8>)> = trained
        .iter()
        .flat_map(|t| [(&t.spec.a, &t.a), (&t.spec.b, &t.b)])
        .map(|(name, m)| (name.clone(), m.shape().iter().map(|&d| d as i64).collect(), m.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let params: Vec<AdapterParameter> =
        bytes.iter().map(|(name, dims, raw)| AdapterParameter { name, dims, data_type: crate::onnx::dtype::FLOAT, raw }).collect();
    let encoded = encode_adapter(&params, ADAPTER_VERSION, 0)?;
    crate::temp_files::write_atomic(file, |w| w.write_all(&encoded))
}

/// The `adapter_version` betadpo writes: a file with it (and the `TORT` identifier) is one of ours.
const ADAPTER_VERSION: i32 = 0x0BE7_AD90;

fn is_our_adapter_file(file: &Path) -> bool {
    let Ok(b) = crate::fs_guard::read(file) else { return false };
    read_adapter(&b).is_ok_and(|a| a.adapter_version() == ADAPTER_VERSION)
}
