//! The library's error type. Every variant carries enough context to be printed as one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid ONNX model ({})", one_line(detail))]
    BadModel { path: PathBuf, detail: String },
    #[error("{}", one_line(.0))]
    Graph(String),
    #[error("building node {node} ({op}): {}", one_line(detail))]
    Node { node: String, op: String, detail: String },
    #[error("no gradient rule for {count} op(s) on the differentiable path: {list}")]
    UnsupportedOps { count: usize, list: String },
    /// The packed layout cannot reproduce this model's attention (see `dpo::packing`).
    #[error("cannot pack this model: {}; build it with --layout padded", one_line(.0))]
    NotPackable(String),
    #[error("invalid value for {flag}: {detail}")]
    BadFlag { flag: String, detail: String },
    #[error("ONNX Runtime: {}", one_line(.0))]
    Runtime(String),
    #[error("{}", one_line(.0))]
    Data(String),
    /// An output path betadpo will not write into, replace or clear (see `output_dir`).
    #[error("{path}: {}", one_line(detail))]
    Refused { path: PathBuf, detail: String },
    /// Parameters or optimizer moments that became NaN or infinite: nothing is written from them.
    #[error("{}", one_line(.0))]
    NonFiniteState(String),
    /// A file betadpo will not read: not a regular file, a kernel file, or a link out of its
    /// directory (see `fs_guard`).
    #[error("{path}: {}", one_line(detail))]
    NotRegularFile { path: PathBuf, detail: String },
    /// A directory another running betadpo process holds (see `dir_lock`).
    #[error("{path}: in use by {}; wait for it to finish, or write elsewhere", one_line(holder))]
    Locked { path: PathBuf, holder: String },
    /// Data-parallel training: a launch this build cannot serve, or ranks that disagree.
    #[error("distributed training: {}", one_line(.0))]
    Distributed(String),
    /// A Hugging Face model folder (`build-graph --model DIR`) that cannot be read: a missing or malformed
    /// `config.json` or safetensors file, a missing weight.
    #[error("{path}: {}", one_line(detail))]
    BadHfFolder { path: PathBuf, detail: String },
    /// A Hugging Face model whose architecture betadpo does not write itself.
    #[error("{path}: architecture {architecture} is not one betadpo builds from a Hugging Face folder (supported: {supported}); export it to ONNX with scripts/tools/export_hf.py --model DIR and pass the model.onnx")]
    UnsupportedArchitecture { path: PathBuf, architecture: String, supported: String },
    /// LoRA parameters beyond what one ONNX Runtime adapter file (one FlatBuffers buffer) can hold.
    #[error("the adapter holds about {bytes} bytes; an ONNX Runtime adapter file holds at most {max}")]
    AdapterTooLarge { bytes: usize, max: usize },
    /// A path that cannot name what it must: no file name, or a NUL byte.
    #[error("{path}: {}", one_line(detail))]
    BadPath { path: PathBuf, detail: String },
    /// A safetensors file that cannot be read or written as asked: malformed, a tensor of another dtype,
    /// bytes that do not fit the shape.
    #[error("{path}: {}", one_line(detail))]
    BadSafetensors { path: PathBuf, detail: String },
    /// A model or adapter given to `infer` that is not what `betadpo export` writes.
    #[error("{path}: {}", one_line(detail))]
    NotAnExport { path: PathBuf, detail: String },
    /// Host values whose count does not fit the shape they are given.
    #[error("values do not fit shape {shape:?}: {}", one_line(detail))]
    ShapeMismatch { shape: Vec<usize>, detail: String },
    /// pip ran, but did not fetch a distribution it was asked for.
    #[error("pip did not download {package}")]
    NotDownloaded { package: String },
    /// A wheel, or an installed Python package, that cannot be read or is not the build betadpo wants.
    #[error("{path}: {}", one_line(detail))]
    BadPackage { path: PathBuf, detail: String },
    /// A wheel, or an installed Python package, without libraries betadpo needs from it.
    #[error("{path} lacks {missing}")]
    PackageLacks { path: PathBuf, missing: String },
    /// A downloaded NVIDIA wheel without a library it must carry.
    #[error("the {package} {version} wheel has no {file}")]
    WheelLacks { package: String, version: String, file: String },
    /// Getting ONNX Runtime or the NVIDIA libraries: pip absent or failing, an installed Python package that
    /// is missing or of another release.
    #[error("{}", one_line(.0))]
    Provision(String),
    /// A JSON record betadpo wrote that cannot be used: the artifacts' manifest, the Hugging Face name map, a
    /// checkpoint's trainer state, a run's record (malformed, of another format version, or inconsistent).
    #[error("{path}: {}", one_line(detail))]
    BadManifest { path: PathBuf, detail: String },
    /// Trained parameters or optimizer state that do not fit the artifacts: missing, or of another shape.
    #[error("{}", one_line(.0))]
    ParameterMismatch(String),
    /// Artifacts whose parts do not fit together: a graph, an input or an output the manifest or the trainer
    /// needs is absent or of a role it does not know.
    #[error("{}", one_line(.0))]
    Artifacts(String),
    /// A numerical check that failed: `validate`'s, or the packed layout's at build time.
    #[error("{}", one_line(.0))]
    Validation(String),
    /// An input path that is not there: a run folder, a tokenizer, a run's parameters.
    #[error("{path}: {}", one_line(detail))]
    NotFound { path: PathBuf, detail: String },
    /// A checkpoint a run cannot resume from: moved, altered, or from another run.
    #[error("{path}: {}", one_line(detail))]
    BadCheckpoint { path: PathBuf, detail: String },
    /// `train` into a run folder that holds checkpoints, without `--resume`.
    #[error("{path} already holds checkpoints; pass --resume to continue it, or choose a new --out")]
    RunHasCheckpoints { path: PathBuf },
    /// `train --resume` with other artifacts, data or optimizer flags than the run was started with.
    #[error(
        "{path} was trained with other artifacts, data or optimizer flags; resume needs the same ones (or choose a new --out; \
         runs started before subnormals were flushed by default resume with --keep-denormals)"
    )]
    ResumeMismatch { path: PathBuf },
    /// Trained artifacts that cannot be written in the asked form (Hugging Face, PEFT, merged or adapter LoRA).
    #[error("{}", one_line(.0))]
    NotExportable(String),
    /// A TensorBoard event file that does not read back: truncated, or a failed CRC.
    #[error("{path}: {}", one_line(detail))]
    BadEventFile { path: PathBuf, detail: String },
    /// Drawing or writing the training report (`report.svg`).
    #[error("{}", one_line(.0))]
    Report(String),
    /// A broken invariant of betadpo itself (a bug, not bad input).
    #[error("{}", one_line(.0))]
    Internal(String),
}

/// Messages from other libraries (ONNX Runtime's end in a newline and may span several) shown on
/// one line, as every error of this crate is.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    let s = s.trim();
    if s.contains('\x1b') {
        return one_line(&without_ansi(s)).into_owned().into();
    }
    if s.contains(['\n', '\r']) {
        s.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ").into()
    } else {
        s.into()
    }
}

/// `s` without ANSI escape sequences (ONNX Runtime colours its messages).
fn without_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters, ended by a letter; other escapes: ESC and one character
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn graph(msg: impl Into<String>) -> Self {
        Error::Graph(msg.into())
    }
    pub fn node(node: &str, op: &str, detail: impl Into<String>) -> Self {
        Error::Node { node: node.to_string(), op: op.to_string(), detail: detail.into() }
    }
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Runtime(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_messages_come_out_on_one_line_without_colour() {
        let e =
            Error::Runtime("\x1b[1;31mNon-zero status code returned while running Gather node. Name:'/wpe/Gather'\x1b[m\n Status Message: idx=130\n".into());
        assert_eq!(e.to_string(), "ONNX Runtime: Non-zero status code returned while running Gather node. Name:'/wpe/Gather' Status Message: idx=130");
    }
}
