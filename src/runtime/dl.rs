//! The few `dlopen` calls betadpo makes itself: reading a library's version before `ort` loads it, preloading
//! the NVIDIA libraries, and asking the NVIDIA driver for its CUDA version.

use std::ffi::{c_void, CStr};
use std::path::Path;

use libloading::os::unix::{Library as Handle, RTLD_GLOBAL, RTLD_LOCAL, RTLD_NOW};

use crate::{Error, Result};

/// glibc's `RTLD_NOLOAD` (libloading exports the portable flags only).
const RTLD_NOLOAD: i32 = 4;

/// An open library. Never closed: every library betadpo opens stays in use for the life of the process
/// (ONNX Runtime, the NVIDIA libraries and NCCL keep pointers into each other).
#[derive(Clone, Copy, Debug)]
pub struct Library(&'static Handle);

/// Symbol visibility of an opened library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Its symbols stay private to it (and what it loads).
    Local,
    /// Its symbols resolve later libraries' references, as `preload_dlls` (ctypes `RTLD_GLOBAL`) needs.
    Global,
}

impl Library {
    /// Opens `name`: a path, or a bare soname looked up on the loader path.
    pub fn open(name: &Path, scope: Scope) -> std::result::Result<Self, String> {
        let flags = RTLD_NOW | if scope == Scope::Global { RTLD_GLOBAL } else { RTLD_LOCAL };
        // SAFETY: loading a library runs its initialisers; betadpo opens only the runtime libraries it provisions or the user names.
        let handle = unsafe { Handle::open(Some(name.as_os_str()), flags) }.map_err(loader_message)?;
        Ok(Library(Box::leak(Box::new(handle))))
    }

    /// `name` if this process has already loaded it (by that soname or path), without loading anything.
    pub fn already_loaded(name: &Path) -> Option<Self> {
        // SAFETY: RTLD_NOLOAD only looks up a library that is already loaded.
        let handle = unsafe { Handle::open(Some(name.as_os_str()), RTLD_NOW | RTLD_NOLOAD) }.ok()?;
        Some(Library(Box::leak(Box::new(handle))))
    }

    /// The address of `symbol`, if the library (or one it loaded) exports it.
    pub fn symbol(&self, symbol: &CStr) -> Option<*mut c_void> {
        // SAFETY: the address is only read as a pointer here; callers cast it to the symbol's C signature.
        let ptr = unsafe { self.0.get::<*mut c_void>(symbol.to_bytes_with_nul()) }.ok()?;
        let ptr = *ptr;
        (!ptr.is_null()).then_some(ptr)
    }
}

/// The loader's own words (`dlerror`: which file or dependency is missing), which libloading keeps as the source.
fn loader_message(e: libloading::Error) -> String {
    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
}

/// Opens `paths` in order, each `RTLD_GLOBAL`, so a later library (and the GPU provider ONNX Runtime loads after
/// them) finds the earlier ones already loaded by soname. `describe(i)` names a library in the error and
/// says whether it is required; an optional one that fails is skipped.
pub fn preload(paths: &[std::path::PathBuf], describe: impl Fn(usize) -> (String, bool)) -> Result<()> {
    for (i, path) in paths.iter().enumerate() {
        if let Err(e) = Library::open(path, Scope::Global) {
            let (name, required) = describe(i);
            if required {
                return Err(Error::Runtime(format!("cannot load {name}: {e}")));
            }
        }
    }
    Ok(())
}
