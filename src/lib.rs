//! betadpo: DPO with a learned, context-dependent beta, trained on ONNX Runtime.
//!
//! Layers, bottom to top:
//! - [`onnx`]: protobuf types (generated from `onnx.proto3`), loading and saving with external data.
//! - [`graph`]: a light editable view of an ONNX graph: names, dtypes, node builders.
//! - [`autodiff`]: activity analysis and the reverse-mode pass, one gradient rule per op.
//! - [`dpo`]: the beta head, DPO losses, the optimizer graph, artifacts and their manifest.
//! - [`train`]: data, tokenization, the training loop, checkpoints, metrics.
//! - [`runtime`]: provisioning ONNX Runtime and building sessions.
//! - [`distributed`]: the collectives of data-parallel training (MPI under the `mpi` feature).

pub mod autodiff;
pub mod distributed;
pub mod dpo;
pub mod error;
pub mod graph;
pub mod infer;
pub mod onnx;
pub mod output_dir;
pub mod runtime;
pub mod store;
pub mod temp_files;
pub mod train;

pub use error::{Error, Result};
