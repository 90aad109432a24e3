//! Finding or provisioning the ONNX Runtime shared library, so users never have to install it by hand.
//!
//! Resolution order (see [`Locator::resolve`]):
//! 1. `ORT_DYLIB_PATH`, when set: the user's explicit choice wins, and a missing file is an error rather than
//!    a silent fallback to something else;
//! 2. the per-user cache (`$BETADPO_CACHE_DIR`, else `$XDG_CACHE_HOME/betadpo`, else `~/.cache/betadpo`);
//! 3. provisioning into that cache from the official PyPI wheel (`pip download`, which reuses pip's own cache),
//!    or, failing that, by copying the libraries of an already installed Python package of the same version.
//!
//! Provisioning holds an exclusive lock file so that concurrent processes (e.g. `cargo test` binaries) provision
//! once, and every file is written under a temporary name and renamed into place, the main library last, so a
//! reader that sees the main library also sees everything next to it, complete.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::wheel::{self, Wheel, WheelSource};
use crate::{Error, Result};

/// The ONNX Runtime release betadpo is built and tested against (the CPU build).
pub const ORT_VERSION: &str = "1.32.0";
/// File name of the CPU build's main library inside the wheel and inside the cache.
pub const LIB_NAME: &str = "libonnxruntime.so.1.32.0";
/// The GPU build's release: `onnxruntime-gpu` 1.32.0 is not on PyPI (its newest is 1.31.1, built with
/// CUDA 13), and the graphs use standard ops that 1.31 runs as well.
pub const GPU_ORT_VERSION: &str = "1.31.1";
const GPU_LIB_NAME: &str = "libonnxruntime.so.1.31.1";
/// The release series accepted, also when the user points `ORT_DYLIB_PATH` at their own build.
pub const ORT_SERIES: &[&str] = &["1.32.", "1.31."];
/// Next to the GPU build's libraries: the CUDA version it was built against (`13.0`), read from the wheel's
/// `onnxruntime/capi/build_and_package_info.py`; it decides which NVIDIA runtime wheels to provision.
pub const CUDA_VERSION_FILE: &str = "cuda_version";
const BUILD_INFO: &str = "build_and_package_info.py";

/// Which build of ONNX Runtime a process loads. A process loads exactly one; the GPU build also runs CPU sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// The `onnxruntime` wheel: CPU execution provider only.
    Cpu,
    /// The `onnxruntime-gpu` wheel: adds the CUDA and TensorRT execution providers.
    Gpu,
}

impl Flavor {
    /// The PyPI distribution that carries this build.
    pub fn package(self) -> &'static str {
        match self {
            Flavor::Cpu => "onnxruntime",
            Flavor::Gpu => "onnxruntime-gpu",
        }
    }

    /// The cache subdirectory; CPU and GPU builds live apart because their main libraries share a file name.
    pub fn dir_name(self) -> String {
        format!("{}-{}", self.package(), self.version())
    }

    /// The release of this build betadpo provisions.
    pub fn version(self) -> &'static str {
        match self {
            Flavor::Cpu => ORT_VERSION,
            Flavor::Gpu => GPU_ORT_VERSION,
        }
    }

    /// The main library's file name in the wheel and in the cache.
    pub fn lib_name(self) -> &'static str {
        match self {
            Flavor::Cpu => LIB_NAME,
            Flavor::Gpu => GPU_LIB_NAME,
        }
    }

    /// Libraries that must sit next to the main one for this flavor to be usable; the main library comes last.
    fn required_files(self) -> &'static [&'static str] {
        match self {
            Flavor::Cpu => &[LIB_NAME],
            Flavor::Gpu => &["libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so", GPU_LIB_NAME],
        }
    }
}

/// Where to look for the library. Built from the environment by [`Locator::from_env`], or by hand (tests use a
/// private cache directory this way without touching process-wide environment variables).
#[derive(Clone, Debug)]
pub struct Locator {
    /// The value of `ORT_DYLIB_PATH`, if set and non-empty.
    pub dylib_override: Option<PathBuf>,
    /// The betadpo cache directory.
    pub cache_dir: PathBuf,
    /// Where pip gets wheels (PyPI unless a test says otherwise).
    pub wheels: WheelSource,
}

impl Locator {
    /// Reads `ORT_DYLIB_PATH` and the cache directory variables.
    pub fn from_env() -> Result<Self> {
        let dylib_override = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(PathBuf::from);
        Ok(Locator { dylib_override, cache_dir: default_cache_dir()?, wheels: WheelSource::default() })
    }

