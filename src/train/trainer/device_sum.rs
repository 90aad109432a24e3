//! The gradient sum of `--allreduce nccl`: each micro-batch's gradients are weighted and summed where
//! they are (on the GPU, by a small ONNX graph in the same runtime), and one grouped NCCL allreduce
//! sums them over the ranks in place. Nothing travels through host memory.

use std::time::Instant;

use ort::value::Tensor;

use super::gradient_reduce::GradientReduce;
use crate::distributed::nccl::Nccl;
use crate::distributed::Collective;
use crate::runtime::SessionConfig;
use crate::train::device::Device;
use crate::train::optimizer_step::Accumulator;
use crate::{Error, Result};

pub struct DeviceGradientSum {
    nccl: Nccl,
    weighted: Accumulator,
    shapes: Vec<Vec<usize>>,
    device: Device,
    /// This step's weighted sum so far (`None` before the first micro-batch this rank ran).
    sum: Option<Vec<Tensor<f32>>>,
}

impl DeviceGradientSum {
    pub fn new(shapes: &[Vec<i64>], cfg: &SessionConfig, device: Device, nccl: Nccl) -> Result<Self> {
        Ok(DeviceGradientSum {
            weighted: Accumulator::new(shapes, cfg, device)?,
            shapes: shapes.iter().map(|s| s.iter().map(|&d| d as usize).collect()).collect(),
            sum: None,
            device,
            nccl,
        })
    }
}

impl GradientReduce for DeviceGradientSum {
    fn clear(&mut self) {
        self.sum = None;
    }

    fn add(&mut self, grads: Vec<Tensor<f32>>, weight: f32, _device: &Device) -> Result<()> {
        let previous = self.sum.take();
        self.sum = Some(self.weighted.add_weighted(previous.as_deref(), &grads, weight)?);
        Ok(())
    }

    fn allreduce(&mut self, _coll: &dyn Collective) -> Result<f64> {
        let started = Instant::now();
        if self.sum.is_none() {
            // this rank ran no pair this step (fewer pairs than ranks): it adds zeros
            self.sum = Some(self.shapes.iter().map(|s| self.device.upload(s, vec![0.0; s.iter().product()])).collect::<Result<_>>()?);
        }
        let sum = self.sum.as_mut().expect("set above");
        let buffers: Vec<(*mut f32, usize)> = sum.iter_mut().zip(&self.shapes).map(|(t, s)| (t.data_ptr_mut() as *mut f32, s.iter().product())).collect();
        // SAFETY: each pointer is the data of a live tensor of `len` float32s in this rank's device
        // memory, owned by `self.sum` and untouched until the call returns; every rank passes the
        // parameters' gradients in the same order and shapes.
        unsafe { self.nccl.sum_f32_in_place(&buffers)? };
        Ok(started.elapsed().as_secs_f64())
    }

    fn take(&mut self, _device: &Device) -> Result<Vec<Tensor<f32>>> {
        self.sum.take().ok_or_else(|| Error::Internal("the summed gradients were taken before the allreduce".into()))
    }
}
