//! Reading a library's ONNX Runtime version before `ort` loads it.
//!
//! `ort` only rejects libraries *older* than its API level and merely logs newer ones, but betadpo's graphs and
//! tests are pinned to 1.32.x (1.31.x for the GPU build), so we check the version ourselves and fail with a message that says what to do.
//! The check opens the library with `dlopen` (the handle is kept open on purpose: `ort` opens the same file right
//! after, which then reuses the already mapped library) and calls `OrtGetApiBase()->GetVersionString()`.

use std::ffi::CStr;
use std::path::Path;

use super::dl::{Library, Scope};
use super::provision::{LIB_NAME, ORT_SERIES, ORT_VERSION};
use crate::{Error, Result};

/// Returns the version string (e.g. `"1.32.0"`) reported by the ONNX Runtime library at `path`.
pub fn library_version(path: &Path) -> Result<String> {
    let library = Library::open(path, Scope::Local).map_err(|e| Error::Runtime(format!("cannot load {}: {e}", path.display())))?;
    let symbol = library
        .symbol(c"OrtGetApiBase")
        .ok_or_else(|| Error::Runtime(format!("{} is not an ONNX Runtime library (it does not export OrtGetApiBase)", path.display())))?;
    // SAFETY: OrtGetApiBase has this signature in every ONNX Runtime release; it returns a static struct whose
    // GetVersionString returns a static NUL-terminated string.
    let get_base: unsafe extern "C" fn() -> *const ort::sys::OrtApiBase = unsafe { std::mem::transmute(symbol) };
    let base = unsafe { get_base() };
    if base.is_null() {
        return Err(Error::Runtime(format!("{}: OrtGetApiBase returned null", path.display())));
    }
    let version = unsafe { CStr::from_ptr(((*base).GetVersionString)()) };
    Ok(version.to_string_lossy().into_owned())
}

/// Fails unless `version` belongs to a supported series (1.32; 1.31, the newest GPU build on PyPI).
pub fn check_version(path: &Path, version: &str) -> Result<()> {
    if ORT_SERIES.iter().any(|s| version.starts_with(s)) {
        return Ok(());
    }
    Err(Error::Runtime(format!(
        "{} is ONNX Runtime {version}, but betadpo needs {}x; unset ORT_DYLIB_PATH to let betadpo \
         provision {ORT_VERSION} itself, or point ORT_DYLIB_PATH at {LIB_NAME} (`pip install onnxruntime=={ORT_VERSION}`)",
        path.display(),
        ORT_SERIES.join("x or ")
    )))
}
