//! Host-side tensors and a simple `run` for tests, validation and shape probing, where convenience matters more
//! than avoiding copies (the training loop binds device buffers directly instead).

use ndarray::ArrayD;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, ValueType};

use crate::onnx::{dtype, DType};
use crate::{Error, Result};

/// A dense tensor in host memory, in one of the element types betadpo's graphs exchange.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(ArrayD<f32>),
    /// Float64, for gradient checks with tight tolerances.
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
    I32(ArrayD<i32>),
}

impl HostTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(a) => a.shape(),
            HostTensor::F64(a) => a.shape(),
            HostTensor::I64(a) => a.shape(),
            HostTensor::Bool(a) => a.shape(),
            HostTensor::I32(a) => a.shape(),
        }
    }

    /// ONNX-style element type name, as in `betadpo::onnx::dtype::name`.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            HostTensor::F32(_) => "float32",
            HostTensor::F64(_) => "float64",
            HostTensor::I64(_) => "int64",
            HostTensor::Bool(_) => "bool",
            HostTensor::I32(_) => "int32",
        }
    }

    /// The ONNX element type code (`betadpo::onnx::dtype`).
    pub fn onnx_dtype(&self) -> DType {
        match self {
            HostTensor::F32(_) => dtype::FLOAT,
            HostTensor::F64(_) => dtype::DOUBLE,
            HostTensor::I64(_) => dtype::INT64,
            HostTensor::Bool(_) => dtype::BOOL,
            HostTensor::I32(_) => dtype::INT32,
        }
    }

    pub fn as_f64(&self) -> Option<&ArrayD<f64>> {
        match self {
            HostTensor::F64(a) => Some(a),
            _ => None,
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

    pub fn as_i32(&self) -> Option<&ArrayD<i32>> {
        match self {
            HostTensor::I32(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<&ArrayD<bool>> {
        match self {
            HostTensor::Bool(a) => Some(a),
            _ => None,
        }
    }

    /// A float32 tensor from a shape and row-major values.
    pub fn f32(shape: &[usize], values: Vec<f32>) -> Result<Self> {
        ArrayD::from_shape_vec(shape, values).map(HostTensor::F32).map_err(|e| shape_error(shape, e))
    }

    /// An int64 tensor from a shape and row-major values.
    pub fn i64(shape: &[usize], values: Vec<i64>) -> Result<Self> {
        ArrayD::from_shape_vec(shape, values).map(HostTensor::I64).map_err(|e| shape_error(shape, e))
    }

    /// Copies the data into an ONNX Runtime input. `run` is the convenience path, not the hot one, so an owned
    /// copy (which also fixes non-standard layouts) is simpler than tracking borrow lifetimes.
    pub fn to_input(&self, name: &str) -> Result<SessionInputValue<'static>> {
        fn owned<T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(a: &ArrayD<T>, name: &str) -> Result<SessionInputValue<'static>> {
            Tensor::from_array(a.as_standard_layout().into_owned()).map(SessionInputValue::from).map_err(|e| Error::Runtime(format!("input {name}: {e}")))
        }
        match self {
            HostTensor::F32(a) => owned(a, name),
            HostTensor::F64(a) => owned(a, name),
            HostTensor::I64(a) => owned(a, name),
            HostTensor::Bool(a) => owned(a, name),
            HostTensor::I32(a) => owned(a, name),
        }
    }
}

fn shape_error(shape: &[usize], e: ndarray::ShapeError) -> Error {
    Error::ShapeMismatch { shape: shape.to_vec(), detail: e.to_string() }
}

impl From<ArrayD<f32>> for HostTensor {
    fn from(a: ArrayD<f32>) -> Self {
        HostTensor::F32(a)
    }
}
impl From<ArrayD<f64>> for HostTensor {
    fn from(a: ArrayD<f64>) -> Self {
        HostTensor::F64(a)
    }
}
impl From<ArrayD<i64>> for HostTensor {
    fn from(a: ArrayD<i64>) -> Self {
        HostTensor::I64(a)
    }
}
impl From<ArrayD<bool>> for HostTensor {
    fn from(a: ArrayD<bool>) -> Self {
        HostTensor::Bool(a)
    }
}
impl From<ArrayD<i32>> for HostTensor {
    fn from(a: ArrayD<i32>) -> Self {
        HostTensor::I32(a)
    }
}

/// The session's input names, in declaration order.
pub fn input_names(session: &Session) -> Vec<String> {
    session.inputs().iter().map(|o| o.name().to_string()).collect()
}

/// The session's output names, in declaration order.
pub fn output_names(session: &Session) -> Vec<String> {
    session.outputs().iter().map(|o| o.name().to_string()).collect()
}

/// Runs `session` on host inputs and returns every output, in the session's output order.
/// The float32 output `name` of a [`run`].
pub fn f32_output<'a>(outs: &'a [(String, HostTensor)], name: &str) -> Result<&'a ArrayD<f32>> {
    outs.iter().find(|(n, _)| n == name).and_then(|(_, t)| t.as_f32()).ok_or_else(|| Error::Runtime(format!("no float32 output {name}")))
}

