//! Reading a fixture's `golden.safetensors` (PyTorch's values, see tests/fixtures/models/README.md).

#![allow(dead_code)]

use std::path::Path;

pub type Golden = super::fixtures::Tensors;

pub fn load_golden(dir: &Path) -> Golden {
    super::fixtures::read_tensors(&dir.join("golden.safetensors"))
}
