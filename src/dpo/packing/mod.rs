//! The packed layout: pairs written as `prompt · chosen · rejected` in shared rows, with no padding
//! between sequences and each prompt computed once. The padded layout (TRL's) computes `2B` rows
//! of the longest sequence's length; on short, uneven pairs most of that is padding and repeated
//! prompts. Both layouts give the same log-probs, betas and gradients. ([`layout`] names the two.)

mod batch;
mod graph;
pub mod inputs;
pub mod layout;
pub mod objective;
mod verify;

pub use batch::{lay_out, pack, plan_rows, widest_pair, HeadReads, PackedBatch, PairTokens, RowPlan};
pub use graph::{make_packable, ATTENTION_BIAS, POSITIONS, VERIFIED_SEQUENCE_TOKENS};
pub use verify::packed_matches_model;

pub use layout::{Layout, LayoutChoice};

use crate::dpo::manifest::TensorSpec;
use crate::runtime::HostTensor;

impl PackedBatch {
    /// The value for a graph input of `role` (`input_ids`, `attention_mask` and `position_ids`
    /// included), or `None` for a role this layout does not fill.
    pub fn by_role(&self, role: &str) -> Option<HostTensor> {
        let i64s = |a: &ndarray::Array2<i64>| HostTensor::I64(a.clone().into_dyn());
        let v = match role {
            "input_ids" => i64s(&self.input_ids),
            "attention_mask" => i64s(&self.attention_mask),
            "position_ids" | "positions" => i64s(&self.positions),
            "attention_bias" => HostTensor::F32(self.attention_bias.clone().into_dyn()),
            "answer_index" => i64s(&self.answer_index),
            "answer_labels" => HostTensor::I64(self.answer_labels.clone().into_dyn()),
            "answer_sequence" => HostTensor::I64(self.answer_sequence.clone().into_dyn()),
            "head_index" => i64s(&self.head_index),
            "head_sequence" => HostTensor::I64(self.head_sequence.clone().into_dyn()),
            "head_weight" => HostTensor::F32(self.head_weight.clone().into_dyn()),
            _ => return None,
        };
        Some(v)
    }

    /// `(name, value)` for each input in `specs` this batch fills, with `ref_logps` for the
    /// reference log-probs; the parameters and any other role are left to the caller.
    pub fn feeds<'a>(&self, specs: impl IntoIterator<Item = &'a TensorSpec>, ref_logps: &HostTensor) -> Vec<(String, HostTensor)> {
        specs
            .into_iter()
            .filter_map(|s| {
                let t = if s.role == "ref_logps" { Some(ref_logps.clone()) } else { self.by_role(&s.role) };
                Some((s.name.clone(), t?))
            })
            .collect()
    }
}
