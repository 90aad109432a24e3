//! The NVIDIA libraries ONNX Runtime's GPU build needs (CUDA runtime, cuBLAS, cuFFT, cuRAND, NVRTC, cuDNN, and
//! TensorRT for its provider), provisioned from NVIDIA's PyPI wheels into the betadpo cache and preloaded in
//! dependency order, the way `onnxruntime.preload_dlls()` does it in Python.
//!
//! Which wheels depends on the CUDA major version the GPU build was made with (`build_and_package_info.py` in
//! its wheel): CUDA 12 ships one wheel per component (`nvidia-cublas-cu12`, libraries in `nvidia/cublas/lib/`),
//! CUDA 13 consolidated them (`nvidia-cublas`, libraries in `nvidia/cu13/lib/`). Only the names and the order
//! differ; both are flattened into one cache directory, where the libraries' `$ORIGIN` run paths find each
//! other (cuDNN opens its sub-libraries lazily by name, next to itself).
//!
//! A directory is complete only once its manifest (`provisioned.json`, written last and atomically) exists and
//! every library it lists is there: an interrupted download never looks complete. Provisioning holds a lock
//! file per directory, so concurrent processes download once.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wheel::{self, Wheel, WheelSource};
use crate::{Error, Result};

/// The manifest file of a provisioned directory.
pub const MANIFEST: &str = "provisioned.json";
/// The TensorRT major version the ONNX Runtime 1.3x provider links against (`libnvinfer.so.10`).
pub const TENSORRT_MAJOR: u32 = 10;

/// What a GPU execution provider needs beyond ONNX Runtime's own GPU build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuStack {
    /// CUDA runtime libraries and cuDNN.
    Cuda,
    /// The CUDA stack and TensorRT.
    TensorRt,
}

/// One library of a set, in preload order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// PyPI distribution carrying it.
    pub package: String,
    /// Requirement handed to pip (package and version range).
    pub spec: String,
    /// File name (the soname), e.g. `libcublasLt.so.12`.
    pub file: String,
    /// `preload_dlls` skips NVRTC and cuFFT quietly when absent; every other library must be there.
    pub required: bool,
}

/// A set of libraries provisioned together into one cache directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibrarySet {
    /// Cache subdirectory, e.g. `nvidia-cuda12-libs`.
    pub dir_name: String,
    /// For messages, e.g. `CUDA 12 / cuDNN 9`.
    pub what: String,
    /// In preload order: a library comes after the ones it needs.
    pub libraries: Vec<Wanted>,
}

impl LibrarySet {
    /// Distinct packages with their specs, in first-use order.
    pub fn packages(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for w in &self.libraries {
            if !out.iter().any(|(p, _)| *p == w.package) {
                out.push((&w.package, &w.spec));
            }
        }
        out
    }
}

/// The CUDA major version from a version string such as `12.8` or `13.0`.
pub fn cuda_major(cuda_version: &str) -> Result<u32> {
    cuda_version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| Error::Runtime(format!("cannot read a CUDA version from '{cuda_version}'")))
}

/// The library sets `stack` needs on a GPU build made with CUDA `cuda_version`, the CUDA set first.
pub fn library_sets(cuda_version: &str, stack: GpuStack) -> Result<Vec<LibrarySet>> {
    let major = cuda_major(cuda_version)?;
    if major < 12 {
        return Err(Error::Runtime(format!("the ONNX Runtime GPU build was made with CUDA {cuda_version}; betadpo provisions CUDA 12 and newer only")));
    }
    let mut sets = vec![cuda_set(major)];
    if stack == GpuStack::TensorRt {
        sets.push(tensorrt_set(major));
    }
    Ok(sets)
}

