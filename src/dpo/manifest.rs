//! `manifest.json`: everything a driver in any language needs to run the artifacts — each graph's
//! inputs and outputs with their roles, the parameters and the files that hold them.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ObjectiveConfig;
use crate::dpo::model::params::InitializerRef;
use crate::run_layout::{graph_file, GRAPHS, HF_MAP_FILE, MANIFEST_FILE, PARAMS};
use crate::{Error, Result};
pub const FORMAT: &str = "betadpo-artifacts";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub role: String,
    pub dtype: String,
    /// Dimensions: numbers, or names for dimensions that vary (`rows` = 2 x pairs, `sequence`).
    pub shape: Vec<serde_json::Value>,
    /// For gradients, optimizer states and updates: the parameter they belong to.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parameter: Option<String>,
    /// For metrics: what the value means.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
}

/// A dimension of a [`TensorSpec`]: a fixed size, or the name of one that varies.
pub enum SpecDim<'a> {
    Fixed(i64),
    Named(&'a str),
}

impl TensorSpec {
    pub fn new(name: &str, role: &str, dtype: &str, shape: &[SpecDim]) -> Self {
        let shape = shape
            .iter()
            .map(|d| match d {
                SpecDim::Fixed(n) => serde_json::json!(n),
                SpecDim::Named(s) => serde_json::json!(s),
            })
            .collect();
        TensorSpec { name: name.into(), role: role.into(), dtype: dtype.into(), shape, parameter: None, description: None }
    }

    /// A float32 tensor of fixed dimensions.
    pub fn float(name: &str, role: &str, dims: &[i64]) -> Self {
        Self::new(name, role, "float32", &dims.iter().map(|&d| SpecDim::Fixed(d)).collect::<Vec<_>>())
    }

    /// A float32 tensor whose dimensions all vary with the batch.
    pub fn float_named(name: &str, role: &str, dims: &[&str]) -> Self {
        Self::new(name, role, "float32", &dims.iter().map(|&d| SpecDim::Named(d)).collect::<Vec<_>>())
    }

    pub fn of_parameter(mut self, p: &str) -> Self {
        self.parameter = Some(p.into());
        self
    }

