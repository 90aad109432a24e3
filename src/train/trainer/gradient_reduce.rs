//! What sums a step's gradients over the ranks: MPI through host memory
//! ([`super::ranks::HostGradientSum`]) or NCCL on the GPU ([`super::device_sum::DeviceGradientSum`]).

use ort::value::Tensor;

use crate::distributed::Collective;
use crate::train::device::Device;
use crate::Result;

/// A step's weighted gradient sum over micro-batches and ranks.
pub trait GradientReduce {
    /// Starts a step: nothing summed.
    fn clear(&mut self);
    /// Adds `weight` times a micro-batch's gradients (in the parameters' order).
    fn add(&mut self, grads: Vec<Tensor<f32>>, weight: f32, device: &Device) -> Result<()>;
    /// Sums over all ranks (one collective call) and returns the seconds it took.
    fn allreduce(&mut self, coll: &dyn Collective) -> Result<f64>;
    /// The summed gradients, as the optimizer reads them.
    fn take(&mut self, device: &Device) -> Result<Vec<Tensor<f32>>>;
}