/// The order and names of `onnxruntime.preload_dlls()` on Linux (`_get_nvidia_dll_paths`): cuBLASLt before
/// cuBLAS (which needs it), NVRTC, cuRAND, cuFFT, the CUDA runtime, then cuDNN's main library.
fn cuda_set(major: u32) -> LibrarySet {
    // CUDA 13 dropped the `-cuNN` suffix from the toolkit wheels and versions them by the toolkit major;
    // cuFFT is 11.x with CUDA 12 and 12.x with CUDA 13, cuRAND 10.x with both.
    let (suffix, cufft) = if major >= 13 { (String::new(), major - 1) } else { (format!("-cu{major}"), 11) };
    let toolkit_range = |m: u32| if major >= 13 { format!(">={m},<{}", m + 1) } else { String::new() };
    let lib = |package: &str, range: String, file: String, required: bool| Wanted {
        package: format!("{package}{suffix}"),
        spec: format!("{package}{suffix}{range}"),
        file,
        required,
    };
    let libraries = vec![
        lib("nvidia-cublas", toolkit_range(major), format!("libcublasLt.so.{major}"), true),
        lib("nvidia-cublas", toolkit_range(major), format!("libcublas.so.{major}"), true),
        lib("nvidia-cuda-nvrtc", toolkit_range(major), format!("libnvrtc.so.{major}"), false),
        lib("nvidia-curand", toolkit_range(10), "libcurand.so.10".into(), true),
        lib("nvidia-cufft", toolkit_range(cufft), format!("libcufft.so.{cufft}"), false),
        lib("nvidia-cuda-runtime", toolkit_range(major), format!("libcudart.so.{major}"), true),
        Wanted { package: format!("nvidia-cudnn-cu{major}"), spec: format!("nvidia-cudnn-cu{major}>=9,<10"), file: "libcudnn.so.9".into(), required: true },
    ];
    LibrarySet { dir_name: format!("nvidia-cuda{major}-libs"), what: format!("CUDA {major} / cuDNN 9"), libraries }
}

/// NCCL, for the gradient allreduce of several ranks on GPUs (`distributed::nccl`): PyPI's
/// `nvidia-nccl-cuNN` wheel, 2.19 or newer (the releases that build for CUDA 12.x and 13.x).
pub fn nccl_set(cuda_version: &str) -> Result<LibrarySet> {
    let major = cuda_major(cuda_version)?;
    let package = format!("nvidia-nccl-cu{major}");
    Ok(LibrarySet {
        dir_name: format!("nvidia-nccl-cuda{major}-libs"),
        what: format!("NCCL 2 for CUDA {major}"),
        libraries: vec![Wanted { spec: format!("{package}>=2.19,<3"), package, file: "libnccl.so.2".into(), required: true }],
    })
}

/// TensorRT's core, its plugins and the ONNX parser (the provider links `libnvinfer` and `libnvonnxparser`).
fn tensorrt_set(major: u32) -> LibrarySet {
    let package = format!("tensorrt-cu{major}-libs");
    let spec = format!("{package}>={TENSORRT_MAJOR},<{}", TENSORRT_MAJOR + 1);
    let lib = |file: &str, required: bool| Wanted { package: package.clone(), spec: spec.clone(), file: format!("{file}.so.{TENSORRT_MAJOR}"), required };
    LibrarySet {
        dir_name: format!("tensorrt{TENSORRT_MAJOR}-cuda{major}-libs"),
        what: format!("TensorRT {TENSORRT_MAJOR} for CUDA {major}"),
        libraries: vec![lib("libnvinfer", true), lib("libnvinfer_plugin", false), lib("libnvonnxparser", true)],
    }
}

/// A library as provisioned: which wheel it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionedLibrary {
    pub package: String,
    pub version: String,
    pub file: String,
    /// An optional library that fails to load is skipped, as `preload_dlls` skips it.
    #[serde(default = "required_by_default")]
    pub required: bool,
}

fn required_by_default() -> bool {
    true
}

/// A complete provisioned directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provisioned {
    pub dir: PathBuf,
    /// In preload order; optional libraries a wheel did not carry are absent.
    pub libraries: Vec<ProvisionedLibrary>,
}

