//! Reading a fixture's `golden.safetensors` (PyTorch's values, see tests/fixtures/models/README.md).

#![allow(dead_code)]

use std::path::Path;

pub type Golden = super::fixtures::Tensors;

pub fn load_golden(dir: &Path) -> Golden {
    super::fixtures::read_tensors(&dir.join("golden.safetensors"))
}

/// The golden batch's tensor for a padded train-graph input of `role` (None for other roles).
pub fn batch_feed(golden: &Golden, role: &str) -> Option<betadpo::runtime::HostTensor> {
    use betadpo::runtime::HostTensor;
    Some(match role {
        "input_ids" | "attention_mask" | "position_ids" => HostTensor::I64(golden.i64s[role].clone()),
        "completion_mask" => HostTensor::F32(golden.f32s["loss_mask"].clone()),
        "ref_logps" => HostTensor::F32(golden.f32s["ref_logps"].clone()),
        _ => return None,
    })
}
