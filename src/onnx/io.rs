//! Loading and saving models, with external data (the `location`/`offset`/`length` entries of
//! `TensorProto.external_data`) resolved on load and written on save when the model is large.
//!
//! Loading maps files into memory and hands `raw_data` out as zero-copy slices, so a model's
//! weights are held once, by the page cache, however many graphs are built from them.

use crate::temp_files::write_atomic;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use prost::bytes::Bytes;
use prost::Message;

use super::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto, TensorProto};
use crate::{Error, Result};

fn map_file(path: &Path) -> Result<Bytes> {
    let file = crate::fs_guard::open_regular(path)?;
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

/// Loads a model and resolves its external data, relative to the model's directory. Every
/// initializer and constant is checked to hold exactly the bytes its dtype and dims call for, so
/// later stages can index tensor data without re-checking it.
pub fn load_model(path: &Path) -> Result<ModelProto> {
    load_model_mapped(path).map(|(model, _)| model)
}

/// An external data file of a loaded model, as mapped: its tensors' `raw_data` are slices of `bytes`, so a
/// tensor that still points into `bytes` is unchanged and lies at the same offset in the file.
#[derive(Clone, Debug)]
pub struct MappedData {
    pub path: PathBuf,
    pub bytes: Bytes,
}

impl MappedData {
    /// Where `data` starts in this file, when it is a slice of the mapping.
    pub fn offset_of(&self, data: &[u8]) -> Option<usize> {
        let start = self.bytes.as_ptr() as usize;
        let at = data.as_ptr() as usize;
        (at >= start && at + data.len() <= start + self.bytes.len()).then(|| at - start)
    }
}

/// [`load_model`], also returning the external data files it mapped.
pub fn load_model_mapped(path: &Path) -> Result<(ModelProto, Vec<MappedData>)> {
    if path.is_dir() {
        return Err(crate::paths::onnx_folder_error(path));
    }
    let bytes = map_file(path)?;
    if bytes.is_empty() {
        return Err(Error::BadModel { path: path.into(), detail: "the file is empty".into() });
    }
    let mut model = ModelProto::decode(bytes)
        .map_err(|e| Error::BadModel { path: path.into(), detail: format!("protobuf decoding failed, the file may be truncated: {e}") })?;
    let Some(graph) = model.graph.as_mut() else {
        return Err(Error::BadModel { path: path.into(), detail: "it has no graph".into() });
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut external = ExternalFiles { dir, model_path: path, canonical_dir: None, files: Default::default() };
    let mut tensors: Vec<&mut TensorProto> = graph.initializer.iter_mut().collect();
    for node in graph.node.iter_mut() {
        for a in node.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                tensors.push(t);
            }
        }
    }
    for t in tensors {
        if t.data_location == DataLocation::External as i32 {
            external.resolve(t)?;
        }
        super::tensor::check_stored_size(t).map_err(|detail| Error::BadModel { path: path.into(), detail })?;
    }
    let mapped = external.files.into_iter().map(|(path, bytes)| MappedData { path, bytes }).collect();
    Ok((model, mapped))
}

/// The external data files of one model, each mapped once however many tensors it holds.
struct ExternalFiles<'a> {
    dir: PathBuf,
    model_path: &'a Path,
    /// The model directory with symlinks resolved, computed on first use.
    canonical_dir: Option<PathBuf>,
    files: HashMap<PathBuf, Bytes>,
}

impl ExternalFiles<'_> {
    fn bad(&self, detail: String) -> Error {
        Error::BadModel { path: self.model_path.into(), detail }
    }

    /// Points `t.raw_data` at its bytes in the external file.
    fn resolve(&mut self, t: &mut TensorProto) -> Result<()> {
        let (mut location, mut offset, mut length) = (None, 0u64, None);
        for kv in &t.external_data {
            let number = |what: &str| {
                kv.value.parse::<u64>().map_err(|_| self.bad(format!("initializer {}: external data {what} {:?} is not a byte count", t.name, kv.value)))
            };
            match kv.key.as_str() {
                "location" => location = Some(kv.value.as_str()),
                "offset" => offset = number("offset")?,
                "length" => length = Some(number("length")?),
                _ => {}
            }
        }
        let location = location.ok_or_else(|| self.bad(format!("initializer {} has external data without a location", t.name)))?;
        let file = self.file_inside_dir(location).map_err(|why| self.bad(format!("initializer {}: external data location {location:?} {why}", t.name)))?;
        if !self.files.contains_key(&file) {
            let data = map_file(&file).map_err(|e| match e {
                Error::Io { source, .. } => self.bad(format!("external data file {} of initializer {}: {source}", file.display(), t.name)),
                e => e,
            })?;
            self.files.insert(file.clone(), data);
        }
        let data = &self.files[&file];
        let length = match length {
            Some(l) => l,
            None => super::tensor::stored_bytes(t).map_err(|detail| self.bad(detail))? as u64,
        };
        let end = offset.checked_add(length).filter(|&end| end <= data.len() as u64).ok_or_else(|| {
            self.bad(format!(
                "external data of initializer {} (offset {offset}, length {length}) runs past the end of {}, which has {} bytes (truncated?)",
                t.name,
                file.display(),
                data.len()
            ))
        })?;
        t.raw_data = data.slice(offset as usize..end as usize);
        t.data_location = DataLocation::Default as i32;
        t.external_data.clear();
        Ok(())
    }

    /// The file `location` names, which must be a regular file inside the model's directory:
    /// a location is a relative path without `..`, and after resolving symlinks it must still lie
    /// under the directory. This closes the path-traversal hole (CVE-2022-25882 in `onnx`), and a
    /// FIFO or device would hang or never end, so only regular files are read.
    fn file_inside_dir(&mut self, location: &str) -> std::result::Result<PathBuf, String> {
        let relative = Path::new(location);
        if location.is_empty() || relative.is_absolute() || !relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err("must be a relative path inside the model's directory, without `..`".into());
        }
        if self.canonical_dir.is_none() {
            let dir = self.dir.canonicalize().map_err(|e| format!("cannot be resolved: {}: {e}", self.dir.display()))?;
            self.canonical_dir = Some(dir);
        }
        let dir = self.canonical_dir.as_ref().expect("set above");
        let joined = self.dir.join(relative);
        let file = joined.canonicalize().map_err(|e| format!("cannot be opened: {}: {e}", joined.display()))?;
        if !file.starts_with(dir) {
            return Err(format!("resolves to {}, outside the model's directory (a symlink?)", file.display()));
        }
        let meta = std::fs::metadata(&file).map_err(|e| format!("cannot be opened: {}: {e}", file.display()))?;
        if !meta.is_file() {
            return Err(format!("is not a regular file: {}", file.display()));
        }
        Ok(file)
    }
}

/// Initializers smaller than this stay inside the model when its weights move to an external file.
pub const EXTERNAL_MIN_BYTES: usize = 1024;

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

/// Where [`save_model`] puts the weights of a large model saved at `path`: `<file name>.data` beside it.
pub fn external_data_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::BadPath { path: path.to_path_buf(), detail: "not a file path".into() })?;
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
        if t.raw_data.len() < EXTERNAL_MIN_BYTES {
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

pub(super) fn kv(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: key.into(), value: value.into() }
}
