//! The few `dlopen` calls betadpo makes itself: reading a library's version before `ort` loads it, preloading
//! the NVIDIA libraries, and asking the NVIDIA driver for its CUDA version.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use crate::{Error, Result};

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}

const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;
const RTLD_NOLOAD: c_int = 4;

/// An open library. Never closed: every library betadpo opens stays in use for the life of the process.
#[derive(Clone, Copy, Debug)]
pub struct Library(*mut c_void);

// SAFETY: a dlopen handle is a process-wide token; dlsym on it is thread-safe.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

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
        let c_name = CString::new(name.as_os_str().as_encoded_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
        let flags = RTLD_NOW | if scope == Scope::Global { RTLD_GLOBAL } else { 0 };
        // SAFETY: dlopen with a valid C string; the result is checked.
        let handle = unsafe { dlopen(c_name.as_ptr(), flags) };
        if handle.is_null() {
            Err(last_error())
        } else {
            Ok(Library(handle))
        }
    }

    /// `name` if this process has already loaded it (by that soname or path), without loading anything.
    pub fn already_loaded(name: &Path) -> Option<Self> {
        let c_name = CString::new(name.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: dlopen with a valid C string; RTLD_NOLOAD only looks.
        let handle = unsafe { dlopen(c_name.as_ptr(), RTLD_NOW | RTLD_NOLOAD) };
        (!handle.is_null()).then_some(Library(handle))
    }

    /// The address of `symbol`, if the library (or one it loaded) exports it.
    pub fn symbol(&self, symbol: &CStr) -> Option<*mut c_void> {
        // SAFETY: valid handle and C string.
        let ptr = unsafe { dlsym(self.0, symbol.as_ptr()) };
        (!ptr.is_null()).then_some(ptr)
    }
}

fn last_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by the C library.
    let msg = unsafe { dlerror() };
    if msg.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    }
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
