//! The safetensors weights of a Hugging Face folder (`model.safetensors`, or the shards that
//! `model.safetensors.index.json` names), memory-mapped: each weight becomes an ONNX initializer whose
//! `raw_data` is a slice of the mapping, in its stored dtype, so nothing is copied and the artifacts can
//! store each weight straight from the file (see `onnx::save_models_sharing_data`).

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use prost::bytes::Bytes;
use safetensors::{Dtype, SafeTensors};

use crate::onnx::{dtype, DType, MappedData, TensorProto};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub struct Weights {
    files: Vec<MappedData>,
    tensors: HashMap<String, TensorProto>,
}

/// Why the weights cannot be read: `(file, detail)`.
pub type WeightsError = (PathBuf, String);

fn onnx_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(dtype::FLOAT),
        Dtype::F16 => Some(dtype::FLOAT16),
        Dtype::BF16 => Some(dtype::BFLOAT16),
        _ => None,
    }
}

/// The shard file names, from the index (deduplicated, in first-use order) or the single file.
fn shard_names(dir: &Path) -> Result<Vec<String>, WeightsError> {
    let index = dir.join(INDEX_FILE);
    if !index.exists() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| (index.clone(), e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| (index.clone(), format!("not JSON ({e})")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| (index.clone(), "has no weight_map".to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| (index.clone(), format!("weight_map entry {tensor} is not a file name")))?;
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    Ok(names)
}

/// `name` inside `dir`: a relative path without `..` that stays inside after resolving symlinks.
fn file_inside(dir: &Path, name: &str) -> Result<PathBuf, WeightsError> {
    let rel = Path::new(name);
    if name.is_empty() || rel.is_absolute() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err((dir.join(INDEX_FILE), format!("shard {name:?} is not a file name inside the folder")));
    }
    let path = dir.join(rel);
    let real = path.canonicalize().map_err(|e| (path.clone(), e.to_string()))?;
    let real_dir = dir.canonicalize().map_err(|e| (dir.to_path_buf(), e.to_string()))?;
    if !real.starts_with(&real_dir) || !real.is_file() {
        return Err((path, "is not a regular file inside the folder".into()));
    }
    Ok(real)
}

fn map_file(path: &Path) -> Result<Bytes, WeightsError> {
    let file = std::fs::File::open(path).map_err(|e| (path.to_path_buf(), e.to_string()))?;
    // SAFETY: the file is only read; betadpo never writes into a model folder.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| (path.to_path_buf(), e.to_string()))?;
    Ok(Bytes::from_owner(map))
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Weights, WeightsError> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for name in shard_names(dir)? {
            let path = file_inside(dir, &name)?;
            let bytes = map_file(&path)?;
            let bad = |detail: String| (path.clone(), detail);
            let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file, or truncated ({e})")))?;
            for (tname, view) in st.tensors() {
                let data_type =
                    onnx_dtype(view.dtype()).ok_or_else(|| bad(format!("tensor {tname} has dtype {:?} (F32, F16 and BF16 are read)", view.dtype())))?;
                let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
                let t = TensorProto {
                    name: tname.clone(),
                    dims: view.shape().iter().map(|&d| d as i64).collect(),
                    data_type,
                    raw_data: bytes.slice(start..start + view.data().len()),
                    ..Default::default()
                };
                if tensors.insert(tname.clone(), t).is_some() {
                    return Err(bad(format!("tensor {tname} is stored in more than one shard")));
                }
            }
            files.push(MappedData { path, bytes });
        }
        Ok(Weights { files, tensors })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn dims(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.dims.as_slice())
    }

    /// The weight `name`, checked to have `dims`; `Err(detail)` when it is missing or has another shape.
    pub fn get(&self, name: &str, dims: &[i64]) -> Result<TensorProto, String> {
        let t = self.tensors.get(name).ok_or_else(|| format!("the weights have no tensor {name}"))?;
        if t.dims != dims {
            return Err(format!("tensor {name} has shape {:?}; config.json implies {dims:?}", t.dims));
        }
        Ok(t.clone())
    }

    /// The total bytes of the weight files (the figure artifacts and memory are measured against).
    pub fn stored_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes.len() as u64).sum()
    }

    pub fn into_files(self) -> Vec<MappedData> {
        self.files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, &[usize], Vec<f32>)]) {
        let raw: Vec<crate::store::RawTensor> = tensors.iter().map(|(n, s, d)| crate::store::RawTensor::of_f32(n, s.to_vec(), d)).collect();
        crate::store::write_safetensors_raw(path, &raw, None).unwrap();
    }

    #[test]
    fn shards_are_mapped_without_copies_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("a.safetensors"), &[("x", &[2, 2], vec![1.0, 2.0, 3.0, 4.0])]);
        write_st(&dir.path().join("b.safetensors"), &[("y", &[3], vec![5.0, 6.0, 7.0])]);
        std::fs::write(dir.path().join(INDEX_FILE), r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#).unwrap();
        let w = Weights::open(dir.path()).unwrap();
        let y = w.get("y", &[3]).unwrap();
        assert_eq!(crate::onnx::tensor_to_f32(&y).unwrap(), vec![5.0, 6.0, 7.0]);
        assert!(w.files.iter().any(|f| f.offset_of(&y.raw_data).is_some()), "the tensor is a slice of the mapped file");
        assert!(w.get("x", &[4]).unwrap_err().contains("shape [2, 2]"));
        assert!(w.get("z", &[1]).unwrap_err().contains("no tensor z"));
    }

    #[test]
    fn shards_outside_the_folder_and_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(INDEX_FILE), r#"{"weight_map":{"x":"../a.safetensors"}}"#).unwrap();
        assert!(Weights::open(dir.path()).err().unwrap().1.contains("inside the folder"));
        std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        write_st(&dir.path().join(SINGLE_FILE), &[("x", &[2, 2], vec![1.0; 4])]);
        let bytes = std::fs::read(dir.path().join(SINGLE_FILE)).unwrap();
        std::fs::write(dir.path().join(SINGLE_FILE), &bytes[..bytes.len() - 3]).unwrap();
        assert!(Weights::open(dir.path()).err().unwrap().1.contains("truncated"));
    }
}
