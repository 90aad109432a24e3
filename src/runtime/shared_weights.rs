//! Frozen weights held once in memory for several sessions of the same artifacts.
//!
//! The train and eval graphs carry the same frozen initializers (stored once on disk, see
//! `onnx::save_models_sharing_data`). Left to itself, each ONNX Runtime session keeps its own copy, pre-packed
//! for its matrix products, and constant folding adds float32 copies of whatever it can compute from them (a
//! half-precision weight's `Cast`, a tied embedding's `Transpose`). Here each initializer both graphs read
//! from the same place becomes one tensor in a buffer betadpo owns, given to every session
//! (`AddInitializer`), and those sessions neither pre-pack (ONNX Runtime cannot free a buffer it does not
//! own, so a packed copy, even one shared through a pre-packed weights container, is a second copy) nor fold
//! constants. Measured on SmolLM2-135M, `--trainable head`, `train --max-steps 2`, 8 pairs, peak RSS:
//! 1236 MB unshared, 1364 MB shared with a shared packed copy, 932 MB shared without packing, ~620 MB also
//! without constant folding (~490 MB with `--frozen-dtype bfloat16`, against 1631 MB when folding casts
//! them back); train-graph time unchanged within noise (1.03-1.10 s either way). The products pack the
//! weights per call, as they do for trainable weights.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ort::value::{DynValue, PrimitiveTensorElementType, Tensor};

use super::ExecutionProvider;
use crate::onnx::le::{self, LeElement};
use crate::onnx::{dtype, load_model_mapped, TensorProto, EXTERNAL_MIN_BYTES};
use crate::{Error, Result};

/// Initializers shared by several sessions.
pub struct SharedWeights {
    values: Vec<(String, Arc<DynValue>)>,
    bytes: usize,
}

/// Where an initializer's bytes lie on disk: (data file, offset, length).
type Placement = (std::path::PathBuf, usize, usize);

impl SharedWeights {
    /// The initializers every one of `graphs` reads from the same place of the same external data file
    /// (artifacts written before weights were shared embed them, and then nothing is shared). Only on the
    /// CPU: another provider copies the weights to its device per session anyway.
    pub fn load(ep: &ExecutionProvider, graphs: &[&Path]) -> Result<SharedWeights> {
        if *ep != ExecutionProvider::Cpu || graphs.len() < 2 {
            return Ok(SharedWeights { values: Vec::new(), bytes: 0 });
        }
        let mut common: Option<BTreeMap<String, Placement>> = None;
        let mut first = None;
        for path in graphs {
            let (model, files) = load_model_mapped(path)?;
            let graph = model.graph.as_ref().ok_or_else(|| Error::graph(format!("{}: model has no graph", path.display())))?;
            let placed: BTreeMap<String, Placement> = graph
                .initializer
                .iter()
                .filter(|t| t.raw_data.len() >= EXTERNAL_MIN_BYTES)
                .filter_map(|t| files.iter().find_map(|f| f.offset_of(&t.raw_data).map(|at| (t.name.clone(), (f.path.clone(), at, t.raw_data.len())))))
                .collect();
            common = Some(match common {
                None => placed,
                Some(mut seen) => {
                    seen.retain(|name, place| placed.get(name) == Some(place));
                    seen
                }
            });
            first.get_or_insert(model);
        }
        let (common, first) = (common.unwrap_or_default(), first.and_then(|m| m.graph).unwrap_or_default());
        super::init(ep)?; // before the first tensor is made
        let mut values = Vec::new();
        let mut bytes = 0;
        for t in first.initializer.iter().filter(|t| common.contains_key(&t.name)) {
            bytes += t.raw_data.len();
            values.push((t.name.clone(), Arc::new(user_owned(t)?)));
            release_pages(&t.raw_data);
        }
        Ok(SharedWeights { values, bytes })
    }

    /// How many initializers and bytes are shared.
    pub fn size(&self) -> (usize, usize) {
        (self.values.len(), self.bytes)
    }

    pub(super) fn apply(&self, mut builder: ort::session::builder::SessionBuilder) -> std::result::Result<ort::session::builder::SessionBuilder, String> {
        if self.values.is_empty() {
            return Ok(builder);
        }
        builder = builder.with_config_entry("session.disable_prepacking", "1").map_err(|e| e.to_string())?;
        builder = builder.with_disabled_optimizers("ConstantFolding").map_err(|e| e.to_string())?;
        for (name, value) in &self.values {
            builder = builder.with_initializer(name, Arc::clone(value)).map_err(|e| format!("sharing initializer {name}: {e}"))?;
        }
        Ok(builder)
    }
}

/// A copy of an initializer in a buffer betadpo owns: ONNX Runtime shares only such user-owned tensors.
fn user_owned(t: &TensorProto) -> Result<DynValue> {
    fn typed<T: PrimitiveTensorElementType + LeElement + Clone + std::fmt::Debug + 'static>(t: &TensorProto) -> std::result::Result<DynValue, ort::Error> {
        let data: Vec<T> = le::elements(&t.raw_data).collect();
        Ok(Tensor::from_array((t.dims.clone(), data))?.into_dyn())
    }
    let made = match t.data_type {
        dtype::FLOAT => typed::<f32>(t),
        dtype::FLOAT16 => typed::<half::f16>(t),
        dtype::BFLOAT16 => typed::<half::bf16>(t),
        dtype::DOUBLE => typed::<f64>(t),
        dtype::INT64 => typed::<i64>(t),
        dtype::INT32 => typed::<i32>(t),
        other => return Err(Error::Runtime(format!("initializer {}: element type {} cannot be shared", t.name, dtype::name(other)))),
    };
    made.map_err(|e| Error::Runtime(format!("initializer {}: {e}", t.name)))
}

/// Lets the kernel drop this process's mapping of `data` (a read-only file mapping, copied by now), so the
/// copy and the file's pages are not both counted while the rest is copied. The pages are read again from
/// the file if touched later; only whole pages inside `data` are released.
fn release_pages(data: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = (data.as_ptr() as usize).div_ceil(page) * page;
    let end = (data.as_ptr() as usize + data.len()) / page * page;
    if end > start {
        // SAFETY: the range lies inside a live read-only mapping; MADV_DONTNEED on a file mapping only
        // discards this process's page table entries, never the file's contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}
