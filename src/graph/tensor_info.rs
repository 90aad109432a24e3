//! What the shape probes saw of each tensor: its element type and its shape in each of the two runs.

use std::collections::HashMap;

use crate::onnx::{dtype, DType};

/// What the probes saw of one tensor: its element type and its shape in each probe.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub dims: [Vec<i64>; 2],
}

impl TensorInfo {
    pub fn fixed(dtype: DType, dims: &[i64]) -> Self {
        TensorInfo { dtype, dims: [dims.to_vec(), dims.to_vec()] }
    }
    pub fn rank(&self) -> usize {
        self.dims[0].len()
    }
    /// Per axis: `Some(n)` when the probes agree, `None` when the dimension depends on the batch.
    pub fn static_dims(&self) -> Vec<Option<i64>> {
        self.dims[0].iter().zip(&self.dims[1]).map(|(a, b)| (a == b).then_some(*a)).collect()
    }
    pub fn is_float(&self) -> bool {
        dtype::is_float(self.dtype)
    }
}

pub type TensorInfos = HashMap<String, TensorInfo>;
