//! `hf_export.json`: how the model's Hugging Face checkpoint tensors sit in its ONNX initializers.
//! `scripts/export_hf.py` writes it beside `model.onnx` (it has PyTorch and matches every tensor that
//! `save_pretrained` writes to an initializer by value); `build-graph` copies it into the artifacts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dpo::manifest::Manifest;
use crate::graph::Graph;
use crate::onnx::{load_model, tensor_to_f32, TensorProto};
use crate::store::NamedTensor;
use crate::{Error, Result};

pub const HF_MAP_FILE: &str = "hf_export.json";
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
        let m: HfMap = serde_json::from_str(text).map_err(|e| Error::Other(format!("{}: not a Hugging Face name map ({e})", path.display())))?;
        if m.format != FORMAT || m.format_version != FORMAT_VERSION {
            return Err(Error::Other(format!("{}: format {} v{} is not {FORMAT} v{FORMAT_VERSION}", path.display(), m.format, m.format_version)));
        }
        Ok(m)
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
        Err(Error::Other(format!(
            "{}: no {HF_MAP_FILE} (the Hugging Face name map); re-export the model with scripts/export_hf.py, which writes it beside model.onnx, and rebuild the artifacts",
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

/// A 2-D tensor's transpose.
pub fn transpose(data: &[f32], shape: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let (r, c) = (shape[0], shape[1]);
    let mut out = vec![0.0; data.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = data[i * c + j];
        }
    }
    (out, vec![c, r])
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
            let t = self.trained.get(p.name.as_str()).ok_or_else(|| Error::Other(format!("parameter {} is missing from the trained parameters", p.name)))?;
            return Ok(if r.transposed { transpose(&t.data, &t.shape) } else { (t.data.clone(), t.shape.clone()) });
        }
        if self.frozen.is_none() {
            let g = load_model(&self.infer_path)?.graph.unwrap_or_default();
            self.frozen = Some(g.initializer.into_iter().map(|t| (t.name.clone(), t)).collect());
        }
        // a frozen weight stored in half precision keeps its name for the float32 cast that reads it
        let stored = crate::graph::stored_names(name);
        let t = self.frozen.as_ref().and_then(|f| stored.iter().find_map(|n| f.get(n))).ok_or_else(|| {
            Error::Other(format!(
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
