//! `hf_export.json`: how the model's Hugging Face checkpoint tensors sit in its ONNX initializers.
//! `scripts/tools/export_hf.py` writes it beside `model.onnx` (it has PyTorch and matches every tensor that
//! `save_pretrained` writes to an initializer by value); `build-graph` copies it into the artifacts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dpo::manifest::Manifest;
use crate::graph::Graph;
use crate::onnx::{load_model, tensor_to_f32, TensorProto};
use crate::run_layout::HF_MAP_FILE;
use crate::store::NamedTensor;
use crate::{Error, Result};

const FORMAT: &str = "betadpo-hf-map";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Deserialize)]
pub struct HfMap {
    pub format: String,
    pub format_version: u32,
    /// The ONNX tensor the lm_head multiplies: what a PyTorch hook on the output embedding sees.
    pub lm_head_input: Option<String>,
    /// `config.json` as `save_pretrained` wrote it.
    pub config: serde_json::Value,
    pub generation_config: Option<serde_json::Value>,
    pub tensors: Vec<HfTensor>,
    /// The pretrained model the ONNX model was exported from (a Hub id or a local folder), when
    /// export_hf.py loaded one: the base a PEFT adapter names.
    #[serde(default)]
    pub source_model: Option<String>,
}

/// One tensor of the checkpoint: `value = T(initializer) - offset`, `T` a transpose when `transposed`.
#[derive(Clone, Debug, Deserialize)]
pub struct HfTensor {
    pub name: String,
    pub initializer: String,
    pub transposed: bool,
    /// The exporter folded `offset + weight` into the initializer (Gemma's `1 + w` norms).
    #[serde(default)]
    pub offset: Option<f64>,
    pub shape: Vec<usize>,
    /// The checkpoint's storage type (`F32`, `F16`, `BF16`).
    pub dtype: String,
    /// Other initializers holding the same tied weight (GPT-2's transposed lm_head copy).
    #[serde(default)]
    pub tied_copies: Vec<TiedCopy>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TiedCopy {
    pub initializer: String,
    pub transposed: bool,
}

impl HfMap {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fs_guard::read_to_string(path)?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let m: HfMap =
            serde_json::from_str(text).map_err(|e| Error::BadManifest { path: path.to_path_buf(), detail: format!("not a Hugging Face name map ({e})") })?;
        if m.format != FORMAT || m.format_version != FORMAT_VERSION {
            return Err(Error::BadManifest {
                path: path.to_path_buf(),
                detail: format!("format {} v{} is not {FORMAT} v{FORMAT_VERSION}", m.format, m.format_version),
            });
        }
        m.check().map_err(|why| Error::BadManifest { path: path.to_path_buf(), detail: why })?;
        Ok(m)
    }

    /// What a Hugging Face directory written from the map needs, checked before anything is
    /// written: a config object, tensors listed once each with sane shapes, transposes of matrices only.
    fn check(&self) -> std::result::Result<(), String> {
        if !self.config.is_object() {
            return Err("`config` must be an object (config.json as save_pretrained wrote it)".into());
        }
        if self.generation_config.as_ref().is_some_and(|g| !g.is_object() && !g.is_null()) {
            return Err("`generation_config` must be an object".into());
        }
        if self.tensors.is_empty() {
            return Err("`tensors` is empty: the checkpoint would hold no weights".into());
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor {} is listed twice", t.name));
            }
            let dims: Vec<i64> = t.shape.iter().map(|&d| i64::try_from(d).unwrap_or(-1)).collect();
            crate::onnx::checked_numel(&dims).map_err(|e| format!("tensor {}: {e}", t.name))?;
            let transposed = t.transposed || t.tied_copies.iter().any(|c| c.transposed);
            if transposed && t.shape.len() != 2 {
                return Err(format!("tensor {} has shape {:?}: only a 2-D tensor can be `transposed`", t.name, t.shape));
            }
            if !matches!(t.dtype.as_str(), "F32" | "F16" | "BF16") {
                return Err(format!("tensor {} has dtype {:?} (F32, F16 or BF16)", t.name, t.dtype));
            }
            if t.offset.is_some_and(|o| !o.is_finite()) {
                return Err(format!("tensor {} has a non-finite offset", t.name));
            }
        }
        Ok(())
    }

    /// The map carried by the artifacts, or (artifacts built before maps were carried) the one
    /// beside the model they were built from.
    pub fn find(artifacts: &Path, manifest: &Manifest) -> Result<PathBuf> {
        let carried = artifacts.join(HF_MAP_FILE);
        if carried.exists() {
            return Ok(carried);
        }
        let beside = Path::new(&manifest.model.source).with_file_name(HF_MAP_FILE);
        if beside.exists() {
            return Ok(beside);
        }
        Err(Error::NotExportable(format!(
            "{}: no {HF_MAP_FILE} (the Hugging Face name map); re-export the model with scripts/tools/export_hf.py, which writes it beside model.onnx, and rebuild the artifacts",
            artifacts.display()
        )))
    }

    /// Every initializer the map reads, with the element count it must have.
    fn initializers(&self) -> impl Iterator<Item = (&str, usize)> {
        self.tensors.iter().flat_map(|t| {
            let n = t.shape.iter().product();
            std::iter::once((t.initializer.as_str(), n)).chain(t.tied_copies.iter().map(move |c| (c.initializer.as_str(), n)))
        })
    }

    /// Why this map does not belong to `model` (an initializer it names is missing or has another
    /// size), or `None` when it does.
    pub fn mismatch(&self, model: &Graph) -> Option<String> {
        self.initializers().find_map(|(name, n)| match model.initializer(name) {
            None => Some(format!("it names initializer {name}, which the model does not have")),
            Some(t) if t.dims.iter().product::<i64>() as usize != n => Some(format!("initializer {name} has shape {:?}, the map expects {n} elements", t.dims)),
            Some(_) => None,
        })
    }
}