pub fn run(session: &mut Session, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
    run_with(session, inputs, to_host)
}

/// Runs `session` and returns each output's ONNX element type and shape, in the session's output order, without
/// copying values: shape probing needs only these, and it works for every element type (float16 included).
pub fn run_meta(session: &mut Session, inputs: &[(&str, HostTensor)]) -> Result<Vec<(String, DType, Vec<i64>)>> {
    run_with(session, inputs, |name, value| match value.dtype() {
        ValueType::Tensor { ty, shape, .. } => Ok((onnx_dtype_of(*ty), shape.iter().copied().collect())),
        other => Err(Error::Runtime(format!("output {name} is not a tensor ({other:?})"))),
    })
    .map(|outs| outs.into_iter().map(|(name, (t, shape))| (name, t, shape)).collect())
}

fn run_with<T>(session: &mut Session, inputs: &[(&str, HostTensor)], mut convert: impl FnMut(&str, &DynValue) -> Result<T>) -> Result<Vec<(String, T)>> {
    let names = output_names(session);
    let mut feed: Vec<(String, SessionInputValue<'static>)> = Vec::with_capacity(inputs.len());
    for (name, tensor) in inputs {
        feed.push((name.to_string(), tensor.to_input(name)?));
    }
    let mut outputs = session.run(feed).map_err(|e| Error::Runtime(format!("run failed: {e}")))?;
    let mut result = Vec::with_capacity(names.len());
    for name in names {
        let value = outputs.remove(name.as_str()).ok_or_else(|| Error::Runtime(format!("output {name} missing from the run's results")))?;
        let converted = convert(&name, &value)?;
        result.push((name, converted));
    }
    Ok(result)
}

/// ONNX `TensorProto.DataType` code of an ONNX Runtime element type (0, "undefined", for exotic ones).
fn onnx_dtype_of(ty: TensorElementType) -> DType {
    match ty {
        TensorElementType::Float32 => dtype::FLOAT,
        TensorElementType::Uint8 => dtype::UINT8,
        TensorElementType::Int8 => dtype::INT8,
        TensorElementType::Uint16 => 4,
        TensorElementType::Int16 => 5,
        TensorElementType::Int32 => dtype::INT32,
        TensorElementType::Int64 => dtype::INT64,
        TensorElementType::String => dtype::STRING,
        TensorElementType::Bool => dtype::BOOL,
        TensorElementType::Float16 => dtype::FLOAT16,
        TensorElementType::Float64 => dtype::DOUBLE,
        TensorElementType::Uint32 => 12,
        TensorElementType::Uint64 => 13,
        TensorElementType::Bfloat16 => dtype::BFLOAT16,
        _ => 0,
    }
}

/// Copies one output to the host, naming the output when its type is not one `HostTensor` holds.
fn to_host(name: &str, value: &DynValue) -> Result<HostTensor> {
    let unsupported =
        |ty: &dyn std::fmt::Debug| Error::Runtime(format!("output {name} has type {ty:?}; HostTensor holds float32, float64, int64, int32 and bool tensors"));
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => return Err(unsupported(other)),
    };
    let extract_err = |e: ort::Error| Error::Runtime(format!("output {name}: {e}"));
    Ok(match ty {
        TensorElementType::Float32 => HostTensor::F32(value.try_extract_array::<f32>().map_err(extract_err)?.to_owned()),
        TensorElementType::Float64 => HostTensor::F64(value.try_extract_array::<f64>().map_err(extract_err)?.to_owned()),
        TensorElementType::Int64 => HostTensor::I64(value.try_extract_array::<i64>().map_err(extract_err)?.to_owned()),
        TensorElementType::Int32 => HostTensor::I32(value.try_extract_array::<i32>().map_err(extract_err)?.to_owned()),
        TensorElementType::Bool => HostTensor::Bool(value.try_extract_array::<bool>().map_err(extract_err)?.to_owned()),
        other => return Err(unsupported(&other)),
    })
}
