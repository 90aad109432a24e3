//! Getting wheels from PyPI with pip (which reuses its own download cache) and reading files out of them.
//!
//! Where pip looks is a [`WheelSource`], so tests can point it at a directory of small fake wheels instead of
//! the real index (the NVIDIA wheels are gigabytes).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// Where pip finds wheels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WheelSource {
    /// `None`: pip's configured index (PyPI). `Some(dir)`: only the wheels in `dir` (`--no-index --find-links`).
    pub find_links: Option<PathBuf>,
}

/// Wheels `pip download` put into a temporary directory inside the cache (same filesystem; removed on drop).
pub struct Downloaded {
    _dir: tempfile::TempDir,
    wheels: Vec<PathBuf>,
}

impl Downloaded {
    /// The wheel of distribution `name` (PEP 503 normalized comparison), if pip fetched it.
    pub fn wheel_of(&self, name: &str) -> Option<&Path> {
        self.wheels.iter().find(|w| wheel_name_and_version(w).is_some_and(|(n, _)| normalize(&n) == normalize(name))).map(PathBuf::as_path)
    }

    /// The wheel of distribution `name`, or an error saying pip did not fetch it.
    pub fn require(&self, name: &str) -> Result<&Path> {
        self.wheel_of(name).ok_or_else(|| Error::NotDownloaded { package: name.to_string() })
    }
}

/// Provisions the cache directory `cache_dir/<dir_name>` once across threads and processes, the one routine
/// both the ONNX Runtime build and the NVIDIA libraries go through: creates the directory, holds the lock file
/// `<dir_name>.lock` beside it until this returns, gives what `complete` finds when an earlier holder already
/// finished, and otherwise announces `what` and runs `fill` (pip download, extract, mark complete).
pub fn provision_once<T>(cache_dir: &Path, dir_name: &str, what: &str, complete: impl Fn() -> Option<T>, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let dir = cache_dir.join(dir_name);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lock_path = cache_dir.join(format!("{dir_name}.lock"));
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?; // released when `lock` drops, on every return path
    if let Some(done) = complete() {
        return Ok(done);
    }
    eprintln!("provisioning {what} into {} ...", dir.display());
    fill(&dir)
}

/// Runs one `pip download --no-deps` for all `specs` (e.g. `nvidia-cublas-cu12>=12,<13`).
pub fn download(source: &WheelSource, cache_dir: &Path, specs: &[String]) -> Result<Downloaded> {
    let dir = tempfile::Builder::new().prefix(".wheel-").tempdir_in(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]).args([
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "60",
    ]);
    if let Some(links) = &source.find_links {
        pip.arg("--no-index").arg("--find-links").arg(links);
    }
    let output =
        pip.arg("-d").arg(dir.path()).args(specs).stdin(Stdio::null()).output().map_err(|e| Error::Provision(format!("cannot run `python3 -m pip`: {e}")))?;
    let what = format!("pip download {}", specs.join(" "));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return Err(Error::Provision(format!("`{what}` exited with {}: {}", output.status, last.trim())));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .map_err(|e| Error::io(dir.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    if wheels.is_empty() {
        return Err(Error::Provision(format!("`{what}` produced no wheel")));
    }
    Ok(Downloaded { _dir: dir, wheels })
}

/// Distribution name and version from a wheel's file name (`name-version-...-tag.whl`).
pub fn wheel_name_and_version(wheel: &Path) -> Option<(String, String)> {
    let stem = wheel.file_name()?.to_str()?.strip_suffix(".whl")?;
    let mut parts = stem.split('-');
    Some((parts.next()?.to_string(), parts.next()?.to_string()))
}

/// PEP 503 name normalization: case and the separators `-`, `_`, `.` do not matter.
pub fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace(['-', '.'], "_")
}

/// An opened wheel.
pub struct Wheel {
    path: PathBuf,
    archive: zip::ZipArchive<File>,
}

impl Wheel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let archive = zip::ZipArchive::new(file).map_err(|e| Error::BadPackage { path: path.to_path_buf(), detail: format!("not a valid wheel: {e}") })?;
        Ok(Wheel { path: path.to_path_buf(), archive })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Member paths, in archive order.
    pub fn members(&self) -> Vec<String> {
        self.archive.file_names().map(str::to_string).collect()
    }

    /// Copies member `name` into `to` atomically, executable (shared libraries are mapped with exec rights).
    pub fn extract(&mut self, name: &str, to: &Path) -> Result<()> {
        let mut entry = self.member(name)?;
        crate::temp_files::write_atomically(to, 0o755, |out| std::io::copy(&mut entry, out).map(|_| ()))
    }

    /// A small text member (e.g. `onnxruntime/capi/build_and_package_info.py`).
    pub fn read_text(&mut self, name: &str) -> Result<String> {
        let path = self.path.clone();
        let mut text = String::new();
        self.member(name)?.read_to_string(&mut text).map_err(|e| Error::BadPackage { path, detail: format!("{name}: {e}") })?;
        Ok(text)
    }

    fn member(&mut self, name: &str) -> Result<zip::read::ZipFile<'_, File>> {
        let path = &self.path;
        self.archive.by_name(name).map_err(|e| Error::BadPackage { path: path.clone(), detail: format!("cannot read {name}: {e}") })
    }
}

/// Whether a file name is a shared library (`libx.so`, `libx.so.12`, `libx.so.12.4.1`).
pub fn is_shared_library(base: &str) -> bool {
    base.ends_with(".so") || base.contains(".so.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_zip_is_a_bad_package_and_pip_misses_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("onnxruntime-1.32.0-py3-none-any.whl");
        std::fs::write(&path, b"not a zip").unwrap();
        let Err(e) = Wheel::open(&path) else { panic!("a non-zip opened as a wheel") };
        assert!(matches!(&e, Error::BadPackage { path: p, .. } if p == &path), "{e:?}");
        assert!(e.to_string().starts_with(&format!("{}: not a valid wheel: ", path.display())), "{e}");

        let got = Downloaded { _dir: tempfile::tempdir().unwrap(), wheels: vec![path] };
        assert_eq!(got.require("ONNXRuntime").unwrap(), got.wheels[0].as_path());
        let Err(e) = got.require("nvidia-cublas-cu12") else { panic!("a wheel pip did not fetch was found") };
        assert!(matches!(&e, Error::NotDownloaded { package } if package == "nvidia-cublas-cu12"));
        assert_eq!(e.to_string(), "pip did not download nvidia-cublas-cu12");
    }
}
