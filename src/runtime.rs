//! ONNX Runtime provisioning and sessions. (Minimal version; being extended.)

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::ArrayD;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{DynValue, Tensor, ValueType};

use crate::onnx::{dtype, DType};
use crate::{Error, Result};

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

fn locate() -> std::result::Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime,os;print(os.path.dirname(onnxruntime.__file__))"])
        .output()
        .map_err(|e| e.to_string())?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("capi");
    let lib = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().map(|f| f.to_string_lossy().starts_with("libonnxruntime.so.")).unwrap_or(false))
        .ok_or("no libonnxruntime in the onnxruntime package")?;
    Ok(lib)
}

pub fn environment() -> Result<&'static ort::environment::Environment> {
    ENV.get_or_init(|| {
        let path = locate().map_err(|e| format!("cannot find ONNX Runtime ({e}); set ORT_DYLIB_PATH"))?;
        ort::init_from(&path).map_err(|e| e.to_string())?.with_name("betadpo").build().map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Runtime(e.clone()))
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptLevel {
    Disable,
    Basic,
    Extended,
    #[default]
    All,
}

#[derive(Clone, Debug, Default)]
pub struct SessionConfig {
    pub intra_threads: Option<usize>,
    pub optimization: OptLevel,
}

impl SessionConfig {
    fn builder(&self) -> Result<ort::session::builder::SessionBuilder> {
        let env = environment()?;
        let mut b = Session::builder(env)?;
        b = b
            .with_optimization_level(match self.optimization {
                OptLevel::Disable => GraphOptimizationLevel::Disable,
                OptLevel::Basic => GraphOptimizationLevel::Level1,
                OptLevel::Extended => GraphOptimizationLevel::Level2,
                OptLevel::All => GraphOptimizationLevel::Level3,
            })
            .map_err(|e| Error::Runtime(e.to_string()))?;
        if let Some(t) = self.intra_threads {
            b = b.with_intra_threads(t).map_err(|e| Error::Runtime(e.to_string()))?;
        }
        Ok(b)
    }
    pub fn session_from_bytes(&self, bytes: &[u8]) -> Result<Session> {
        Ok(self.builder()?.commit_from_memory(bytes)?)
    }
    pub fn session_from_file(&self, path: &Path) -> Result<Session> {
        self.builder()?.commit_from_file(path).map_err(|e| Error::Runtime(format!("{}: {e}", path.display())))
    }
}

/// A tensor in host memory, for simple runs.
#[derive(Clone, Debug)]
pub enum HostTensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl HostTensor {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            HostTensor::F32(a) => a.shape().to_vec(),
            HostTensor::F64(a) => a.shape().to_vec(),
            HostTensor::I64(a) => a.shape().to_vec(),
            HostTensor::Bool(a) => a.shape().to_vec(),
        }
    }
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            HostTensor::F32(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            HostTensor::I64(a) => Some(a),
            _ => None,
        }
    }
    fn to_value(&self) -> Result<DynValue> {
        Ok(match self {
            HostTensor::F32(a) => Tensor::from_array(a.clone())?.into_dyn(),
            HostTensor::F64(a) => Tensor::from_array(a.clone())?.into_dyn(),
            HostTensor::I64(a) => Tensor::from_array(a.clone())?.into_dyn(),
            HostTensor::Bool(a) => Tensor::from_array(a.clone())?.into_dyn(),
        })
    }
}

pub fn run(session: &mut Session, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
    let values: Vec<(String, DynValue)> =
        inputs.iter().map(|(n, t)| Ok((n.to_string(), t.to_value()?))).collect::<Result<_>>()?;
    let outputs = session.run(values)?;
    let mut res = Vec::new();
    for (name, v) in outputs.iter() {
        let t = match v.dtype() {
            ValueType::Tensor { ty: ort::value::TensorElementType::Float32, .. } => {
                HostTensor::F32(v.try_extract_array::<f32>()?.to_owned())
            }
            ValueType::Tensor { ty: ort::value::TensorElementType::Float64, .. } => {
                HostTensor::F64(v.try_extract_array::<f64>()?.to_owned())
            }
            ValueType::Tensor { ty: ort::value::TensorElementType::Int64, .. } => {
                HostTensor::I64(v.try_extract_array::<i64>()?.to_owned())
            }
            ValueType::Tensor { ty: ort::value::TensorElementType::Bool, .. } => {
                HostTensor::Bool(v.try_extract_array::<bool>()?.to_owned())
            }
            other => return Err(Error::Runtime(format!("output {name} has unsupported type {other:?}"))),
        };
        res.push((name.to_string(), t));
    }
    Ok(res)
}

/// Runs and returns each output's element type and shape only (no copies of the data).
pub fn run_meta(session: &mut Session, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, DType, Vec<i64>)>> {
    let values: Vec<(String, DynValue)> =
        inputs.iter().map(|(n, t)| Ok((n.to_string(), t.to_value()?))).collect::<Result<_>>()?;
    let outputs = session.run(values)?;
    let mut res = Vec::new();
    for (name, v) in outputs.iter() {
        if let ValueType::Tensor { ty, shape, .. } = v.dtype() {
            res.push((name.to_string(), element_dtype(*ty), shape.to_vec()));
        }
    }
    Ok(res)
}

pub fn element_dtype(t: ort::value::TensorElementType) -> DType {
    use ort::value::TensorElementType as T;
    match t {
        T::Float32 => dtype::FLOAT,
        T::Float64 => dtype::DOUBLE,
        T::Float16 => dtype::FLOAT16,
        T::Bfloat16 => dtype::BFLOAT16,
        T::Int64 => dtype::INT64,
        T::Int32 => dtype::INT32,
        T::Int8 => dtype::INT8,
        T::Uint8 => dtype::UINT8,
        T::Bool => dtype::BOOL,
        T::String => dtype::STRING,
        _ => 0,
    }
}
