//! Which allreduce sums a job's gradients: NCCL on the GPUs' memory or MPI through host memory
//! (`--allreduce`), agreed by every rank.

use super::device_sum::DeviceGradientSum;
use super::gradient_reduce::GradientReduce;
use super::ranks::HostGradientSum;
use crate::distributed::nccl::{self, Libraries, Nccl};
use crate::distributed::Collective;
use crate::runtime::{ExecutionProvider, SessionConfig};
use crate::train::config::{AllreduceKind, TrainConfig};
use crate::train::device::Device;
use crate::{Error, Result};

/// What sums the gradients of a job of several ranks (nothing in one process); see
/// `TrainConfig::allreduce`. Collective: every rank calls this together, and all choose alike.
pub fn gradient_reducer(
    cfg: &TrainConfig,
    shapes: &[Vec<i64>],
    coll: &dyn Collective,
    device: Device,
    session: &SessionConfig,
) -> Result<Option<Box<dyn GradientReduce>>> {
    if coll.size() == 1 {
        return Ok(None);
    }
    // A library with NCCL's interface that works on host memory (the tests' stand-in) may stand in
    // for a GPU; a real NCCL handed host pointers would fail or worse.
    let host_memory_nccl = std::env::var_os("BETADPO_NCCL_HOST_MEMORY").is_some_and(|v| v == "1");
    let try_nccl = match (cfg.allreduce, device.is_gpu() || host_memory_nccl) {
        (AllreduceKind::Mpi, _) | (AllreduceKind::Auto, false) => false,
        (AllreduceKind::Auto | AllreduceKind::Nccl, true) => true,
        (AllreduceKind::Nccl, false) => {
            return Err(Error::BadFlag {
                flag: "--allreduce".into(),
                detail: "nccl sums GPU memory and needs --ep cuda or tensorrt (on the CPU the ranks sum through MPI: --allreduce auto or mpi)".into(),
            })
        }
    };
    if !try_nccl {
        return Ok(Some(Box::new(HostGradientSum::new(shapes))));
    }
    let gpu = match cfg.ep {
        ExecutionProvider::Cuda { device } | ExecutionProvider::TensorRt { device } => device,
        ExecutionProvider::Cpu => 0,
    };
    let provisioned = if device.is_gpu() && std::env::var_os("BETADPO_NCCL_LIB").is_none() { crate::runtime::provision_nccl() } else { Ok(()) };
    let loaded = provisioned.and_then(|_| Libraries::load());
    match (nccl::readiness(coll, &loaded, device.is_gpu().then_some(gpu))?, cfg.allreduce) {
        (None, _) => {
            let nccl = Nccl::init(loaded?, coll, gpu, std::time::Duration::from_secs_f64(cfg.nccl_timeout_s))?;
            if coll.is_root() {
                eprintln!("gradients are summed on device memory by {}", nccl.describe);
            }
            Ok(Some(Box::new(DeviceGradientSum::new(shapes, session, device, nccl)?)))
        }
        (Some(why), AllreduceKind::Auto) => {
            if coll.is_root() {
                eprintln!("notice: gradients are summed through MPI on host memory: {why}");
            }
            Ok(Some(Box::new(HostGradientSum::new(shapes))))
        }
        (Some(why), _) => Err(Error::Distributed(format!("--allreduce nccl: {why}"))),
    }
}
