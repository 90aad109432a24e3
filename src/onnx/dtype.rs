//! The element type codes of `TensorProto.DataType`, and what each stores.

/// ONNX element type codes (`TensorProto.DataType`).
pub type DType = i32;

pub const FLOAT: DType = 1;
pub const UINT8: DType = 2;
pub const INT8: DType = 3;
pub const UINT16: DType = 4;
pub const INT16: DType = 5;
pub const INT32: DType = 6;
pub const INT64: DType = 7;
pub const STRING: DType = 8;
pub const BOOL: DType = 9;
pub const FLOAT16: DType = 10;
pub const DOUBLE: DType = 11;
pub const UINT32: DType = 12;
pub const UINT64: DType = 13;
pub const COMPLEX64: DType = 14;
pub const COMPLEX128: DType = 15;
pub const BFLOAT16: DType = 16;

pub fn is_float(t: DType) -> bool {
    matches!(t, FLOAT | FLOAT16 | DOUBLE | BFLOAT16)
}
/// Bits per element of every fixed-size type ONNX defines (1.18: up to FLOAT4E2M1 = 23);
/// `None` for strings and codes ONNX does not define.
pub fn bits(t: DType) -> Option<u64> {
    match t {
        UINT8 | INT8 | BOOL | 17..=20 => Some(8),
        UINT16 | INT16 | FLOAT16 | BFLOAT16 => Some(16),
        FLOAT | INT32 | UINT32 => Some(32),
        INT64 | DOUBLE | UINT64 | COMPLEX64 => Some(64),
        COMPLEX128 => Some(128),
        21..=23 => Some(4),
        _ => None,
    }
}
/// Bytes per element of a whole-byte type.
pub fn size_of(t: DType) -> Option<usize> {
    bits(t).filter(|b| b % 8 == 0).map(|b| (b / 8) as usize)
}
pub fn name(t: DType) -> &'static str {
    match t {
        FLOAT => "float32",
        FLOAT16 => "float16",
        BFLOAT16 => "bfloat16",
        DOUBLE => "float64",
        INT64 => "int64",
        INT32 => "int32",
        INT8 => "int8",
        UINT8 => "uint8",
        BOOL => "bool",
        STRING => "string",
        _ => "other",
    }
}
