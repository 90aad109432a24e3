//! ONNX Runtime provisioning and sessions.
//!
//! betadpo loads ONNX Runtime 1.32.x (the GPU build: 1.31.x) dynamically and provisions it itself on first use (see [`provision`]), so
//! `cargo test` and the binary work without a manual install step.
//!
//! **One build per process.** A process loads either the CPU build (`onnxruntime` wheel) or the GPU build
//! (`onnxruntime-gpu` wheel, which adds the CUDA and TensorRT providers). The first call to [`init`] decides, from
//! the execution provider it is given: the binary calls `init(&ep)` with the user's `--ep` before anything else;
//! [`environment`] (used by tests and tools that only need the CPU) is `init(&ExecutionProvider::Cpu)`. Asking for a
//! GPU provider after the CPU build was loaded is a clear error, never a silent CPU fallback. `ORT_DYLIB_PATH`
//! overrides the choice entirely.
//!
//! Call [`init`] or [`environment`] before any other `ort` API: `ort` otherwise tries to load a library on its own.

pub(crate) mod dl;
pub mod doctor;
pub mod driver;
mod ep;
pub mod gpu_libs;
mod host_memory;
pub mod placement;
pub mod provision;
mod session;
mod shared_weights;
mod tensor;
pub mod tensorrt;
mod version;
pub mod wheel;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

pub use ep::{ExecutionProvider, EP_CHOICES};
pub use gpu_libs::{GpuStack, Provisioned};
pub use host_memory::{tune_heap, HeapUse};
pub use provision::{default_cache_dir, Flavor, Locator, GPU_ORT_VERSION, LIB_NAME, ORT_VERSION};
pub use session::{OptLevel, SessionConfig};
pub use shared_weights::SharedWeights;
pub use tensor::{f32_output, input_names, output_names, run, run_meta, HostTensor};
pub use version::library_version;

pub use ort::session::Session;

use crate::{Error, Result};

/// What this process loaded, for logs and error messages.
#[derive(Debug)]
pub struct LoadedLibrary {
    pub path: PathBuf,
    /// As reported by the library itself, e.g. `1.32.0`.
    pub version: String,
    /// The build that was asked for; with `ORT_DYLIB_PATH` the file may be either.
    pub flavor: Flavor,
}

struct Runtime {
    env: Environment,
    library: LoadedLibrary,
}

/// The outcome of the first initialization, success or failure, shared by all later callers. A failure is kept as
/// its message: retrying in the same process could not succeed (ort's library slot may already be taken).
static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// The process-wide environment on the CPU build (or whatever build an earlier [`init`] loaded).
pub fn environment() -> Result<&'static Environment> {
    init(&ExecutionProvider::Cpu)
}

/// Loads ONNX Runtime for `ep` (first call only; see the module docs) and returns the process-wide environment.
/// Thread-safe: concurrent first callers block until one of them has finished.
pub fn init(ep: &ExecutionProvider) -> Result<&'static Environment> {
    let outcome = RUNTIME.get_or_init(|| load(ep).map_err(|e| e.to_string()));
    match outcome {
        Ok(rt) => Ok(&rt.env),
        Err(msg) => Err(Error::Runtime(format!("could not be loaded: {msg}"))),
    }
}

/// The library this process loaded, once [`init`] has succeeded.
pub fn loaded_library() -> Option<&'static LoadedLibrary> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).map(|rt| &rt.library)
}

fn load(ep: &ExecutionProvider) -> Result<Runtime> {
    let flavor = ep.flavor();
    let locator = Locator::from_env()?;
    // With ORT_DYLIB_PATH the user brings the GPU build and its libraries (on the loader path) themselves.
    let provisioned_gpu = ep.gpu_stack().filter(|_| locator.dylib_override.is_none());
    if provisioned_gpu.is_some() {
        // Before downloading anything: without a driver nothing below could work.
        driver::cuda_driver_version().map_err(|why| ep.unavailable(why))?;
    }
    let path = locator.resolve(flavor)?;
    if let Some(stack) = provisioned_gpu {
        let cuda_major = gpu_libs::cuda_major(&provision::cuda_version_of(&path)?)?;
        driver::check_supports(cuda_major).map_err(|why| ep.unavailable(why))?;
        let libraries = provision_gpu_libraries(&locator, &path, stack).map_err(|e| ep.unavailable(e))?;
        libraries.iter().try_for_each(preload_gpu_libraries).map_err(|e| ep.unavailable(e))?;
    }
    let version = version::library_version(&path)?;
    version::check_version(&path, &version)?;
    let env = ort::init_from(&path)
        .map_err(|e| Error::Runtime(format!("loading {}: {e}", path.display())))?
        .with_name("betadpo")
        .with_telemetry(false)
        .build()
        .map_err(|e| Error::Runtime(format!("creating the environment from {}: {e}", path.display())))?;
    if std::env::var_os("ORT_LOG").is_none() {
        // Its errors come back to us, and are reported in one line; logged, they would be printed
        // again, over several ANSI-coloured lines, before it.
        env.set_log_level(ort::logging::LogLevel::Fatal);
    }
    Ok(Runtime { env, library: LoadedLibrary { path, version, flavor } })
}

/// Provisions (if not yet in the cache) the NVIDIA libraries `stack` needs next to the GPU build at
/// `ort_library`, in preload order: the CUDA set first, then TensorRT's.
pub fn provision_gpu_libraries(locator: &Locator, ort_library: &Path, stack: GpuStack) -> Result<Vec<Provisioned>> {
    let cuda_version = provision::cuda_version_of(ort_library)?;
    gpu_libs::library_sets(&cuda_version, stack)?.iter().map(|set| gpu_libs::provision(&locator.cache_dir, set, &locator.wheels)).collect()
}

/// Provisions NCCL for the loaded GPU build (once per cache) and loads it, so that
/// `distributed::nccl` finds `libnccl.so.2` by its soname. With `ORT_DYLIB_PATH` the user brings the
/// GPU stack, NCCL included, on the loader path, and nothing is provisioned.
pub fn provision_nccl() -> Result<()> {
    let locator = Locator::from_env()?;
    if locator.dylib_override.is_some() {
        return Ok(());
    }
    let loaded = loaded_library().ok_or_else(|| Error::Runtime("NCCL is provisioned after ONNX Runtime's GPU build is loaded".into()))?;
    let set = gpu_libs::nccl_set(&provision::cuda_version_of(&loaded.path)?)?;
    preload_gpu_libraries(&gpu_libs::provision(&locator.cache_dir, &set, &locator.wheels)?)
}

/// Loads a provisioned set globally, in its dependency order, so that ONNX Runtime's GPU provider library,
/// loaded later, finds each by its soname.
pub fn preload_gpu_libraries(set: &Provisioned) -> Result<()> {
    dl::preload(&set.paths(), |i| {
        let l = &set.libraries[i];
        (format!("{} (from {} {}, {})", l.file, l.package, l.version, set.dir.display()), l.required)
    })
}

/// Checks a library file without loading it into `ort`: returns its version if it is a usable 1.32.x build.
pub fn check_library(path: &Path) -> Result<String> {
    let version = version::library_version(path)?;
    version::check_version(path, &version)?;
    Ok(version)
}
