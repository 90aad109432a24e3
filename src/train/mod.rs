//! Training: batches, reference log-probs, the loop, checkpoints, metrics.
//!
//! Data flows: [`crate::text`] reads TRL-format preference rows and turns them into token ids as
//! TRL does, [`batch`] collates pairs into model inputs and orders them per epoch; [`trainer`] runs
//! the graphs on ONNX Runtime.

pub mod batch;
pub mod batch_beta;
pub mod checkpoint;
pub mod denormals;
pub mod device;
pub mod epsilon_beta;
pub mod loss_scale;
pub mod metrics;
pub mod model_limits;
pub mod reference;
pub mod schedule;
pub mod session_io;

pub use batch::{collate, Batch, CollateOptions, DataLoader, LoaderConfig, LoaderPosition};
pub mod config;
pub mod fused_adamw;
pub mod optimizer_step;
pub mod report;
pub mod summary;
pub mod tensorboard;
pub mod trainer;
pub mod trl_config;
