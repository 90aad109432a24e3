//! DPO with a learned beta, split by concern as the subcommands use it: the causal LM as build-graph
//! reads and changes it ([`model`]: signature, KV-cache removal, the trainable set, the reference
//! copy, LoRA), the objective and beta methods appended to it ([`objective`]), the two batch layouts
//! ([`packing`]), the artifacts `build-graph` assembles and `train` drives ([`artifacts`], described
//! by [`manifest`]), their check ([`validate`]) and the deployable forms `export` writes ([`export`]).

pub mod artifacts;
pub mod export;
pub mod manifest;
pub mod model;
pub mod objective;
pub mod packing;
pub mod validate;

pub use artifacts::{build_artifacts, BuildOptions, BuildReport};
pub use manifest::Manifest;
pub use objective::config::{BetaAggregate, BetaDpoConfig, BetaSource, EpsilonDpoConfig, HeadInput, LossKind, ObjectiveConfig};
pub use packing::Layout;
