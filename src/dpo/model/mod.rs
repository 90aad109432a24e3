//! The causal LM as build-graph reads and changes it: its signature (token inputs, logits, final
//! hidden state; [`signature`]), its KV cache removed ([`kv_cache`]), which of its tensors train
//! ([`params`]), the frozen reference copy epsilon-DPO runs beside it ([`reference_copy`]), and LoRA
//! adapters on its products ([`lora`]).

pub mod kv_cache;
pub mod lora;
pub mod params;
pub mod reference_copy;
pub mod signature;

pub use signature::{position_table_rows, recognise, LmSignature, Projection};
