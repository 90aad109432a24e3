//! `export --hf DIR`: the trained policy as a Hugging Face checkpoint (`model.safetensors` under the
//! model's own parameter names, `config.json`, tokenizer files) that
//! `AutoModelForCausalLM.from_pretrained(DIR)` loads, and the beta head beside it
//! (`beta_head.safetensors` + `beta_head.json`). Tied weights are one tensor in Hugging Face; where
//! the exporter stored two copies, build-graph trained them as one parameter, and that value is
//! written once (a map naming copies that training changed differently is refused).

pub mod map;
pub mod peft;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use self::map::{transpose, HfMap, HfTensor, InitializerValues};
use crate::dpo::manifest::Manifest;
use crate::dpo::objective::{HEAD_BIAS, HEAD_REFERENCE_WIDTH, HEAD_WEIGHT};
use crate::dpo::{BetaAggregate, HeadInput};
use crate::store::{read_safetensors, write_safetensors, NamedTensor};
use crate::{Error, Result};

/// Lists what an `export --hf` wrote, so a later one may replace the directory and nothing else.
const MARKER_FILE: &str = "betadpo_export.json";
const MARKER_FORMAT: &str = "betadpo-hf-export";
pub const CHECKPOINT_FILE: &str = "model.safetensors";
pub const BETA_HEAD_FILE: &str = "beta_head.safetensors";
pub const BETA_HEAD_CONFIG: &str = "beta_head.json";
/// The tokenizer files `AutoTokenizer.from_pretrained` reads, copied when present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
];

/// Where the tokenizer files come from: `tokenizer.json` (or a directory holding it) and an
/// explicit `tokenizer_config.json` (the one training used, when given apart).
pub struct TokenizerSource {
    pub path: PathBuf,
    pub config: Option<PathBuf>,
}

/// What `export_hf` wrote.
pub struct HfReport {
    pub files: Vec<String>,
    pub tensors: usize,
    /// Checkpoint tensors that stand for tied weights written once (with the copies they stand for).
    pub tied: Vec<String>,
    /// A PEFT adapter folder (LoRA artifacts) rather than a whole checkpoint.
    pub peft: bool,
    /// The base model a PEFT adapter's `adapter_config.json` names, when one is known.
    pub base_model: Option<String>,
}

/// Writes `out` (a new directory, or one an earlier `export --hf` wrote) from the artifacts and the
/// parameters `params` (a run's trained ones, or the artifacts' initial ones). `base_model` is
/// the Hub id or folder a PEFT adapter names as its base (default: the model export_hf.py loaded).
pub fn export_hf(artifacts: &Path, params: &Path, out: &Path, tokenizer: Option<&TokenizerSource>, base_model: Option<&str>) -> Result<HfReport> {
    let manifest = Manifest::load(artifacts)?;
    let map_path = HfMap::find(artifacts, &manifest)?;
    let map = HfMap::load(&map_path)?;
    if manifest.objective.has_head() {
        check_head_input(&manifest, &map, &map_path)?;
    }
    if let Some(lora) = &manifest.lora {
        // the ecosystem's form of a LoRA fine-tune: the adapters for PEFT, the base left as it is
        return peft::export_peft(artifacts, &manifest, lora, &map, params, out, tokenizer, base_model);
    }
    claim(out)?;
    let tokenizer_files = match tokenizer {
        Some(t) => tokenizer_files(t)?,
        None => Vec::new(),
    };
    let (trained, _) = read_safetensors(params)?;
    let mut values = InitializerValues::new(artifacts, &manifest, &trained)?;
    let mut checkpoint = Vec::with_capacity(map.tensors.len());
    for t in &map.tensors {
        checkpoint
            .push(checkpoint_tensor(t, &mut values).map_err(|e| Error::BadManifest { path: map_path.to_path_buf(), detail: format!("{}: {e}", t.name) })?);
    }
    let head = beta_head(&manifest, &trained, params)?;

    let files = write_export_dir(out, &manifest, ExportSource { artifacts, params, tokenizer }, &tokenizer_files, head.as_deref(), |dir, files| {
        write_json(dir, "config.json", &float32_config(&map), files)?;
        if let Some(g) = &map.generation_config {
            write_json(dir, "generation_config.json", g, files)?;
        }
        write_checkpoint(dir, CHECKPOINT_FILE, &checkpoint, files)
    })?;
    let tied = map.tensors.iter().filter(|t| !t.tied_copies.is_empty()).map(|t| t.name.clone()).collect();
    Ok(HfReport { files, tensors: checkpoint.len(), tied, peft: false, base_model: None })
}

