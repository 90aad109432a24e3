//! Reading a fixture's `golden.safetensors` (PyTorch's values, see tests/fixtures/models/README.md).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

pub struct Golden {
    pub f32s: HashMap<String, ArrayD<f32>>,
    pub i64s: HashMap<String, ArrayD<i64>>,
}

pub fn load_golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut g = Golden { f32s: HashMap::new(), i64s: HashMap::new() };
    for (name, v) in st.tensors() {
        let shape = IxDyn(v.shape());
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let d: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                g.f32s.insert(name, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            safetensors::Dtype::I64 => {
                let d: Vec<i64> = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                g.i64s.insert(name, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            other => panic!("unexpected dtype {other:?}"),
        }
    }
    g
}
