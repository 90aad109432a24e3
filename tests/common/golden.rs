//! Reading a fixture's `golden.safetensors` (PyTorch's values, see tests/fixtures/models/README.md).

#![allow(dead_code)]

use std::path::Path;

use betadpo::dpo::packing::{pack, HeadReads, PackedBatch, PairTokens};
use betadpo::dpo::ObjectiveConfig;
use betadpo::runtime::HostTensor;

pub type Golden = super::fixtures::Tensors;

pub fn load_golden(dir: &Path) -> Golden {
    super::fixtures::read_tensors(&dir.join("golden.safetensors"))
}

/// The golden batch in the packed layout: its pairs read back from the padded rows.
pub fn packed_golden(golden: &Golden, objective: &ObjectiveConfig) -> PackedBatch {
    let ids = &golden.i64s["input_ids"];
    let prompt_last = &golden.i64s["prompt_last_index"];
    let seq_last = &golden.i64s["sequence_last_index"];
    let b = prompt_last.len();
    let tokens = |row: usize, from: usize, to_incl: i64| -> Vec<u32> { (from..=to_incl as usize).map(|c| ids[[row, c]] as u32).collect() };
    let triples: Vec<[Vec<u32>; 3]> = (0..b)
        .map(|i| {
            let p = prompt_last[[i]] as usize + 1;
            [tokens(i, 0, p as i64 - 1), tokens(i, p, seq_last[[i]]), tokens(b + i, p, seq_last[[b + i]])]
        })
        .collect();
    let views: Vec<PairTokens> = triples.iter().map(PairTokens::of).collect();
    // rows of ~2 pairs, so the batch spans several rows with padding at the end of one
    let row_tokens = views.iter().map(|v| v.prompt.len() + v.chosen.len() + v.rejected.len()).max().unwrap() + 4;
    pack(&views, row_tokens, 0, HeadReads::of(objective))
}

/// The golden batch's value for a train graph input of `role` (padded, or `packed`); `None` for
/// the inputs that are not the batch's (reference log-probs, parameters, method state).
pub fn batch_input(golden: &Golden, packed: Option<&PackedBatch>, role: &str) -> Option<HostTensor> {
    if let Some(t) = packed.and_then(|p| p.by_role(role)) {
        return Some(t);
    }
    Some(match role {
        "input_ids" => HostTensor::I64(golden.i64s["input_ids"].clone()),
        "attention_mask" => HostTensor::I64(golden.i64s["attention_mask"].clone()),
        "position_ids" => HostTensor::I64(golden.i64s["position_ids"].clone()),
        "completion_mask" => HostTensor::F32(golden.f32s["loss_mask"].clone()),
        _ => return None,
    })
}

/// The golden batch's tensor for a padded train-graph input of `role`, reference log-probs included
/// (None for parameters and method state).
pub fn batch_feed(golden: &Golden, role: &str) -> Option<HostTensor> {
    match role {
        "ref_logps" => Some(HostTensor::F32(golden.f32s["ref_logps"].clone())),
        _ => batch_input(golden, None, role),
    }
}
