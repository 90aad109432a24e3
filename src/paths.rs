//! Input paths that name a folder where a file is expected: take the file the folder is known to
//! hold (`tokenizer.json`), or refuse in one line that says what the flag takes and what the folder
//! holds, instead of the operating system's "Is a directory".

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// What a folder holds, for messages: its first names (folders with a trailing `/`), sorted.
pub fn listing(dir: &Path) -> String {
    const SHOWN: usize = 8;
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                if e.path().is_dir() {
                    format!("{name}/")
                } else {
                    name
                }
            })
            .collect(),
        Err(_) => return "nothing readable".into(),
    };
    if names.is_empty() {
        return "nothing".into();
    }
    names.sort();
    let more = names.len().saturating_sub(SHOWN);
    names.truncate(SHOWN);
    let mut out = names.join(", ");
    if more > 0 {
        out.push_str(&format!(" and {more} more"));
    }
    out
}

/// `path` itself when it is not a folder; in a folder, the file `name` inside it. A folder without
/// it is refused naming `flag`, the file it wants, and what the folder holds.
pub fn file_or_in_folder(path: &Path, name: &str, flag: &str) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let inside = path.join(name);
    if inside.is_file() {
        return Ok(inside);
    }
    Err(Error::BadFlag {
        flag: flag.into(),
        detail: format!("{} is a folder without {name}: {flag} takes {name} or the folder holding it; the folder holds {}", path.display(), listing(path)),
    })
}

/// Whether `dir` looks like a Hugging Face model folder: `config.json` beside safetensors or
/// PyTorch weights.
pub fn is_hf_model_folder(dir: &Path) -> bool {
    let has =
        |suffix: &str| std::fs::read_dir(dir).map(|es| es.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(suffix))).unwrap_or(false);
    dir.join("config.json").is_file() && (has(".safetensors") || has(".bin") || has(".safetensors.index.json"))
}

/// The error for a folder given where an ONNX model file is expected.
pub fn onnx_folder_error(dir: &Path) -> Error {
    let shown = dir.display();
    let detail = if dir.join("model.onnx").is_file() {
        format!("a folder, not an ONNX model file: pass the model in it, {}", dir.join("model.onnx").display())
    } else if is_hf_model_folder(dir) {
        format!(
            "a Hugging Face model folder (holding {}), not an ONNX model file: write its ONNX model with \
             `python scripts/tools/export_hf.py --model {shown} --out DIR` and pass DIR/model.onnx",
            listing(dir)
        )
    } else {
        format!("a folder, not an ONNX model file (model.onnx, with model.onnx.data beside it when large); it holds {}", listing(dir))
    };
    Error::Refused { path: dir.to_path_buf(), detail }
}
