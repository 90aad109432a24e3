//! `build-graph --model DIR` for a Hugging Face causal-LM folder: betadpo writes the model's forward graph
//! itself, in standard ONNX ops, from `config.json` and the safetensors weights (memory-mapped, each in its
//! stored dtype), with no PyTorch and no export step. The graph has the signature of an exported model
//! (`input_ids`, `attention_mask`, `position_ids` -> `logits`, the lm_head a MatMul) and one shared causal
//! mask before every Softmax, so the rest of `build-graph` (LoRA, the packed layout, the objective,
//! gradients) runs on it unchanged. Its initializers keep the checkpoint's tensor names, so the Hugging
//! Face name map `export --hf` needs is written here too.

pub mod config;
mod decoder;
pub mod generation;
mod gpt2;
mod ops;
mod rope;
pub mod weights;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use self::config::{Family, HfConfig};
use self::ops::{Writer, ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS};
use self::weights::Weights;
use crate::graph::{Builder, Graph, Names};
use crate::onnx::{dtype, load_model_mapped, value_info, Dim, MappedData, ModelProto, OperatorSetIdProto};
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The opset of the graphs betadpo writes (ReduceMean's axes as an input, LayerNormalization).
const OPSET: i64 = 18;

/// A model ready for `build-graph`: the ONNX model, the files its initializers are slices of, and the
/// Hugging Face name map (`hf_export.json`'s text) when betadpo wrote the graph itself.
pub struct Loaded {
    pub model: ModelProto,
    pub data: Vec<MappedData>,
    pub hf_map: Option<String>,
}

/// Whether `path` is a Hugging Face model folder (a directory with `config.json`).
pub fn is_hf_folder(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).is_file()
}

/// The model at `path`: a Hugging Face folder is written natively, anything else is loaded as an ONNX file.
pub fn load(path: &Path) -> Result<Loaded> {
    if is_hf_folder(path) {
        return import(path);
    }
    let (model, data) = load_model_mapped(path)?;
    Ok(Loaded { model, data, hf_map: None })
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::BadHfFolder { path: path.into(), detail: detail.into() }
}

/// Reads `dir/config.json` into the typed config, refusing architectures betadpo does not write.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    match HfConfig::parse(&text).map_err(|e| bad(&path, e))? {
        Ok(c) => Ok(c),
        Err(architecture) => Err(Error::UnsupportedArchitecture { path: dir.into(), architecture, supported: Family::supported() }),
    }
}

/// Writes the forward graph of the Hugging Face folder `dir`.
pub fn import(dir: &Path) -> Result<Loaded> {
    let config = read_config(dir)?;
    let weights = Weights::open(dir).map_err(|(file, detail)| bad(&file, detail))?;
    let (graph, hidden) = write_graph(&config, &weights).map_err(|e| bad(dir, e))?;
    let hf_map = hf_map(dir, &config, &graph, &hidden)?;
    Ok(Loaded { model: graph.into_model(), data: weights.into_files(), hf_map: Some(hf_map) })
}

/// The model's graph and the name of its final hidden state.
pub fn write_graph(c: &HfConfig, weights: &Weights) -> std::result::Result<(Graph, String), String> {
    let mut names = Names::default();
    for n in [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS] {
        names.reserve(n);
    }
    let mut w = Writer::new(Builder::new(&mut names, ""), weights);
    let (hidden, logits) = match c.family {
        Family::Gpt2 => gpt2::write(&mut w, c)?,
        _ => decoder::write(&mut w, c)?,
    };
    let nodes = w.b.take();
    let initializers = std::mem::take(&mut w.initializers);
    let token_ids = |name: &str| value_info(name, dtype::INT64, &[Dim::Sym("batch".into()), Dim::Sym("sequence".into())]);
    let mut graph = Graph {
        name: c.model_type.clone(),
        nodes,
        initializers,
        inputs: vec![token_ids(INPUT_IDS), token_ids(ATTENTION_MASK), token_ids(POSITION_IDS)],
        outputs: vec![value_info(&logits, dtype::FLOAT, &[Dim::Sym("batch".into()), Dim::Sym("sequence".into()), Dim::Fixed(c.vocab_size)])],
        opsets: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        ir_version: 8,
        ..Default::default()
    };
    graph.names = Names::from_graph(&graph);
    Ok((graph, hidden))
}

fn safetensors_dtype(t: i32) -> &'static str {
    match t {
        dtype::FLOAT16 => "F16",
        dtype::BFLOAT16 => "BF16",
        _ => "F32",
    }
}

/// `hf_export.json` for a graph whose initializers are the checkpoint's own tensors (one entry each).
fn hf_map(dir: &Path, c: &HfConfig, graph: &Graph, hidden: &str) -> Result<String> {
    let generation_path = dir.join(GENERATION_CONFIG_FILE);
    let generation: Value = match std::fs::read_to_string(&generation_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| bad(&generation_path, format!("not JSON ({e})")))?,
        Err(_) => Value::Null,
    };
    let tensors: Vec<Value> = graph
        .initializers
        .iter()
        .map(|t| json!({"name": t.name, "initializer": t.name, "transposed": false, "shape": t.dims, "dtype": safetensors_dtype(t.data_type)}))
        .collect();
    // the base a PEFT adapter names (`export --hf`, unless --base-model says otherwise): this folder
    let folder = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let map = json!({
        "format": "betadpo-hf-map",
        "format_version": 1,
        "lm_head_input": hidden,
        "config": c.raw,
        "generation_config": generation,
        "tensors": tensors,
        "source_model": folder.display().to_string(),
    });
    Ok(serde_json::to_string_pretty(&map).expect("the map serialises"))
}

/// The folder a model path names, when it is a Hugging Face folder (for the tokenizer and configs beside it).
pub fn hf_folder_of(model_source: &str) -> Option<PathBuf> {
    let p = PathBuf::from(model_source);
    is_hf_folder(&p).then_some(p)
}
