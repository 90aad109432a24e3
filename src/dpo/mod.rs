//! DPO with a learned beta: the objective appended to a causal LM, the trainable set, the
//! optimizer graph, and the artifacts (graphs, initial parameters, manifest) `train` drives.

pub mod answer_logps;
pub mod config;
pub mod model;
pub mod objective;
pub mod params;

pub use config::{BetaAggregate, BetaDpoConfig, BetaSource, EpsilonDpoConfig, HeadInput, LossKind, ObjectiveConfig};
pub mod artifacts;
pub mod beta_dpo;
pub mod chunked_logps;
pub mod epsilon_dpo;
pub mod export;
pub mod hf_export;
pub mod kv_cache;
pub mod layout;
pub mod lora;
pub mod lora_export;
pub mod manifest;
pub mod optimizer;
pub mod packing;
pub mod reference_copy;
pub mod validate;

pub use artifacts::{build_artifacts, BuildOptions, BuildReport};
pub use layout::Layout;
pub use manifest::Manifest;
