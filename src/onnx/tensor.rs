//! Tensor constructors and readers.

use super::le;
use super::proto::{
    tensor_shape_proto::{dimension::Value as DimValue, Dimension},
    type_proto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::{Error, Result};

use super::dtype::{self, DType};

/// Tensors from a model file are refused beyond this many elements (2^40, 4 TiB of float32):
/// far beyond any model, and small enough that sizes in bytes cannot overflow.
pub const MAX_ELEMENTS: u64 = 1 << 40;

/// The element count of `dims`, checked: no negative dimension, and no partial product (in the
/// order every reader multiplies them) above [`MAX_ELEMENTS`], so later products cannot overflow.
pub fn checked_numel(dims: &[i64]) -> std::result::Result<u64, String> {
    let mut n: u64 = 1;
    for &d in dims {
        let d = u64::try_from(d).map_err(|_| format!("negative dimension in {dims:?}"))?;
        n = n.checked_mul(d).filter(|&n| n <= MAX_ELEMENTS).ok_or_else(|| format!("dimensions {dims:?} exceed {MAX_ELEMENTS} elements"))?;
    }
    Ok(n)
}

/// How many bytes `t`'s dtype and dims call for in `raw_data` (or in an external file).
pub fn stored_bytes(t: &TensorProto) -> std::result::Result<usize, String> {
    let bits = dtype::bits(t.data_type).ok_or_else(|| format!("tensor {:?} has unknown or non-numeric dtype {}", t.name, t.data_type))?;
    let numel = checked_numel(&t.dims).map_err(|e| format!("tensor {:?}: {e}", t.name))?;
    Ok((numel * bits).div_ceil(8) as usize)
}

/// Checks that a tensor read from a model holds exactly what its dtype and dims describe,
/// so readers may index its data freely.
pub fn check_stored_size(t: &TensorProto) -> std::result::Result<(), String> {
    if t.data_type == dtype::STRING {
        let numel = checked_numel(&t.dims).map_err(|e| format!("tensor {:?}: {e}", t.name))?;
        return (t.string_data.len() as u64 == numel)
            .then_some(())
            .ok_or_else(|| format!("tensor {:?} holds {} strings for dims {:?}", t.name, t.string_data.len(), t.dims));
    }
    let bytes = stored_bytes(t)?;
    if !t.raw_data.is_empty() {
        return (t.raw_data.len() == bytes).then_some(()).ok_or_else(|| {
            format!("tensor {:?} has {} bytes of data where dtype {} and dims {:?} need {bytes}", t.name, t.raw_data.len(), t.data_type, t.dims)
        });
    }
    let numel = checked_numel(&t.dims)? as usize;
    let held = match t.data_type {
        dtype::FLOAT => t.float_data.len(),
        dtype::COMPLEX64 => t.float_data.len() / 2,
        dtype::DOUBLE => t.double_data.len(),
        dtype::COMPLEX128 => t.double_data.len() / 2,
        dtype::INT64 => t.int64_data.len(),
        dtype::UINT32 | dtype::UINT64 => t.uint64_data.len(),
        dtype::INT32 | dtype::INT16 | dtype::INT8 | dtype::UINT16 | dtype::UINT8 | dtype::BOOL | dtype::FLOAT16 | dtype::BFLOAT16 => t.int32_data.len(),
        // packed sub-byte and float8 types: left to ONNX Runtime, which reads them
        _ => return Ok(()),
    };
    (held == numel).then_some(()).ok_or_else(|| format!("tensor {:?} holds {held} values for dims {:?}", t.name, t.dims))
}

/// A dimension of a declared shape: fixed or symbolic.
#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Fixed(i64),
    Sym(String),
}

pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(data.len() * 4);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto { name: name.to_string(), dims: dims.to_vec(), data_type: dtype::FLOAT, raw_data: raw.into(), ..Default::default() }
}

pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    let mut raw = Vec::with_capacity(data.len() * 8);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto { name: name.to_string(), dims: dims.to_vec(), data_type: dtype::INT64, raw_data: raw.into(), ..Default::default() }
}

/// A one-element zero of type `t`: the `value` of a `ConstantOfShape` that makes zeros.
pub fn zero_value(t: DType) -> TensorProto {
    TensorProto { data_type: t, dims: vec![1], raw_data: vec![0u8; dtype::bits(t).unwrap_or(8).div_ceil(8) as usize].into(), ..Default::default() }
}

fn numel(t: &TensorProto) -> usize {
    t.dims.iter().product::<i64>().max(0) as usize
}

/// Reads a float tensor (f32, f16, bf16 or f64 storage) as f32 values.
pub fn tensor_to_f32(t: &TensorProto) -> Result<Vec<f32>> {
    let out = if !t.raw_data.is_empty() {
        le::decode_f32(t.data_type, &t.raw_data)
    } else {
        match t.data_type {
            dtype::FLOAT => Some(t.float_data.clone()),
            dtype::DOUBLE => Some(t.double_data.iter().map(|&v| v as f32).collect()),
            dtype::FLOAT16 => Some(t.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f32()).collect()),
            dtype::BFLOAT16 => Some(t.int32_data.iter().map(|&v| half::bf16::from_bits(v as u16).to_f32()).collect()),
            _ => None,
        }
    };
    let out = out.ok_or_else(|| Error::graph(format!("tensor {} has dtype {} where a float was expected", t.name, dtype::name(t.data_type))))?;
    check_count(t, out)
}

/// Reads an integer tensor (int64, int32, int8, uint8 or bool storage) as i64 values.
pub fn tensor_to_i64(t: &TensorProto) -> Result<Vec<i64>> {
    let out = if !t.raw_data.is_empty() {
        le::decode_i64(t.data_type, &t.raw_data)
    } else {
        match t.data_type {
            dtype::INT64 => Some(t.int64_data.clone()),
            dtype::INT32 | dtype::INT8 | dtype::UINT8 | dtype::BOOL => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
            _ => None,
        }
    };
    let out = out.ok_or_else(|| Error::graph(format!("tensor {} has dtype {} where an integer was expected", t.name, dtype::name(t.data_type))))?;
    check_count(t, out)
}

/// `values` when they are as many as `t`'s dims call for.
fn check_count<T>(t: &TensorProto, values: Vec<T>) -> Result<Vec<T>> {
    if values.len() != numel(t) {
        return Err(Error::graph(format!("tensor {} holds {} values for shape {:?}", t.name, values.len(), t.dims)));
    }
    Ok(values)
}

/// A typed graph input/output declaration.
pub fn value_info(name: &str, elem_type: DType, shape: &[Dim]) -> ValueInfoProto {
    let dims = shape
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimValue::DimValue(*v),
                Dim::Sym(s) => DimValue::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type, shape: Some(TensorShapeProto { dim: dims }) })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Element type and declared shape of a value info, when it describes a tensor.
pub fn value_info_type(v: &ValueInfoProto) -> Option<(DType, Option<Vec<Dim>>)> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => {
            let shape = t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(DimValue::DimValue(v)) => Dim::Fixed(*v),
                        Some(DimValue::DimParam(p)) => Dim::Sym(p.clone()),
                        None => Dim::Sym(String::new()),
                    })
                    .collect()
            });
            Some((t.elem_type, shape))
        }
        _ => None,
    }
}
