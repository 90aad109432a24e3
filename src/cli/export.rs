//! `betadpo export`: its flags, and the ONNX, Hugging Face or PEFT folder they write.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use betadpo::dpo::export::hf::{export_hf, HfReport, TokenizerSource};
use betadpo::dpo::export::{export_model, locate_run, AdapterForm};
use betadpo::dpo::Manifest;

#[derive(clap::Args)]
pub struct Args {
    /// Run directory written by train (its final parameters, or the newest checkpoint).
    #[arg(long, conflicts_with = "artifacts")]
    run: Option<PathBuf>,
    /// Artifacts directory instead of a run: export its initial, untrained parameters.
    #[arg(long)]
    artifacts: Option<PathBuf>,
    /// Output ONNX model file (its weights go to <file>.data beside it when large).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output Hugging Face checkpoint directory (model.safetensors, config.json, tokenizer files,
    /// beta_head.safetensors + beta_head.json); needs the hf_export.json that scripts/tools/export_hf.py writes.
    #[arg(long)]
    hf: Option<PathBuf>,
    /// Tokenizer to copy into --hf: tokenizer.json or its directory (default: the run's tokenizer,
    /// else the one beside the original model).
    #[arg(long, requires = "hf")]
    tokenizer: Option<PathBuf>,
    /// LoRA artifacts: the base model the PEFT adapter in --hf names (`base_model_name_or_path`):
    /// a Hub id or a local folder (default: the model scripts/tools/export_hf.py exported, if it loaded one).
    #[arg(long, requires = "hf")]
    base_model: Option<String>,
    /// LoRA artifacts: fold the trained adapters into the base weights of --out (one plain model).
    #[arg(long, requires = "out", conflicts_with = "adapter")]
    merge: bool,
    /// LoRA artifacts: write the trained adapters to this ONNX Runtime adapter file
    /// (`.onnx_adapter`) and leave them inputs of --out, whose defaults give the base model.
    #[arg(long, requires = "out")]
    adapter: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.is_none() && a.hf.is_none() {
        anyhow::bail!("export needs --out FILE (one ONNX model), --hf DIR (a Hugging Face checkpoint), or both");
    }
    let (artifacts, params, source, run_tokenizer) = match (&a.run, &a.artifacts) {
        (Some(run), _) => {
            let found = locate_run(run)?;
            let tok = TokenizerSource { path: found.tokenizer, config: found.tokenizer_config };
            (found.artifacts, found.params, run.clone(), Some(tok))
        }
        (None, Some(art)) => (art.clone(), art.join(betadpo::run_layout::PARAMS), art.clone(), None),
        (None, None) => anyhow::bail!("export needs --run RUN (trained parameters) or --artifacts ART (untrained ones)"),
    };
    if let Some(out) = &a.out {
        let form = match (&a.adapter, a.merge) {
            (Some(file), _) => AdapterForm::OrtAdapter(file.clone()),
            (None, true) => AdapterForm::Merged,
            (None, false) => AdapterForm::Baked,
        };
        export_model(&artifacts, &params, out, &form).with_context(|| format!("exporting {}", source.display()))?;
        println!("wrote {} (inputs input_ids, attention_mask; outputs logits, beta) from {}", out.display(), params.display());
        match &form {
            AdapterForm::Merged => println!("the LoRA adapters are folded into its weights"),
            AdapterForm::OrtAdapter(file) => println!(
                "wrote {}: make it active per run (RunOptions.add_active_adapter; `betadpo infer --adapter`); without it the model is the base",
                file.display()
            ),
            AdapterForm::Baked => {}
        }
    }
    if let Some(dir) = &a.hf {
        let tokenizer = match a.tokenizer {
            Some(path) => Some(TokenizerSource { path, config: None }),
            None => default_tokenizer(run_tokenizer, &artifacts),
        };
        let report = export_hf(&artifacts, &params, dir, tokenizer.as_ref(), a.base_model.as_deref())
            .with_context(|| format!("exporting {} to Hugging Face", source.display()))?;
        println!("wrote {} ({} checkpoint tensors; {}) from {}", dir.display(), report.tensors, report.files.join(", "), params.display());
        if !report.tied.is_empty() {
            println!("tied weights written once: {}", report.tied.join(", "));
        }
        match &tokenizer {
            Some(t) => println!("tokenizer files from {}", t.path.display()),
            None => println!("note: no tokenizer found to copy; pass --tokenizer tokenizer.json"),
        }
        print_loader(dir, &report, tokenizer.is_some());
    }
    Ok(())
}

/// How to load what `--hf` wrote, as Python that runs (scripts/experiments/check_peft_snippet.py executes it):
/// the lines after "load it in Python:", indented by four spaces.
fn print_loader(dir: &Path, report: &HfReport, has_tokenizer: bool) {
    let dir = py_str(&dir.display().to_string());
    let mut code = Vec::new();
    if report.peft {
        let Some(base) = &report.base_model else {
            println!(
                "note: adapter_config.json names no base model (this model was not exported from a pretrained one); pass --base-model \
                 with the Hub id or folder of the model the artifacts were built from, so that PEFT can load the adapter"
            );
            return;
        };
        println!("the PEFT adapter is for {base}; the beta head: see beta_head.json");
        code.push("from peft import AutoPeftModelForCausalLM".to_string());
        code.push(format!("model = AutoPeftModelForCausalLM.from_pretrained({dir})"));
    } else {
        println!("the beta head: see beta_head.json");
        code.push("from transformers import AutoModelForCausalLM".to_string());
        code.push(format!("model = AutoModelForCausalLM.from_pretrained({dir})"));
    }
    if has_tokenizer {
        code.insert(0, "from transformers import AutoTokenizer".to_string());
        code.push(format!("tokenizer = AutoTokenizer.from_pretrained({dir})"));
    }
    println!("load it in Python:");
    for line in code {
        println!("    {line}");
    }
}

/// A Python string literal (JSON's escapes are Python's).
fn py_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The tokenizer the run trained with, else one beside the model the artifacts were built from.
fn default_tokenizer(run: Option<TokenizerSource>, artifacts: &Path) -> Option<TokenizerSource> {
    if let Some(t) = run.filter(|t| t.path.exists()) {
        return Some(t);
    }
    let model = Manifest::load(artifacts).ok()?.model.source;
    let beside = Path::new(&model).with_file_name("tokenizer.json");
    beside.is_file().then_some(TokenizerSource { path: beside, config: None })
}