/// A 2-D tensor's transpose (anything else is refused: the map or the manifest lied about it).
pub fn transpose(data: &[f32], shape: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
    let &[r, c] = shape else {
        return Err(Error::NotExportable(format!("a tensor of shape {shape:?} cannot be transposed (only 2-D ones)")));
    };
    if r.checked_mul(c) != Some(data.len()) {
        return Err(Error::NotExportable(format!("a tensor of shape {shape:?} holds {} values", data.len())));
    }
    let mut out = vec![0.0; data.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = data[i * c + j];
        }
    }
    Ok((out, vec![c, r]))
}

/// Values of the model's initializers after training: a trained parameter's (transposed for a tied
/// copy stored that way), otherwise the frozen value in the inference graph.
pub struct InitializerValues<'a> {
    manifest: &'a Manifest,
    trained: HashMap<&'a str, &'a NamedTensor>,
    infer_path: PathBuf,
    frozen: Option<HashMap<String, TensorProto>>,
}

impl<'a> InitializerValues<'a> {
    pub fn new(artifacts: &Path, manifest: &'a Manifest, trained: &'a [NamedTensor]) -> Result<Self> {
        let infer_path = artifacts.join(&manifest.graph("infer")?.file);
        Ok(InitializerValues { manifest, trained: trained.iter().map(|t| (t.name.as_str(), t)).collect(), infer_path, frozen: None })
    }

    /// `(values, shape)` of the initializer `name`.
    pub fn get(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        for p in self.manifest.trainable() {
            let Some(r) = p.initializers.iter().find(|r| r.name == name) else { continue };
            let t = self
                .trained
                .get(p.name.as_str())
                .ok_or_else(|| Error::ParameterMismatch(format!("parameter {} is missing from the trained parameters", p.name)))?;
            return if r.transposed { transpose(&t.data, &t.shape) } else { Ok((t.data.clone(), t.shape.clone())) };
        }
        if self.frozen.is_none() {
            let g = load_model(&self.infer_path)?.graph.unwrap_or_default();
            self.frozen = Some(g.initializer.into_iter().map(|t| (t.name.clone(), t)).collect());
        }
        // a frozen weight stored in half precision keeps its name for the float32 cast that reads it
        let stored = crate::graph::stored_names(name);
        let t = self.frozen.as_ref().and_then(|f| stored.iter().find_map(|n| f.get(n))).ok_or_else(|| {
            Error::NotExportable(format!(
                "initializer {name} is neither a trained parameter nor in {} (was the map written for another model?)",
                self.infer_path.display()
            ))
        })?;
        Ok((tensor_to_f32(t)?, t.dims.iter().map(|&d| d as usize).collect()))
    }
}

/// The map beside the model file, as text for the artifacts to carry: `None` when there is none,
/// `Some(Err(why))` when it does not belong to this model (written for another export).
pub fn beside_model(model_path: &Path, model: &Graph) -> Option<std::result::Result<String, String>> {
    let path = model_path.with_file_name(HF_MAP_FILE);
    let text = crate::fs_guard::read_to_string(&path).ok()?;
    Some(match HfMap::parse(&text, &path) {
        Err(e) => Err(e.to_string()),
        Ok(m) => match m.mismatch(model) {
            Some(why) => Err(format!("{}: {why}", path.display())),
            None => Ok(text),
        },
    })
}
