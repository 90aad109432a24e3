//! Where training state lives. Parameters, gradients and optimizer moments are runtime-owned
//! values on the execution provider's device; the host sees them only at checkpoints.

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use std::borrow::Cow;
use std::collections::HashMap;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

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

    pub fn is_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// Runs a session and returns its outputs by name. On a GPU the outputs named by `on_device`
    /// are bound to device memory through an IoBinding (parameters, gradients and moments never
    /// travel through the host) and the rest to host memory; on the CPU a plain run already
    /// leaves every output in place.
    pub fn run(
        &self,
        session: &mut Session,
        inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)>,
        on_device: &dyn Fn(&str) -> bool,
    ) -> Result<HashMap<String, DynValue>> {
        if !self.is_gpu() {
            let outputs = session.run(inputs)?;
            return Ok(outputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        }
        let names: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
        let (device, host) = (self.memory()?, Self::host_memory()?);
        let mut binding = session.create_binding()?;
        for (name, value) in &inputs {
            binding.bind_input(name.as_ref(), &**value)?;
        }
        for n in &names {
            binding.bind_output_to_device(n.as_str(), if on_device(n) { &device } else { &host })?;
        }
        let outputs = session.run_binding(&binding)?;
        // ONNX Runtime synchronizes its streams at the end of a run by default; this makes the
        // outputs' readiness explicit for what reads them outside the runtime (NCCL's own stream).
        binding.synchronize_outputs()?;
        Ok(outputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
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
