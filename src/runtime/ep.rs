//! Execution providers a session can run on, parsed from the command line.
//!
//! Asking for a GPU provider and silently getting the CPU is the worst outcome for a training run (it is just
//! very slow), so GPU providers are checked for availability and registered with `error_on_failure`: every
//! failure becomes a "... execution provider requested but not available: ..." error.

use std::fmt;
use std::str::FromStr;

use ort::ep::{ExecutionProvider as _, ExecutionProviderDispatch, TensorRT, CUDA};

use super::gpu_libs::GpuStack;
use super::provision::Flavor;
use super::tensorrt::TensorRtOptions;
use crate::{Error, Result};

/// Where a session's nodes run. Parse with `"cpu" | "cuda" | "cuda:<device>" | "tensorrt" | "tensorrt:<device>"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExecutionProvider {
    /// ONNX Runtime's default CPU provider.
    #[default]
    Cpu,
    /// NVIDIA CUDA on the given device ordinal.
    Cuda { device: i32 },
    /// NVIDIA TensorRT on the given device, with CUDA behind it for the nodes TensorRT does not take.
    TensorRt { device: i32 },
}

/// What `FromStr` accepts, for error messages and `--help` texts.
pub const EP_CHOICES: &str = "cpu, cuda, cuda:<device>, tensorrt, tensorrt:<device>";

impl ExecutionProvider {
    /// Human name used in messages ("CUDA", "TensorRT", "CPU").
    pub fn display_name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "CPU",
            ExecutionProvider::Cuda { .. } => "CUDA",
            ExecutionProvider::TensorRt { .. } => "TensorRT",
        }
    }

    /// The ONNX Runtime build this provider needs.
    pub fn flavor(&self) -> Flavor {
        match self {
            ExecutionProvider::Cpu => Flavor::Cpu,
            _ => Flavor::Gpu,
        }
    }

    /// The NVIDIA libraries this provider needs besides the GPU build of ONNX Runtime.
    pub fn gpu_stack(&self) -> Option<GpuStack> {
        match self {
            ExecutionProvider::Cpu => None,
            ExecutionProvider::Cuda { .. } => Some(GpuStack::Cuda),
            ExecutionProvider::TensorRt { .. } => Some(GpuStack::TensorRt),
        }
    }

    /// The error every GPU-provider failure is reported with.
    pub(crate) fn unavailable(&self, why: impl fmt::Display) -> Error {
        Error::Runtime(format!("{} execution provider requested but not available: {why}", self.display_name()))
    }

    /// Checks that the loaded ONNX Runtime was built with this provider. `library` names it in the message.
    pub(crate) fn check_available(&self, library: &str) -> Result<()> {
        let (available, name) = match self {
            ExecutionProvider::Cpu => return Ok(()),
            ExecutionProvider::Cuda { .. } => (CUDA::is_available(), CUDA::NAME),
            ExecutionProvider::TensorRt { .. } => (TensorRT::is_available(), TensorRT::NAME),
        };
        match available {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.unavailable(format_args!(
                "the loaded ONNX Runtime ({library}) has no {name}. GPU providers need the onnxruntime-gpu build, \
                 which a process loads only when its first runtime::init names a GPU provider; \
                 or set ORT_DYLIB_PATH to a GPU build of libonnxruntime.so"
            ))),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// The providers to register on a session builder, each failing loudly. Empty for the CPU, which ONNX
    /// Runtime always appends itself.
    pub(crate) fn dispatches(&self, tensorrt: &TensorRtOptions) -> Result<Vec<ExecutionProviderDispatch>> {
        Ok(match *self {
            ExecutionProvider::Cpu => Vec::new(),
            ExecutionProvider::Cuda { device } => {
                vec![CUDA::default().with_device_id(device).build().error_on_failure()]
            }
            ExecutionProvider::TensorRt { device } => {
                let trt = tensorrt.apply(TensorRT::default().with_device_id(device))?;
                vec![trt.build().error_on_failure(), CUDA::default().with_device_id(device).build().error_on_failure()]
            }
        })
    }
}

impl fmt::Display for ExecutionProvider {
    /// Writes the form `FromStr` reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecutionProvider::Cpu => f.write_str("cpu"),
            ExecutionProvider::Cuda { device } => write!(f, "cuda:{device}"),
            ExecutionProvider::TensorRt { device } => write!(f, "tensorrt:{device}"),
        }
    }
}

impl FromStr for ExecutionProvider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |detail: String| Error::BadFlag { flag: "execution provider".into(), detail };
        let lower = s.trim().to_ascii_lowercase();
        let (name, device) = match lower.split_once(':') {
            Some((name, dev)) => {
                let device = dev
                    .parse::<i32>()
                    .ok()
                    .filter(|d| *d >= 0)
                    .ok_or_else(|| bad(format!("'{s}': device must be a non-negative integer (choices: {EP_CHOICES})")))?;
                (name, Some(device))
            }
            None => (lower.as_str(), None),
        };
        match (name, device) {
            ("cpu", None) => Ok(ExecutionProvider::Cpu),
            ("cpu", Some(_)) => Err(bad(format!("'{s}': the CPU provider takes no device (choices: {EP_CHOICES})"))),
            ("cuda", d) => Ok(ExecutionProvider::Cuda { device: d.unwrap_or(0) }),
            ("tensorrt" | "trt", d) => Ok(ExecutionProvider::TensorRt { device: d.unwrap_or(0) }),
            _ => Err(bad(format!("unknown execution provider '{s}'; choose one of {EP_CHOICES}"))),
        }
    }
}
