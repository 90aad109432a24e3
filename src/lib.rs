//! betadpo: DPO with a learned, context-dependent beta, trained on ONNX Runtime.
//!
//! Layers, bottom to top (`LAYERS`; a module uses only its own layer and those below, which
//! `tests/layers.rs` checks, along with the absence of import cycles between files):
//! - [`error`], [`temp_files`], [`paths`], [`limits`], [`fs_guard`], [`dir_lock`]: the error type, atomic writes, a
//!   folder given where a file is expected, bounds on what input may make betadpo allocate (and the
//!   allocator that holds a chat template to its memory budget), opening files as regular files only,
//!   the lock of an output directory.
//! - [`onnx`], [`store`], [`output_dir`], [`run_layout`]: protobuf types and model files, safetensors,
//!   the output directories betadpo owns and the layout of a run's folder.
//! - [`text`]: text as models read it (right-padded token rows).
//! - [`runtime`]: provisioning ONNX Runtime and building sessions.
//! - [`graph`]: a light editable view of an ONNX graph: names, dtypes, node builders, shape probes.
//! - [`autodiff`]: activity analysis and the reverse-mode pass, one gradient rule per op.
//! - [`model_import`]: a Hugging Face folder's forward graph, written from config.json and safetensors.
//! - [`dpo`]: the beta head, DPO losses, the optimizer graph, artifacts (`build-graph`'s phases) and their manifest.
//! - [`distributed`]: the collectives of data-parallel training (MPI under the `mpi` feature).
//! - [`train`]: data, tokenization, the training loop, checkpoints, metrics.
//! - [`infer`]: running an exported model with its head.

/// The layers of the library, bottom to top; each entry lists the top-level modules of one layer.
#[doc(hidden)]
pub const LAYERS: &[&str] = &[
    "error temp_files paths limits fs_guard dir_lock",
    "onnx store output_dir run_layout",
    "text",
    "runtime",
    "graph",
    "autodiff",
    "model_import",
    "dpo",
    "distributed",
    "train",
    "infer",
];

pub mod autodiff;
pub mod dir_lock;
pub mod distributed;
pub mod dpo;
pub mod error;
pub mod fs_guard;
pub mod graph;
pub mod infer;
pub mod limits;
pub mod model_import;
pub mod onnx;
pub mod output_dir;
pub mod paths;
pub mod run_layout;
pub mod runtime;
pub mod store;
pub mod temp_files;
pub mod text;
pub mod train;

pub use error::{Error, Result};

/// The system allocator, counting what a thread under [`limits::with_memory_budget`] allocates.
#[global_allocator]
static ALLOCATOR: limits::memory_guard::CountingAlloc = limits::memory_guard::CountingAlloc;
