//! Loading and saving models, with external data (the `location`/`offset`/`length` entries of
//! `TensorProto.external_data`) resolved on load and written on save when the model is large.
//!
//! Loading maps files into memory and hands `raw_data` out as zero-copy slices, so a model's
//! weights are held once, by the page cache, however many graphs are built from them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::bytes::Bytes;
use prost::Message;

use super::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto, TensorProto};
use crate::{Error, Result};

fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the file is only read; a concurrent writer truncating it is outside our contract,
    // and every writer in this crate replaces files by rename rather than rewriting them.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::from_owner(map))
}

/// The `producer_name` of the model stored at `path`, without resolving its external data; `None`
/// when the file is not an ONNX model.
pub fn producer_name(path: &Path) -> Result<Option<String>> {
    let bytes = map_file(path)?;
    Ok(ModelProto::decode(bytes).ok().filter(|m| m.graph.is_some()).map(|m| m.producer_name))
}

/// Loads a model and resolves its external data, relative to the model's directory.
pub fn load_model(path: &Path) -> Result<ModelProto> {
    let bytes = map_file(path)?;
    if bytes.is_empty() {
        return Err(Error::BadModel { path: path.into(), detail: "the file is empty".into() });
    }
    let mut model = ModelProto::decode(bytes)
        .map_err(|e| Error::BadModel { path: path.into(), detail: format!("protobuf decoding failed, the file may be truncated: {e}") })?;
    if model.graph.is_none() {
        return Err(Error::BadModel { path: path.into(), detail: "it has no graph".into() });
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut files: std::collections::HashMap<PathBuf, Bytes> = Default::default();
    let graph = model.graph.as_mut().unwrap();
    let mut tensors: Vec<&mut TensorProto> = graph.initializer.iter_mut().collect();
    for node in graph.node.iter_mut() {
        for a in node.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                tensors.push(t);
            }
        }
    }
    for t in tensors {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        resolve_external(t, &dir, &mut files, path)?;
    }
    Ok(model)
}

fn resolve_external(t: &mut TensorProto, dir: &Path, files: &mut std::collections::HashMap<PathBuf, Bytes>, model_path: &Path) -> Result<()> {
    let mut location = None;
    let mut offset = 0usize;
    let mut length = None;
    for kv in &t.external_data {
        match kv.key.as_str() {
            "location" => location = Some(kv.value.clone()),
            "offset" => offset = kv.value.parse().unwrap_or(0),
            "length" => length = kv.value.parse().ok(),
            _ => {}
        }
    }
    let bad = |detail: String| Error::BadModel { path: model_path.into(), detail };
    let location = location.ok_or_else(|| bad(format!("initializer {} has external data without a location", t.name)))?;
    let file = dir.join(&location);
    if !files.contains_key(&file) {
        let data = map_file(&file).map_err(|e| match e {
            Error::Io { source, .. } => bad(format!("external data file {} of initializer {}: {source}", file.display(), t.name)),
            e => e,
        })?;
        files.insert(file.clone(), data);
    }
    let data = &files[&file];
    let expected = t.dims.iter().product::<i64>().max(0) as usize * super::dtype::size_of(t.data_type);
    let length = length.unwrap_or(expected);
    if offset + length > data.len() {
        return Err(bad(format!(
            "external data of initializer {} ends at byte {} but {} has {} bytes (truncated?)",
            t.name,
            offset + length,
            file.display(),
            data.len()
        )));
    }
    t.raw_data = data.slice(offset..offset + length);
    t.data_location = DataLocation::Default as i32;
    t.external_data.clear();
    Ok(())
}

/// How to save a model.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Move initializers to `<file>.data` when the serialized model would exceed this many bytes.
    pub external_threshold: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        // protobuf's hard limit is 2 GiB; keep a margin for the graph itself.
        SaveOptions { external_threshold: 1 << 30 }
    }
}

/// Writes a file atomically (see [`crate::temp_files::write_atomically`]), readable by everyone.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    crate::temp_files::write_atomically(path, 0o644, write)
}

/// Where [`save_model`] puts the weights of a large model saved at `path`: `<file name>.data` beside it.
pub fn external_data_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::Other(format!("{}: not a file path", path.display())))?;
    Ok(path.with_file_name(format!("{}.data", name.to_string_lossy())))
}

/// Saves a model; large ones get their initializers in `<file name>.data` beside it.
/// Both files are written atomically, the data file first, so a reader never sees a model
/// pointing at missing data.
pub fn save_model(model: &ModelProto, path: &Path, opts: &SaveOptions) -> Result<()> {
    if model.encoded_len() <= opts.external_threshold {
        let buf = model.encode_to_vec();
        return write_atomic(path, |w| w.write_all(&buf));
    }
    let data_path = external_data_path(path)?;
    let file_name = data_path.file_name().expect("named by external_data_path").to_string_lossy().into_owned();
    let mut light = model.clone(); // cheap: raw_data are reference-counted slices
    let mut offset = 0usize;
    let mut chunks: Vec<Bytes> = Vec::new();
    for t in light.graph.as_mut().unwrap().initializer.iter_mut() {
        if t.raw_data.len() < 1024 {
            continue;
        }
        // 64-byte alignment lets runtimes map the data directly.
        let pad = (64 - offset % 64) % 64;
        if pad > 0 {
            chunks.push(Bytes::from(vec![0u8; pad]));
            offset += pad;
        }
        let len = t.raw_data.len();
        chunks.push(std::mem::take(&mut t.raw_data));
        t.data_location = DataLocation::External as i32;
        t.external_data = vec![kv("location", &file_name), kv("offset", &offset.to_string()), kv("length", &len.to_string())];
        offset += len;
    }
    write_atomic(&data_path, |w| chunks.iter().try_for_each(|c| w.write_all(c)))?;
    let buf = light.encode_to_vec();
    write_atomic(path, |w| w.write_all(&buf))
}

fn kv(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: key.into(), value: value.into() }
}
