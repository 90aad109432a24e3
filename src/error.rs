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
    #[error("{}", one_line(.0))]
    Other(String),
}

/// Messages from other libraries (ONNX Runtime's end in a newline and may span several) shown on
/// one line, as every error of this crate is.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    let s = s.trim();
    if s.contains(['\n', '\r']) {
        s.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ").into()
    } else {
        s.into()
    }
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