    /// A locator for `cache_dir` only, ignoring `ORT_DYLIB_PATH` (tests and tools with a private cache).
    pub fn in_cache(cache_dir: &Path, wheels: WheelSource) -> Self {
        Locator { dylib_override: None, cache_dir: cache_dir.to_path_buf(), wheels }
    }

    /// Where the cache keeps the main library of `flavor`.
    pub fn cached_library(&self, flavor: Flavor) -> PathBuf {
        self.cache_dir.join(flavor.dir_name()).join(flavor.lib_name())
    }

    /// Returns the library to load for `flavor`, provisioning it into the cache if needed.
    pub fn resolve(&self, flavor: Flavor) -> Result<PathBuf> {
        if let Some(path) = &self.dylib_override {
            if !path.is_file() {
                return Err(Error::Runtime(format!(
                    "ORT_DYLIB_PATH is set to {} but no such file exists; point it at libonnxruntime.so.{ORT_VERSION} \
                     or unset it to let betadpo provision ONNX Runtime {ORT_VERSION} itself",
                    path.display()
                )));
            }
            return Ok(path.clone());
        }
        let cached = self.cached_library(flavor);
        if is_complete(&cached, flavor) {
            return Ok(cached);
        }
        provision(&self.cache_dir, flavor, &self.wheels)
    }
}

/// The main library is written last, so its presence means the directory is complete; the GPU build also
/// needs its CUDA version (caches written before that file existed are provisioned again).
fn is_complete(main_lib: &Path, flavor: Flavor) -> bool {
    main_lib.is_file() && (flavor == Flavor::Cpu || main_lib.with_file_name(CUDA_VERSION_FILE).is_file())
}

/// The CUDA version (e.g. `13.0`) the provisioned GPU build next to `main_lib` was built against.
pub fn cuda_version_of(main_lib: &Path) -> Result<String> {
    let path = main_lib.with_file_name(CUDA_VERSION_FILE);
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    Ok(text.trim().to_string())
}

/// Reads `cuda_version = '13.0'` from the GPU package's `build_and_package_info.py`.
fn parse_cuda_version(build_info: &str, source: &Path) -> Result<String> {
    build_info
        .lines()
        .find_map(|l| l.trim().strip_prefix("cuda_version")?.trim_start().strip_prefix('=').map(|v| v.trim().trim_matches(['\'', '"']).to_string()))
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::BadPackage {
            path: source.to_path_buf(),
            detail: format!("{BUILD_INFO} names no cuda_version; is this really the onnxruntime-gpu build?"),
        })
}

/// `$BETADPO_CACHE_DIR`, else `$XDG_CACHE_HOME/betadpo`, else `~/.cache/betadpo`.
pub fn default_cache_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("BETADPO_CACHE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("betadpo"));
    }
    if let Some(home) = var("HOME") {
        return Ok(home.join(".cache").join("betadpo"));
    }
    Err(Error::Runtime("cannot choose a cache directory for ONNX Runtime: none of BETADPO_CACHE_DIR, XDG_CACHE_HOME, HOME is set".into()))
}

/// Puts the `flavor` libraries into `cache_dir/<package>-<version>/` and returns the main library's path.
///
/// Safe to call from many threads and processes at once: all but one wait on the lock and then find the files.
pub fn provision(cache_dir: &Path, flavor: Flavor, wheels: &WheelSource) -> Result<PathBuf> {
    let main_lib = cache_dir.join(flavor.dir_name()).join(flavor.lib_name());
    let what = format!("ONNX Runtime {} ({})", flavor.version(), flavor.package());
    let complete = || is_complete(&main_lib, flavor).then(|| main_lib.clone());
    wheel::provision_once(cache_dir, &flavor.dir_name(), &what, complete, |target_dir| fill(cache_dir, target_dir, flavor, wheels).map(|()| main_lib.clone()))
}

