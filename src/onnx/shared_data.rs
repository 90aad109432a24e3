//! Saving several models that hold the same large initializers (the train, eval and inference graphs all
//! carry the model's frozen weights) so that each tensor is on disk once: where it already lies, in an
//! external data file of the model they were built from, cloned into the output directory (ONNX Runtime
//! reads external data only from inside the model's directory) when the file system can share the blocks,
//! or else in one data file written beside them, which every model references.
//!
//! Not a hard link, though on the same file system it would cost nothing: Python's `onnx.load` refuses external
//! data with more than one link ("a potential hardlink attack", onnx 1.23), and a link would also change
//! with the user's file if that were rewritten in place.

use std::collections::HashMap;
use std::path::Path;

use prost::bytes::Bytes;
use prost::Message;

use super::io::{kv, MappedData, EXTERNAL_MIN_BYTES};
use super::proto::{tensor_proto::DataLocation, ModelProto};
use crate::temp_files::write_atomic;
use crate::Result;

/// The data file written for initializers that are in no cloned source file.
pub const SHARED_DATA_FILE: &str = "frozen.data";

/// What [`save_models_sharing_data`] put on disk.
#[derive(Debug, Default)]
pub struct SharedData {
    /// Bytes written to [`SHARED_DATA_FILE`] (0: no such file).
    pub written_bytes: u64,
    /// Source files cloned into the directory, by the name they have there.
    pub cloned: Vec<String>,
}

/// The name a cloned source file gets in the output directory.
/// Whether `name` is one a model's weights are cloned under (see `clone_name`).
pub fn is_cloned_weights_name(name: &str) -> bool {
    name == "model-weights.data" || name.strip_prefix("model-weights-").and_then(|r| r.strip_suffix(".data")).is_some_and(|i| i.parse::<usize>().is_ok())
}

fn clone_name(index: usize) -> String {
    if index == 0 {
        "model-weights.data".into()
    } else {
        format!("model-weights-{index}.data")
    }
}

/// Writes every model to `dir/<file>`, with each initializer of at least [`EXTERNAL_MIN_BYTES`] stored once
/// for all of them. A tensor that is still a slice of one of `sources` (unchanged since loading) stays in that
/// file, cloned into `dir`; when cloning fails (a file system without shared blocks, such as ext4, or another
/// file system) its bytes are copied into [`SHARED_DATA_FILE`] like every other tensor. Two models share a tensor when they hold the same bytes
/// (one slice, as graphs cloned from one model do).
pub fn save_models_sharing_data(dir: &Path, models: Vec<(String, ModelProto)>, sources: &[MappedData]) -> Result<SharedData> {
    let mut report = SharedData::default();
    let mut cloned: Vec<Option<bool>> = vec![None; sources.len()];
    let mut placed: HashMap<(usize, usize), (String, usize)> = HashMap::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut offset = 0usize;
    let mut light = models;
    for (_, model) in light.iter_mut() {
        let Some(graph) = model.graph.as_mut() else { continue };
        for t in graph.initializer.iter_mut().filter(|t| t.raw_data.len() >= EXTERNAL_MIN_BYTES) {
            let len = t.raw_data.len();
            let key = (t.raw_data.as_ptr() as usize, len);
            let (file, at) = placed.entry(key).or_insert_with(|| {
                let in_source = sources.iter().enumerate().find_map(|(i, s)| s.offset_of(&t.raw_data).map(|at| (i, at)));
                match in_source {
                    Some((i, at)) if *cloned[i].get_or_insert_with(|| clone_file(&sources[i].path, &dir.join(clone_name(i)), &mut report)) => {
                        (clone_name(i), at)
                    }
                    _ => {
                        // 64-byte alignment lets runtimes map the data directly.
                        let pad = (64 - offset % 64) % 64;
                        if pad > 0 {
                            chunks.push(Bytes::from(vec![0u8; pad]));
                            offset += pad;
                        }
                        chunks.push(t.raw_data.clone());
                        offset += len;
                        (SHARED_DATA_FILE.to_string(), offset - len)
                    }
                }
            });
            t.raw_data = Bytes::new();
            t.data_location = DataLocation::External as i32;
            t.external_data = vec![kv("location", file), kv("offset", &at.to_string()), kv("length", &len.to_string())];
        }
    }
    if !chunks.is_empty() {
        write_atomic(&dir.join(SHARED_DATA_FILE), |w| chunks.iter().try_for_each(|c| w.write_all(c)))?;
        report.written_bytes = offset as u64;
    }
    for (file, model) in light {
        let buf = model.encode_to_vec();
        write_atomic(&dir.join(file), |w| w.write_all(&buf))?;
    }
    Ok(report)
}

/// Clones `source` to `target` sharing its blocks (`FICLONE`: btrfs, XFS, ...); false when the file system
/// will not, and then nothing is left at `target`.
fn clone_file(source: &Path, target: &Path, report: &mut SharedData) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(from), Ok(to)) = (std::fs::File::open(source), std::fs::File::create(target)) else { return false };
        // SAFETY: both descriptors are open; FICLONE reads `from` and replaces the (empty) contents of `to`.
        if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0 {
            report.cloned.push(target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            return true;
        }
        let _ = std::fs::remove_file(target);
    }
    let _ = (source, target, report);
    false
}
