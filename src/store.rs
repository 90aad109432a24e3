//! Named float tensors on disk (safetensors), written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::Dtype;

use crate::onnx::{dtype, le};
use crate::{Error, Result};

/// A named float32 tensor held on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes host tensors; their bytes are streamed to the file, not gathered into one buffer first.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor], metadata: Option<BTreeMap<String, String>>) -> Result<()> {
    let raw: Vec<RawTensor> = tensors.iter().map(|t| RawTensor::of_f32(&t.name, t.shape.clone(), &t.data)).collect();
    write_safetensors_raw(path, &raw, metadata.as_ref())
}

/// The little-endian bytes of `data`: a view on little-endian machines, a copy elsewhere.
fn le_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8; the view has the slice's lifetime.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) })
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// A float32 tensor given as its little-endian bytes (e.g. an ONNX initializer's `raw_data`).
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

impl<'a> RawTensor<'a> {
    /// A view on float32 values (a copy only on big-endian machines).
    pub fn of_f32(name: &'a str, shape: Vec<usize>, data: &'a [f32]) -> Self {
        RawTensor { name, shape, bytes: le_bytes(data) }
    }
}

/// Writes float32 tensors straight from their bytes: no copy of the weights is made, so writing
/// a model's parameters costs no memory beyond the (memory-mapped) model itself.
pub fn write_safetensors_raw(path: &Path, tensors: &[RawTensor], metadata: Option<&BTreeMap<String, String>>) -> Result<()> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(m));
    }
    let mut offset = 0usize;
    for t in tensors {
        let len = t.bytes.len();
        if len != t.shape.iter().product::<usize>() * 4 {
            return Err(bad(path, format!("tensor {} has {len} bytes for shape {:?}", t.name, t.shape)));
        }
        header.insert(t.name.to_string(), serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let mut text = serde_json::to_string(&header).expect("header serialises");
    // the data section starts 8-byte aligned
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    crate::temp_files::write_atomic(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(text.as_bytes())?;
        for t in tensors {
            w.write_all(&t.bytes)?;
        }
        Ok(())
    })
}

/// Reads every tensor as float32 (f32, f16, bf16 and f64 storage), in file order; a regular file
/// only (see `fs_guard`).
pub fn read_safetensors(path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    tensors_of(path, &crate::fs_guard::read(path)?)
}

/// [`read_safetensors`] for a file of a directory betadpo wrote (artifacts, a run, a checkpoint):
/// a symbolic link may lead only within `dir`.
pub fn read_safetensors_inside(dir: &Path, path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    tensors_of(path, &crate::fs_guard::read_inside(dir, path)?)
}

fn tensors_of(path: &Path, bytes: &[u8]) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(path, format!("not a valid safetensors file ({e})")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(path, e))?;
    let metadata: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut out = Vec::new();
    let mut names: Vec<(usize, String)> = meta.tensors().iter().map(|(n, info)| (info.data_offsets.0, n.clone())).collect();
    names.sort();
    for (_, name) in names {
        let v = st.tensor(&name).map_err(|e| bad(path, e))?;
        let onnx_dtype = match v.dtype() {
            Dtype::F32 => dtype::FLOAT,
            Dtype::F64 => dtype::DOUBLE,
            Dtype::F16 => dtype::FLOAT16,
            Dtype::BF16 => dtype::BFLOAT16,
            other => return Err(bad(path, format!("tensor {name} has dtype {other:?}, expected a float"))),
        };
        let data = le::decode_f32(onnx_dtype, v.data()).expect("a float dtype");
        out.push(NamedTensor { name, shape: v.shape().to_vec(), data });
    }
    Ok((out, metadata))
}

/// Reads the int64 tensors of a safetensors file (token ids in golden files).
pub fn read_i64(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let bytes = crate::fs_guard::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e))?;
    let v = st.tensor(name).map_err(|e| bad(path, e))?;
    if v.dtype() != Dtype::I64 {
        return Err(bad(path, format!("{name} is {:?}, not int64", v.dtype())));
    }
    Ok((v.shape().to_vec(), le::elements::<i64>(v.data()).collect()))
}

fn bad(path: &Path, detail: impl ToString) -> Error {
    Error::BadSafetensors { path: path.to_path_buf(), detail: detail.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_safetensors_or_holds_integers_is_a_bad_safetensors_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a header").unwrap();
        let Err(e) = read_safetensors(&junk) else { panic!("junk was read") };
        assert!(matches!(&e, Error::BadSafetensors { path, .. } if path == &junk), "{e:?}");
        assert!(e.to_string().starts_with(&format!("{}: not a valid safetensors file (", junk.display())), "{e}");

        // int64 token ids: readable by read_i64, refused as floats
        let ids = dir.path().join("ids.safetensors");
        let bytes: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::I64, vec![2], &bytes).unwrap();
        std::fs::write(&ids, safetensors::serialize([("ids", view)], None).unwrap()).unwrap();
        assert_eq!(read_i64(&ids, "ids").unwrap(), (vec![2], vec![7, -1]));
        let Err(e) = read_safetensors(&ids) else { panic!("int64 read as floats") };
        assert_eq!(e.to_string(), format!("{}: tensor ids has dtype I64, expected a float", ids.display()));
    }
}
