//! Names of the temporary files and directories betadpo writes before renaming them into place, and
//! removal of those a killed process left behind. A name carries its writer's process id, so a
//! sweep removes only leftovers of processes that no longer run, never a concurrent writer's.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

const FILE_PREFIX: &str = ".betadpo-tmp-";

/// Whether `name` is one of betadpo's temporary files (of any process).
pub fn is_temporary_file(name: &str) -> bool {
    name.starts_with(FILE_PREFIX)
}

/// Whether `name` is one of betadpo's temporary directories (a `.<name>.partial-<pid>` or
/// `.<name>.old-<pid>` being swapped into place).
pub fn is_temporary_dir(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else { return false };
    [".partial-", ".old-"].iter().any(|m| rest.rsplit_once(m).is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())))
}

/// Prefix for this process's temporary files (`tempfile` appends a random suffix).
pub fn file_prefix() -> String {
    format!("{FILE_PREFIX}{}-", std::process::id())
}

/// Name of this process's temporary directory for `name` (a directory swapped into place).
pub fn dir_name(name: &str) -> String {
    format!(".{name}.partial-{}", std::process::id())
}

/// [`write_atomically`] with the mode of an ordinary file, readable by everyone.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    write_atomically(path, 0o644, write)
}

/// Writes `path` through a temporary file of this process in the same directory, flushed to disk,
/// given `mode` (Unix permissions; temporary files start as 0600), then renamed over `path`: a reader
/// sees the old file or the complete new one, and a killed writer leaves only a temporary file that
/// [`remove_stale`] recognises.
pub fn write_atomically(path: &Path, mode: u32, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(&file_prefix()).tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Name of this process's copy of the previous `name` while a new one is moved into place.
pub fn old_dir_name(name: &str) -> String {
    format!(".{name}.old-{}", std::process::id())
}

/// Writes the directory `out` whole: `fill` writes every file into `.<out>.partial-<pid>` (leftovers
/// of killed writers are removed first), which is then swapped into place, so `out` is either the
/// previous complete directory or the new complete one, never a mix. An existing `out` is replaced
/// only when `claim` accepts it right before the swap (see `output_dir::claim`).
pub fn write_dir(out: &Path, claim: impl Fn(&Path) -> Result<()>, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out.file_name().ok_or_else(|| Error::BadPath { path: out.to_path_buf(), detail: "not a directory path".into() })?.to_string_lossy();
    // refused before the lock, which writes a file into `out`
    if std::fs::symlink_metadata(out).is_ok() {
        claim(out)?;
    }
    let mut lock = crate::dir_lock::hold(out)?;
    fill_and_swap(out, parent, &name, &mut lock, claim, fill)
}

fn fill_and_swap(
    out: &Path,
    parent: &Path,
    name: &str,
    lock: &mut crate::dir_lock::DirLock,
    claim: impl Fn(&Path) -> Result<()>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    remove_stale(parent, Some(name));
    let tmp = parent.join(dir_name(name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = lock.add_staging(&tmp).and_then(|()| fill(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        if let Err(e) = claim(out) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        swap_into_place(&tmp, out, parent, name)?;
    } else {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    }
    Ok(())
}

/// Replaces the directory `out` by `tmp`. On Linux one `renameat2(RENAME_EXCHANGE)` swaps them, so
/// `out` is always a complete build; `tmp` then holds the previous build and is removed (a kill
/// before that leaves it for `temp_files::remove_stale`). Elsewhere, or on a file system without the
/// exchange, `out` moves aside to `.<out>.old-<pid>` first.
fn swap_into_place(tmp: &Path, out: &Path, parent: &Path, name: &str) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::BadPath { path: p.to_path_buf(), detail: "path contains a NUL byte".into() })
        };
        let (a, b) = (c(tmp)?, c(out)?);
        // SAFETY: both paths are valid NUL-terminated strings; renameat2 only reads them.
        let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            let _ = std::fs::remove_dir_all(tmp);
            return Ok(());
        }
    }
    let old = parent.join(old_dir_name(name));
    std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The writer's process id of one of our temporary files.
fn file_writer(name: &str) -> Option<u32> {
    name.strip_prefix(FILE_PREFIX)?.split('-').next()?.parse().ok()
}

/// The writer's process id of a temporary directory for `dir_for` (see [`dir_name`] and
/// [`old_dir_name`]).
fn dir_writer(name: &str, dir_for: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_prefix(dir_for)?;
    rest.strip_prefix(".partial-").or_else(|| rest.strip_prefix(".old-"))?.parse().ok()
}

fn is_running(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes our temporary files in `dir` whose writer no longer runs, and with `dir_for`, the
/// temporary directories of that output name too; returns how many. Errors are ignored: a leftover
/// that cannot be removed is harmless, it is never read.
pub fn remove_stale(dir: &Path, dir_for: Option<&str>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_writer(&name).or_else(|| dir_for.and_then(|d| dir_writer(&name, d))) else { continue };
        if pid == std::process::id() || is_running(pid) {
            continue;
        }
        let path = e.path();
        let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed += gone.is_ok() as usize;
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_leftovers_of_dead_writers_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        let names = [
            format!("{FILE_PREFIX}{dead}-abc"),
            format!(".artifacts.partial-{dead}"),
            format!("{FILE_PREFIX}{mine}-def"),
            "params.safetensors".to_string(),
            format!(".artifacts.old-{dead}"),
        ];
        for n in [&names[0], &names[2], &names[3]] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        for d in [&names[1], &names[4]] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join("train.onnx"), b"x").unwrap();
        }
        assert_eq!(remove_stale(dir.path(), None), 1, "directories only for their output name");
        assert_eq!(remove_stale(dir.path(), Some("artifacts")), 2);
        assert!(!dir.path().join(&names[0]).exists());
        assert!(!dir.path().join(&names[1]).exists() && !dir.path().join(&names[4]).exists());
        assert!(dir.path().join(&names[2]).exists(), "a running writer's file stays");
        assert!(dir.path().join(&names[3]).exists());
    }
}