/// Where an export's values come from, for its marker file.
struct ExportSource<'a> {
    artifacts: &'a Path,
    params: &'a Path,
    tokenizer: Option<&'a TokenizerSource>,
}

/// Writes an `export --hf` directory (a full checkpoint or a PEFT adapter): the model's own files
/// (`model_files`), then the beta head, the tokenizer files and the marker listing all of them,
/// into a temporary directory swapped into place when complete. Returns the files written.
fn write_export_dir(
    out: &Path,
    manifest: &Manifest,
    source: ExportSource,
    tokenizer_files: &[(String, PathBuf)],
    head: Option<&[NamedTensor]>,
    model_files: impl FnOnce(&Path, &mut Vec<String>) -> Result<()>,
) -> Result<Vec<String>> {
    let mut files: Vec<String> = Vec::new();
    crate::temp_files::write_dir(out, claim, |dir| {
        model_files(dir, &mut files)?;
        write_json(dir, BETA_HEAD_CONFIG, &head_config(manifest), &mut files)?;
        if let Some(h) = head {
            write_safetensors(&dir.join(BETA_HEAD_FILE), h, None)?;
            files.push(BETA_HEAD_FILE.into());
        }
        for (name, src) in tokenizer_files {
            std::fs::copy(src, dir.join(name)).map_err(|e| Error::io(src, e))?;
            files.push(name.clone());
        }
        let marker = json!({
            "format": MARKER_FORMAT,
            "format_version": 1,
            "artifacts": source.artifacts.display().to_string(),
            "parameters": source.params.display().to_string(),
            "tokenizer": source.tokenizer.map(|t| t.path.display().to_string()),
            "files": files,
        });
        write_json(dir, MARKER_FILE, &marker, &mut files)
    })?;
    Ok(files)
}

/// A safetensors checkpoint as `save_pretrained` writes it (metadata `format: pt`).
fn write_checkpoint(dir: &Path, name: &str, tensors: &[NamedTensor], written: &mut Vec<String>) -> Result<()> {
    let pt = Some(BTreeMap::from([("format".to_string(), "pt".to_string())]));
    write_safetensors(&dir.join(name), tensors, pt)?;
    written.push(name.into());
    Ok(())
}

fn write_json(dir: &Path, name: &str, v: &serde_json::Value, written: &mut Vec<String>) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json serialises") + "\n";
    crate::temp_files::write_atomic(&dir.join(name), |w| w.write_all(text.as_bytes()))?;
    written.push(name.into());
    Ok(())
}

/// The checkpoint tensor: its initializer's value (transposed, offset removed), and tied copies
/// checked to hold the same weight.
fn checkpoint_tensor(t: &HfTensor, values: &mut InitializerValues) -> Result<NamedTensor> {
    let as_checkpoint = |(data, shape): (Vec<f32>, Vec<usize>), transposed: bool| if transposed { transpose(&data, &shape) } else { Ok((data, shape)) };
    let (mut data, shape) = as_checkpoint(values.get(&t.initializer)?, t.transposed)?;
    if shape != t.shape {
        return Err(Error::NotExportable(format!(
            "initializer {} has shape {shape:?} (as stored in the checkpoint), the map expects {:?}",
            t.initializer, t.shape
        )));
    }
    for c in &t.tied_copies {
        let (copy, _) = as_checkpoint(values.get(&c.initializer)?, c.transposed)?;
        if copy != data {
            return Err(Error::NotExportable(format!(
                "the tied copies {} and {} hold different values (trained apart?); Hugging Face ties them into one tensor",
                t.initializer, c.initializer
            )));
        }
    }
    if let Some(offset) = t.offset {
        // the exporter stored `offset + w`: w comes back up to float32 rounding of that sum
        data.iter_mut().for_each(|v| *v = (f64::from(*v) - offset) as f32);
    }
    Ok(NamedTensor { name: t.name.clone(), shape, data })
}

/// The map's config; weights are written as float32, so a checkpoint stored in another type says so.
fn float32_config(map: &HfMap) -> serde_json::Value {
    let mut config = map.config.clone();
    if map.tensors.iter().any(|t| t.dtype != "F32") {
        for key in ["dtype", "torch_dtype"] {
            if let Some(v) = config.get_mut(key) {
                *v = json!("float32");
            }
        }
    }
    config
}

