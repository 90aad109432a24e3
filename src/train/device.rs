//! Where training state lives. Parameters, gradients and optimizer moments are runtime-owned
//! values on the execution provider's device; the host sees them only at checkpoints.

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::value::Tensor;

use crate::runtime::ExecutionProvider;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct Device {
    gpu: Option<i32>,
}

impl Device {
    pub fn for_ep(ep: &ExecutionProvider) -> Self {
        match ep {
            ExecutionProvider::Cpu => Device { gpu: None },
            ExecutionProvider::Cuda { device } | ExecutionProvider::TensorRt { device } => Device { gpu: Some(*device) },
        }
    }

    /// Memory where outputs that stay on the device are bound.
    pub fn memory(&self) -> Result<MemoryInfo<'static>> {
        let info = match self.gpu {
            None => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
            Some(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default),
        };
        info.map_err(Error::from)
    }

    /// Host memory, for the small outputs the loop reads every step (loss, metrics).
    pub fn host_memory() -> Result<MemoryInfo<'static>> {
        MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(Error::from)
    }

    /// Moves a host tensor to the device (no copy on CPU).
    pub fn upload(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor<f32>> {
        let host = Tensor::from_array((shape.to_vec(), data))?;
        match self.gpu {
            None => Ok(host),
            Some(id) => Ok(host.to(AllocationDevice::CUDA, id)?),
        }
    }

    /// Reads a float tensor back to the host.
    pub fn download(&self, v: &Tensor<f32>) -> Result<(Vec<usize>, Vec<f32>)> {
        let host;
        let v = match self.gpu {
            None => v,
            Some(_) => {
                host = v.to(AllocationDevice::CPU, 0)?;
                &host
            }
        };
        let (shape, data) = v.try_extract_tensor::<f32>()?;
        Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
    }
}
