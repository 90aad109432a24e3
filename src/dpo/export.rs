//! `export`: the inference graph (LM + beta head) with trained parameters baked in as
//! initializers, deployable in any ONNX Runtime binding.

use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use crate::graph::Graph;
use crate::onnx::{load_model, save_model, tensor_f32, SaveOptions};
use crate::store::read_safetensors;
use crate::{Error, Result};

/// Where a run's trained parameters are and which artifacts they belong to.
pub struct RunParams {
    pub params: PathBuf,
    pub artifacts: PathBuf,
}

/// Finds `RUN/final/params.safetensors` (or the newest checkpoint when the run did not finish).
pub fn locate_run(run: &Path) -> Result<RunParams> {
    if !run.is_dir() {
        return Err(Error::Other(format!("{}: no such run directory", run.display())));
    }
    let final_params = run.join("final").join("params.safetensors");
    let params = if final_params.exists() {
        final_params
    } else {
        let newest = crate::train::checkpoint::list(run).pop();
        match newest {
            Some((_, dir)) => dir.join(crate::train::checkpoint::PARAMS),
            None => return Err(Error::Other(format!("{}: no final parameters and no checkpoint (did training run?)", run.display()))),
        }
    };
    let cfg_path = run.join(crate::train::trainer::CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: crate::train::config::TrainConfig = serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", cfg_path.display())))?;
    Ok(RunParams { params, artifacts: cfg.artifacts })
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

/// Writes the deployable model: inputs `input_ids`, `attention_mask` (and `position_ids` when the
/// model has it); outputs `logits` and `beta`.
pub fn export_model(artifacts: &Path, params: &Path, out: &Path) -> Result<()> {
    let m = Manifest::load(artifacts)?;
    let spec = m.graph("infer")?;
    let model = load_model(&artifacts.join(&spec.file))?;
    let mut g = Graph::from_model(model)?;
    let (tensors, _) = read_safetensors(params)?;
    for p in m.trainable() {
        let t = tensors.iter().find(|t| t.name == p.name).ok_or_else(|| Error::Other(format!("{}: parameter {} is missing", params.display(), p.name)))?;
        let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        if dims != p.shape {
            return Err(Error::Other(format!("{}: parameter {} has shape {dims:?}, the artifacts expect {:?}", params.display(), p.name, p.shape)));
        }
        g.inputs.retain(|i| i.name != p.name);
        g.initializers.push(tensor_f32(&p.name, &dims, &t.data));
    }
    claim_model_file(out)?;
    g.name = "betadpo_policy_with_beta".into();
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        crate::temp_files::remove_stale(parent, None);
    }
    save_model(&g.into_model(), out, &SaveOptions::default())
}