    pub fn described(mut self, what: &str) -> Self {
        self.description = Some(what.into());
        self
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GraphSpec {
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl GraphSpec {
    /// `(name, value)` for each parameter input, each value made by `value` (one allocation per
    /// tensor: SmolLM2's parameters are 540 MB).
    pub fn parameter_feeds(&self, value: &dyn Fn(&str) -> Result<ndarray::ArrayD<f32>>) -> Result<Vec<(&str, crate::runtime::HostTensor)>> {
        self.inputs.iter().filter(|i| i.role == "parameter").map(|i| Ok((i.name.as_str(), crate::runtime::HostTensor::F32(value(&i.name)?)))).collect()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParameterSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub trainable: bool,
    pub beta_head: bool,
    pub initializers: Vec<InitializerRef>,
    /// Whether decoupled weight decay applies (matrices yes; biases, norms and the head no).
    pub weight_decay: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelSpec {
    pub source: String,
    pub input_ids: String,
    pub attention_mask: String,
    pub position_ids: Option<String>,
    pub logits: String,
    pub hidden_state: String,
    pub hidden_size: i64,
    pub vocab_size: i64,
    pub opset: i64,
    /// Positions the model has (gpt2's `wpe` rows), when a table in the graph bounds them: longer
    /// rows are refused before ONNX Runtime sees them. Absent for rotary models, which have no table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_positions: Option<usize>,
    /// The context its Hugging Face config gives (`max_position_embeddings`), when known: `infer`
    /// refuses longer prompts; training, like PyTorch, takes them when the model has no table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub betadpo_version: String,
    pub model: ModelSpec,
    pub objective: ObjectiveConfig,
    /// How the train and eval graphs take a batch (manifests without it are padded).
    #[serde(default)]
    pub layout: super::Layout,
    /// Packed layout: the model's mask was checked to be plain causal for sequences up to this many
    /// tokens; `train` refuses longer ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_tokens: Option<usize>,
    /// `train`, `eval`, `optimizer`, `infer`.
    pub graphs: BTreeMap<String, GraphSpec>,
    pub parameters: Vec<ParameterSpec>,
    /// Initial values of every parameter, beta head included (safetensors).
    pub parameters_file: String,
    /// The LoRA adapters, when the artifacts train adapters instead of the model's weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::dpo::model::lora::LoraSpec>,
    /// What the model's matrix products compute in (manifests without it: fp32).
    #[serde(default)]
    pub precision: crate::graph::Precision,
    /// The half products are emulated in float32 (operands and results rounded to half), so that a CPU runs them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub precision_emulated: bool,
    /// What the train graph recomputes or cuts to hold less (manifests without it: nothing).
    #[serde(default)]
    pub memory: MemorySpec,
}

/// The memory options the artifacts were built with (`build-graph --gradient-checkpointing`,
/// `--attention-chunks`, `--vocab-chunk`): `train` reads them to favour memory over speed in the
/// C heap when blocks are recomputed (see `runtime::tune_heap`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySpec {
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default)]
    pub attention_chunks: usize,
    #[serde(default)]
    pub vocab_chunk: i64,
}

impl Manifest {
    /// Whether `dir` holds artifacts betadpo wrote, of any format version: the only directories
    /// `build-graph --out` replaces.
    pub fn written_by_betadpo(dir: &Path) -> bool {
        let Ok(text) = crate::fs_guard::read_to_string_inside(dir, &dir.join(MANIFEST_FILE)) else { return false };
        serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v.get("format")?.as_str().map(|f| f == FORMAT)).unwrap_or(false)
    }

    /// Refuses an `out` that is neither absent, empty, nor artifacts betadpo wrote, and artifacts
    /// that hold anything besides betadpo's own files (a run, an export, a user's notes), which
    /// replacing them would delete.
    pub fn claim_out_dir(out: &Path) -> Result<()> {
        let kind = crate::output_dir::Kind { flag: "--out", what: "betadpo artifacts (a manifest.json)", replaced: true };
        let own = Self::own_files(out);
        crate::output_dir::claim_replacing(out, &kind, Self::written_by_betadpo, |name| own.iter().any(|o| o == name))
    }

    /// The names of the files `build-graph` writes into `dir`: those its manifest lists (graphs,
    /// parameters), the manifest, the shared weight files and the Hugging Face map.
    fn own_files(dir: &Path) -> Vec<String> {
        let mut own: Vec<String> = [MANIFEST_FILE, PARAMS, HF_MAP_FILE, crate::onnx::SHARED_DATA_FILE].map(String::from).into();
        own.extend(GRAPHS.map(graph_file));
        let listed =
            crate::fs_guard::read_to_string_inside(dir, &dir.join(MANIFEST_FILE)).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if let Some(m) = listed {
            own.extend(m["graphs"].as_object().into_iter().flat_map(|g| g.values()).filter_map(|g| g["file"].as_str()).map(String::from));
            own.extend(m["parameters_file"].as_str().map(String::from));
        }
        // a graph too large for one protobuf keeps its weights in `<file>.data` beside it
        let graphs_data: Vec<String> = own.iter().filter(|f| f.ends_with(".onnx")).map(|f| format!("{f}.data")).collect();
        own.extend(graphs_data);
        let entries = std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned());
        own.extend(entries.filter(|n| crate::onnx::is_cloned_weights_name(n)));
        own
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = crate::fs_guard::read_to_string_inside(dir, &path)?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| Error::BadManifest { path: path.to_path_buf(), detail: format!("not a betadpo manifest ({e})") })?;
        if m.format != FORMAT || m.format_version != FORMAT_VERSION {
            return Err(Error::BadManifest {
                path: path.to_path_buf(),
                detail: format!("format {} v{} is not {FORMAT} v{FORMAT_VERSION}", m.format, m.format_version),
            });
        }
        m.check().map_err(|detail| Error::BadManifest { path: path.to_path_buf(), detail })?;
        m.check_files(dir)?;
        Ok(m)
    }

    /// Refuses artifacts whose files are not regular files inside `dir` (a FIFO, a device, a link
    /// elsewhere), before any reader (ONNX Runtime included) opens one and blocks or reads forever.
    fn check_files(&self, dir: &Path) -> Result<()> {
        let listed = self.graphs.values().map(|g| g.file.clone()).chain([self.parameters_file.clone()]);
        for name in listed.chain(Self::own_files(dir)) {
            let path = dir.join(&name);
            if std::fs::symlink_metadata(&path).is_ok() {
                crate::fs_guard::open_inside(dir, &path)?;
            }
        }
        Ok(())
    }

    /// What the rest of the crate trusts: the files it names are plain names in the artifacts
    /// directory (so reading them never leaves it), and shapes and sizes are sane.
    fn check(&self) -> std::result::Result<(), String> {
        let files = self.graphs.values().map(|g| g.file.as_str()).chain([self.parameters_file.as_str()]);
        for f in files {
            let mut parts = Path::new(f).components();
            if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(n)), None) if n == f) {
                return Err(format!("file {f:?} is not a plain file name in the artifacts directory"));
            }
        }
        for p in &self.parameters {
            crate::onnx::checked_numel(&p.shape).map_err(|e| format!("parameter {}: {e}", p.name))?;
        }
        for (what, v) in [("hidden_size", self.model.hidden_size), ("vocab_size", self.model.vocab_size)] {
            if !(1..=i32::MAX as i64).contains(&v) {
                return Err(format!("model {what} {v} is out of range"));
            }
        }
        if let Some(p) = self.model.max_positions.filter(|&p| p < 2 || p > crate::limits::MAX_COUNT) {
            return Err(format!("model max_positions {p} is out of range"));
        }
        if let Some(n) = self.max_sequence_tokens.filter(|&n| n < 2) {
            return Err(format!("max_sequence_tokens {n} leaves no room for a prompt and an answer"));
        }
        self.check_parameter_list()
    }

    /// The parameters as `train`, `export` and `validate` all need them: each listed once, at
    /// least one trainable, and the same set the graphs take as parameter inputs.
    fn check_parameter_list(&self) -> std::result::Result<(), String> {
        let mut listed = std::collections::HashSet::new();
        for p in &self.parameters {
            if !listed.insert(p.name.as_str()) {
                return Err(format!("parameter {} is listed twice", p.name));
            }
        }
        if self.trainable().next().is_none() {
            return Err("no parameter is trainable: there is nothing to train".into());
        }
        for which in ["train", "eval", "optimizer", "infer"] {
            let g = self.graphs.get(which).ok_or_else(|| format!("the manifest has no `{which}` graph"))?;
            for t in g.inputs.iter().filter(|t| t.role == "parameter") {
                if !self.parameters.iter().any(|p| p.name == t.name && p.trainable) {
                    return Err(format!("the {which} graph takes parameter {}, which is not among the manifest's trainable parameters", t.name));
                }
            }
        }
        let train = &self.graphs["train"];
        if let Some(p) = self.trainable().find(|p| train.input_for_parameter(&p.name).is_none()) {
            return Err(format!("trainable parameter {} is not an input of the train graph", p.name));
        }
        Ok(())
    }

    /// Checks parameter values read from `file` against the manifest before anything is sized by
    /// it (the optimizer's moments are): every trainable parameter present, with its shape.
    pub fn check_parameter_values(&self, tensors: &[crate::store::NamedTensor], file: &Path) -> Result<()> {
        for p in self.trainable() {
            let t = tensors
                .iter()
                .find(|t| t.name == p.name)
                .ok_or_else(|| Error::ParameterMismatch(format!("{}: parameter {} is missing", file.display(), p.name)))?;
            if t.shape.len() != p.shape.len() || t.shape.iter().zip(&p.shape).any(|(&a, &b)| a as i64 != b) {
                return Err(Error::ParameterMismatch(format!(
                    "{}: parameter {} has shape {:?}, the manifest says {:?}",
                    file.display(),
                    p.name,
                    t.shape,
                    p.shape
                )));
            }
        }
        Ok(())
    }

    pub fn graph(&self, which: &str) -> Result<&GraphSpec> {
        self.graphs.get(which).ok_or_else(|| Error::Artifacts(format!("the manifest has no `{which}` graph")))
    }

    pub fn trainable(&self) -> impl Iterator<Item = &ParameterSpec> {
        self.parameters.iter().filter(|p| p.trainable)
    }
}

impl GraphSpec {
    pub fn input(&self, role: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.role == role)
    }
    pub fn output(&self, role: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.role == role)
    }
    /// The output with `role` for `parameter` (a gradient, an update).
    pub fn output_for(&self, role: &str, parameter: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.role == role && t.parameter.as_deref() == Some(parameter))
    }
    /// The parameter input named `name`.
    pub fn input_for_parameter(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.role == "parameter" && t.name == name)
    }
    pub fn input_for(&self, role: &str, parameter: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.role == role && t.parameter.as_deref() == Some(parameter))
    }
}