/// The PyTorch loader hooks the lm_head's input, so the head must read exactly that tensor.
fn check_head_input(manifest: &Manifest, map: &HfMap, map_path: &Path) -> Result<()> {
    match &map.lm_head_input {
        Some(h) if *h != manifest.model.hidden_state => Err(Error::NotExportable(format!(
            "the beta head reads {} (--hidden-state), not the lm_head's input {h} ({}); a PyTorch loader could not reproduce it, rebuild the artifacts without --hidden-state",
            manifest.model.hidden_state,
            map_path.display()
        ))),
        _ => Ok(()),
    }
}

fn beta_head(manifest: &Manifest, trained: &[NamedTensor], params: &Path) -> Result<Option<Vec<NamedTensor>>> {
    if !manifest.objective.has_head() {
        return Ok(None);
    }
    let get = |name: &str, short: &str| {
        trained
            .iter()
            .find(|t| t.name == name)
            .map(|t| NamedTensor { name: short.into(), ..t.clone() })
            .ok_or_else(|| Error::ParameterMismatch(format!("{}: parameter {name} is missing", params.display())))
    };
    Ok(Some(vec![get(HEAD_WEIGHT, "weight")?, get(HEAD_BIAS, "bias")?]))
}

/// What the loader in the README needs: where the head reads the hidden state and how beta is bounded.
fn head_config(manifest: &Manifest) -> serde_json::Value {
    let o = &manifest.objective;
    json!({
        "format": "betadpo-beta-head",
        "format_version": 1,
        "hidden_size": manifest.model.hidden_size,
        // beta-DPO's batch beta exists only in training; a deployed model has beta_0
        "fixed_beta": o.fixed_beta.or(o.beta_dpo.map(|d| d.beta0)).or(o.epsilon_dpo.map(|e| e.beta0)),
        "aggregate": match o.beta_aggregate { BetaAggregate::Last => "last", BetaAggregate::Mean => "mean" },
        "head_input": match o.head_input { HeadInput::Raw => "raw", HeadInput::Normalized => "normalized" },
        "reference_width": HEAD_REFERENCE_WIDTH,
        "beta_min": o.beta_min,
        "beta_max": o.beta_max.is_finite().then_some(o.beta_max),
        "formula": "h = input of model.get_output_embeddings() at each row's last attended token (aggregate last) or its mean over \
                    attended tokens (mean); head_input normalized: x = h / sqrt(mean(h^2) + 1e-6) * reference_width / hidden_size, \
                    raw: x = h; s = softplus(x . weight + bias); beta = beta_min + R * tanh(s / R) with R = beta_max - beta_min, \
                    or beta_min + s when beta_max is null; fixed_beta, when set, replaces all of it",
    })
}

/// `(name in the checkpoint directory, source)` of each tokenizer file to copy.
fn tokenizer_files(t: &TokenizerSource) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    let dir = if t.path.is_dir() {
        t.path.clone()
    } else if t.path.is_file() {
        files.push(("tokenizer.json".to_string(), t.path.clone()));
        t.path.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        return Err(Error::NotFound { path: t.path.to_path_buf(), detail: "no such tokenizer file or directory".into() });
    };
    for name in TOKENIZER_FILES {
        let src = dir.join(name);
        if src.is_file() && !files.iter().any(|(n, _)| n == name) {
            files.push((name.to_string(), src));
        }
    }
    if let Some(c) = &t.config {
        files.retain(|(n, _)| n != "tokenizer_config.json");
        files.push(("tokenizer_config.json".into(), c.clone()));
    }
    if !files.iter().any(|(n, _)| n == "tokenizer.json") {
        return Err(Error::NotFound { path: t.path.to_path_buf(), detail: "no tokenizer.json there".into() });
    }
    Ok(files)
}

/// `out` may be replaced when it does not exist, is empty, or holds only what an earlier
/// `export --hf` wrote (listed by its marker): anything else would be deleted by the swap.
fn claim(out: &Path) -> Result<()> {
    let kind = crate::output_dir::Kind { flag: "--hf", what: "only an earlier `export --hf` output (the files its betadpo_export.json lists)", replaced: true };
    crate::output_dir::claim(out, &kind, written_by_export)
}

fn written_by_export(dir: &Path) -> bool {
    let marker: Option<serde_json::Value> =
        crate::fs_guard::read_to_string_inside(dir, &dir.join(MARKER_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let Some(m) = marker.filter(|m| m["format"] == MARKER_FORMAT) else { return false };
    let listed: Vec<&str> = m["files"].as_array().map(|a| a.iter().filter_map(|f| f.as_str()).collect()).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.filter_map(|e| e.ok()).all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name == MARKER_FILE || crate::dir_lock::is_lock_file(&name) || (listed.contains(&name.as_str()) && e.file_type().map(|t| t.is_file()).unwrap_or(false))
    })
}