/// Downloads the wheel and extracts it, or failing that copies an installed Python package of the same release.
fn fill(cache_dir: &Path, target_dir: &Path, flavor: Flavor, wheels: &WheelSource) -> Result<()> {
    let spec = format!("{}=={}", flavor.package(), flavor.version());
    let from_wheel = wheel::download(wheels, cache_dir, &[spec]).and_then(|got| extract_from_wheel(got.require(flavor.package())?, target_dir, flavor));
    let first_error = match from_wheel {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    match copy_from_installed_package(target_dir, flavor) {
        Ok(()) => {
            eprintln!("(pip download failed: {first_error}; copied the installed Python package instead)");
            Ok(())
        }
        Err(second_error) => Err(Error::Runtime(format!(
            "could not provision ONNX Runtime {version}: downloading the `{pkg}` wheel failed ({first_error}), \
             and no usable installed `{pkg}` Python package was found ({second_error}). \
             Fix: run `pip install {pkg}=={version}`, or set ORT_DYLIB_PATH=/path/to/{lib}",
            version = flavor.version(),
            pkg = flavor.package(),
            lib = flavor.lib_name()
        ))),
    }
}

/// Extracts every `onnxruntime/capi/libonnxruntime*.so*` member of the wheel, the main library last.
fn extract_from_wheel(path: &Path, target_dir: &Path, flavor: Flavor) -> Result<()> {
    let mut wheel = Wheel::open(path)?;
    let mut members: Vec<(String, String)> = wheel
        .members()
        .into_iter()
        .filter_map(|name| {
            let base = name.strip_prefix("onnxruntime/capi/")?;
            (base.starts_with("libonnxruntime") && base.contains(".so") && !base.contains('/')).then(|| (name.to_string(), base.to_string()))
        })
        .collect();
    check_required(flavor, members.iter().map(|(_, b)| b.as_str()), path)?;
    if flavor == Flavor::Gpu {
        let info = wheel.read_text(&format!("onnxruntime/capi/{BUILD_INFO}"))?;
        write_cuda_version(target_dir, &parse_cuda_version(&info, path)?)?;
    }
    members.sort_by_key(|(_, base)| base == flavor.lib_name()); // the main library last
    for (name, base) in members {
        wheel.extract(&name, &target_dir.join(&base))?;
    }
    Ok(())
}

fn write_cuda_version(target_dir: &Path, version: &str) -> Result<()> {
    crate::temp_files::write_atomically(&target_dir.join(CUDA_VERSION_FILE), 0o644, |out| writeln!(out, "{version}"))
}

/// Fallback for machines where pip cannot download: copy the libraries of an installed package of the same
/// version. Asks Python where the package lives without importing it (importing may be slow or fail).
fn copy_from_installed_package(target_dir: &Path, flavor: Flavor) -> Result<()> {
    let script = format!(
        "import importlib.metadata as m, importlib.util as u\n\
         print(m.version('{}'))\n\
         print(u.find_spec('onnxruntime').submodule_search_locations[0])",
        flavor.package()
    );
    let output =
        Command::new("python3").args(["-c", &script]).stdin(Stdio::null()).output().map_err(|e| Error::Provision(format!("cannot run python3: {e}")))?;
    if !output.status.success() {
        return Err(Error::Provision(format!("`{}` is not installed for python3", flavor.package())));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let (version, location) = (lines.next().unwrap_or("").trim(), lines.next().unwrap_or("").trim());
    if version != flavor.version() {
        return Err(Error::Provision(format!("installed `{}` is version {version}, not {}", flavor.package(), flavor.version())));
    }
    let capi = Path::new(location).join("capi");
    let mut names: Vec<String> = fs::read_dir(&capi)
        .map_err(|e| Error::io(&capi, e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("libonnxruntime") && n.contains(".so"))
        .collect();
    check_required(flavor, names.iter().map(String::as_str), &capi)?;
    if flavor == Flavor::Gpu {
        let info_path = capi.join(BUILD_INFO);
        let info = fs::read_to_string(&info_path).map_err(|e| Error::io(&info_path, e))?;
        write_cuda_version(target_dir, &parse_cuda_version(&info, &capi)?)?;
    }
    names.sort_by_key(|n| n == flavor.lib_name());
    for name in names {
        let src = capi.join(&name);
        let mut input = File::open(&src).map_err(|e| Error::io(&src, e))?;
        crate::temp_files::write_atomically(&target_dir.join(&name), 0o755, |out| io::copy(&mut input, out).map(|_| ()))?;
    }
    Ok(())
}

fn check_required<'a>(flavor: Flavor, present: impl Iterator<Item = &'a str>, source: &Path) -> Result<()> {
    let present: Vec<&str> = present.collect();
    let missing: Vec<&str> = flavor.required_files().iter().copied().filter(|f| !present.contains(f)).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::PackageLacks { path: source.to_path_buf(), missing: missing.join(", ") })
    }
}
