//! Opening the files betadpo reads: regular files only, opened so that a FIFO cannot block the
//! open and a device cannot feed endless bytes, optionally confined to a directory (a symbolic link
//! inside artifacts or a run may point within it, never elsewhere), and read no further than the
//! length the file had when it was opened.
//!
//! Every reader of a file a user hands over (`--model`, `--data`, `--tokenizer`) or betadpo wrote
//! (artifacts, runs, checkpoints, exports) goes through [`open_regular`] or [`open_inside`].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Kernel-provided trees whose "regular" files have no fixed length (or are memory, e.g.
/// `/proc/self/mem`): refused wherever a link leads.
const PSEUDO_ROOTS: [&str; 3] = ["/proc", "/sys", "/dev"];

fn refuse(path: &Path, detail: impl Into<String>) -> Error {
    Error::NotRegularFile { path: path.to_path_buf(), detail: detail.into() }
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading (following symbolic links, as a user's own file may be one, e.g. in
/// the Hugging Face cache) and checks that what was opened is a regular file outside `/proc`,
/// `/sys` and `/dev`. The open never blocks: it is non-blocking, so a FIFO with no writer is
/// opened, seen by `fstat` and refused.
pub fn open_regular(path: &Path) -> Result<File> {
    check_target(path, None)?;
    open_checked(path)
}

/// Refuses `path` when it resolves into the kernel's trees or, given `dir`, out of `dir`; the
/// target is only resolved, never opened.
fn check_target(path: &Path, dir: Option<&Path>) -> Result<PathBuf> {
    let resolved = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    if PSEUDO_ROOTS.iter().any(|r| resolved.starts_with(r)) {
        return Err(refuse(path, format!("resolves to {}, a kernel file rather than one on disk", resolved.display())));
    }
    if let Some(dir) = dir {
        let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        if !resolved.starts_with(&root) {
            return Err(refuse(path, format!("leads to {}, outside {}; betadpo reads only files inside it", resolved.display(), dir.display())));
        }
    }
    Ok(resolved)
}

fn open_checked(path: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(path, format!("is {}; betadpo reads only regular files", kind_of(&meta.file_type()))));
    }
    Ok(file)
}

/// Where `path` leads, when it stays inside `dir` (both resolved through their symbolic links)
/// and out of the kernel's trees; a refusal naming the target otherwise.
pub fn resolve_inside(dir: &Path, path: &Path) -> Result<PathBuf> {
    check_target(path, Some(dir))
}

/// [`open_regular`] for a file of a directory betadpo wrote (artifacts, a run, a checkpoint, an
/// export): a symbolic link may point only within `dir`.
pub fn open_inside(dir: &Path, path: &Path) -> Result<File> {
    check_target(path, Some(dir))?;
    open_checked(path)
}

/// Reads all of an opened regular file, no more than its length at open: a file that grows while
/// read (or lies about its size) cannot make the reader allocate more than that.
pub fn read_opened(path: &Path, file: File) -> Result<Vec<u8>> {
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let len = usize::try_from(len).map_err(|_| refuse(path, format!("is {len} bytes, more than this machine can address")))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| refuse(path, format!("is {len} bytes, more than can be held in memory")))?;
    file.take(len as u64).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The bytes of a user's regular file (see [`open_regular`]).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    read_opened(path, open_regular(path)?)
}

/// The text of a user's regular file.
pub fn read_to_string(path: &Path) -> Result<String> {
    utf8(path, read(path)?)
}

/// The bytes of a file inside `dir` (see [`open_inside`]).
pub fn read_inside(dir: &Path, path: &Path) -> Result<Vec<u8>> {
    read_opened(path, open_inside(dir, path)?)
}

/// The text of a file inside `dir`.
pub fn read_to_string_inside(dir: &Path, path: &Path) -> Result<String> {
    utf8(path, read_inside(dir, path)?)
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text ({e})"))))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn fifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn regular_files_are_read_whole() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_to_string(&f).unwrap(), "{}");
        assert_eq!(read_to_string_inside(d.path(), &f).unwrap(), "{}");
    }

    #[test]
    fn fifos_devices_and_kernel_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("params.safetensors");
        fifo(&p);
        let e = read(&p).unwrap_err().to_string();
        assert!(e.ends_with("is a FIFO; betadpo reads only regular files"), "{e}");
        let zero = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read(&zero).unwrap_err().to_string().contains("kernel file"));
        assert!(read(Path::new("/proc/self/status")).unwrap_err().to_string().contains("kernel file"));
        assert!(read(d.path()).unwrap_err().to_string().contains("is a directory"));
    }

    #[test]
    fn links_may_stay_inside_their_directory_only() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("art");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("real.json"), "1").unwrap();
        std::fs::write(outer.path().join("secret"), "2").unwrap();
        std::os::unix::fs::symlink("real.json", dir.join("inner.json")).unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("outer.json")).unwrap();
        assert_eq!(read_to_string_inside(&dir, &dir.join("inner.json")).unwrap(), "1");
        let e = read_inside(&dir, &dir.join("outer.json")).unwrap_err().to_string();
        assert!(e.contains("outside") && e.contains("secret"), "{e}");
        // a user's own file may be a link anywhere (outside the kernel's trees)
        assert_eq!(read_to_string(&dir.join("outer.json")).unwrap(), "2");
    }
}
