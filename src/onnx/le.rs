//! Decoding little-endian tensor bytes (an ONNX initializer's `raw_data`, a safetensors tensor's data): the
//! one place in betadpo where raw bytes become element values.

use super::dtype::{self, DType};

/// An element type stored as little-endian bytes.
pub trait LeElement: Sized + 'static {
    /// Bytes per element.
    const SIZE: usize;
    /// The value of exactly [`Self::SIZE`] bytes.
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! le_element {
    ($($t:ty => $n:literal, $from:expr;)*) => {$(
        impl LeElement for $t {
            const SIZE: usize = $n;
            fn from_le(bytes: &[u8]) -> Self {
                $from(bytes.try_into().expect("chunks of SIZE bytes"))
            }
        }
    )*};
}

le_element! {
    f32 => 4, f32::from_le_bytes;
    f64 => 8, f64::from_le_bytes;
    i64 => 8, i64::from_le_bytes;
    i32 => 4, i32::from_le_bytes;
    half::f16 => 2, half::f16::from_le_bytes;
    half::bf16 => 2, half::bf16::from_le_bytes;
}

/// The elements of `raw`, in order; a trailing partial element is left out (callers check sizes first).
pub fn elements<T: LeElement>(raw: &[u8]) -> impl Iterator<Item = T> + '_ {
    raw.chunks_exact(T::SIZE).map(T::from_le)
}

/// Float storage of ONNX element type `t` (float32, float64, float16, bfloat16) as f32 values; `None` for
/// any other type.
pub fn decode_f32(t: DType, raw: &[u8]) -> Option<Vec<f32>> {
    Some(match t {
        dtype::FLOAT => elements::<f32>(raw).collect(),
        dtype::DOUBLE => elements::<f64>(raw).map(|v| v as f32).collect(),
        dtype::FLOAT16 => elements::<half::f16>(raw).map(half::f16::to_f32).collect(),
        dtype::BFLOAT16 => elements::<half::bf16>(raw).map(half::bf16::to_f32).collect(),
        _ => return None,
    })
}

/// Integer storage of ONNX element type `t` (int64, int32, int8, uint8, bool) as i64 values; `None` for any
/// other type.
pub fn decode_i64(t: DType, raw: &[u8]) -> Option<Vec<i64>> {
    Some(match t {
        dtype::INT64 => elements::<i64>(raw).collect(),
        dtype::INT32 => elements::<i32>(raw).map(i64::from).collect(),
        dtype::INT8 => raw.iter().map(|&b| i64::from(b as i8)).collect(),
        dtype::UINT8 | dtype::BOOL => raw.iter().map(|&b| i64::from(b)).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_type_from_bytes_written_by_std_and_half() {
        let f: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32(dtype::FLOAT, &f), Some(vec![1.5, -2.25]));
        let d: Vec<u8> = [0.1f64].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32(dtype::DOUBLE, &d), Some(vec![0.1f64 as f32]));
        let h: Vec<u8> = half::f16::from_f32(3.0).to_le_bytes().to_vec();
        assert_eq!(decode_f32(dtype::FLOAT16, &h), Some(vec![3.0]));
        let b: Vec<u8> = half::bf16::from_f32(-0.5).to_le_bytes().to_vec();
        assert_eq!(decode_f32(dtype::BFLOAT16, &b), Some(vec![-0.5]));
        assert_eq!(decode_f32(dtype::INT64, &f), None);

        let i: Vec<u8> = [-3i64, 1 << 40].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_i64(dtype::INT64, &i), Some(vec![-3, 1 << 40]));
        let i32s: Vec<u8> = [-7i32].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_i64(dtype::INT32, &i32s), Some(vec![-7]));
        assert_eq!(decode_i64(dtype::INT8, &[0xff, 2]), Some(vec![-1, 2]));
        assert_eq!(decode_i64(dtype::UINT8, &[0xff]), Some(vec![255]));
        assert_eq!(decode_i64(dtype::FLOAT, &i), None);
    }

    #[test]
    fn a_trailing_partial_element_is_left_out() {
        assert_eq!(elements::<f32>(&[0, 0, 128, 63, 1, 2]).collect::<Vec<_>>(), vec![1.0]);
    }
}