impl Provisioned {
    pub fn paths(&self) -> Vec<PathBuf> {
        self.libraries.iter().map(|l| self.dir.join(&l.file)).collect()
    }
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    libraries: Vec<ProvisionedLibrary>,
}

/// The provisioned `set` under `cache_dir`, if complete (manifest present and every listed library there).
pub fn find(cache_dir: &Path, set: &LibrarySet) -> Option<Provisioned> {
    let dir = cache_dir.join(&set.dir_name);
    let manifest: Manifest = serde_json::from_slice(&fs::read(dir.join(MANIFEST)).ok()?).ok()?;
    manifest.libraries.iter().all(|l| dir.join(&l.file).is_file()).then_some(Provisioned { dir, libraries: manifest.libraries })
}

/// Returns the provisioned `set`, downloading and extracting it first if needed.
pub fn provision(cache_dir: &Path, set: &LibrarySet, source: &WheelSource) -> Result<Provisioned> {
    let what = format!("the {} libraries", set.what);
    wheel::provision_once(
        cache_dir,
        &set.dir_name,
        &what,
        || find(cache_dir, set),
        |dir| {
            fill(cache_dir, dir, set, source).map_err(|e| {
                Error::Runtime(format!(
                    "could not provision the {} libraries: {e}. Fix: allow pip to reach PyPI, or install them yourself, put \
                 them on LD_LIBRARY_PATH and set ORT_DYLIB_PATH to an onnxruntime-gpu libonnxruntime.so",
                    set.what
                ))
            })?;
            find(cache_dir, set).ok_or_else(|| Error::Runtime(format!("{}: provisioned, yet {MANIFEST} does not list complete files", dir.display())))
        },
    )
}

fn fill(cache_dir: &Path, dir: &Path, set: &LibrarySet, source: &WheelSource) -> Result<()> {
    let packages = set.packages();
    let specs: Vec<String> = packages.iter().map(|(_, spec)| spec.to_string()).collect();
    let downloaded = wheel::download(source, cache_dir, &specs)?;
    let mut versions = Vec::new();
    for (package, _) in &packages {
        let path = downloaded.require(package)?;
        let version = wheel::wheel_name_and_version(path).map(|(_, v)| v).unwrap_or_default();
        let extracted = extract_libraries(path, dir)?;
        for wanted in set.libraries.iter().filter(|w| w.package == *package && w.required) {
            if !extracted.contains(&wanted.file) {
                return Err(Error::WheelLacks { package: package.to_string(), version, file: wanted.file.clone() });
            }
        }
        versions.push((package.to_string(), version));
    }
    let libraries: Vec<ProvisionedLibrary> = set
        .libraries
        .iter()
        .filter(|w| dir.join(&w.file).is_file())
        .map(|w| {
            let version = versions.iter().find(|(p, _)| *p == w.package).map(|(_, v)| v.clone()).unwrap_or_default();
            ProvisionedLibrary { package: w.package.clone(), version, file: w.file.clone(), required: w.required }
        })
        .collect();
    let json = serde_json::to_vec_pretty(&Manifest { libraries }).expect("a manifest of strings serialises");
    crate::temp_files::write_atomically(&dir.join(MANIFEST), 0o644, |out| out.write_all(&json))
}

/// Extracts every shared library of a wheel, wherever it sits inside, flat into `dir`; returns their names.
fn extract_libraries(path: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut wheel = Wheel::open(path)?;
    let mut names = Vec::new();
    for member in wheel.members() {
        let Some(base) = member.rsplit('/').next().filter(|b| wheel::is_shared_library(b)) else { continue };
        // Python extension modules (`*.cpython-311-x86_64-linux-gnu.so`) are no use outside Python.
        if base.contains("cpython") || !base.starts_with("lib") {
            continue;
        }
        wheel.extract(&member, &dir.join(base))?;
        names.push(base.to_string());
    }
    Ok(names)
}
