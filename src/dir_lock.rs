//! One owner per output directory: betadpo takes an advisory lock (`flock`) on `.betadpo-lock` in
//! every directory it writes (a run, artifacts, an export, quickstart's folder) and holds it for the
//! rest of the process. The kernel releases it when the process ends however it ends, so a run
//! killed with `kill -9` leaves a lock file that blocks nothing; a second live process is refused in
//! one line naming the holder's pid, which the holder writes into the file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The lock file's name in every directory betadpo writes.
pub const LOCK_FILE: &str = ".betadpo-lock";

/// A directory this process holds until the value is dropped (a command holds it to its end).
/// Dropped with nothing but the lock file in the directory (the command failed before writing
/// anything), the lock file goes too, and the directory when it was created for the lock.
#[must_use = "the directory is unlocked when this is dropped"]
pub struct DirLock {
    dir: PathBuf,
    /// The directory did not exist before it was created to be locked.
    created: bool,
    /// Every lock file taken for `dir` (a directory swapped into place brings its own).
    files: Vec<File>,
}

/// Locks `dir`, created when absent; refused in one line naming the holder when another live
/// process (or another lock in this one) holds it.
pub fn hold(dir: &Path) -> Result<DirLock> {
    let created = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(Error::io(dir, e)),
        Ok(_) => false,
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // built only once locked: dropping it may remove the lock file, which is then ours
    let file = lock_in(dir)?;
    Ok(DirLock { dir: dir.to_path_buf(), created, files: vec![file] })
}

impl DirLock {
    /// Also locks `staging`, a directory that will be swapped into place as this one, so that the
    /// directory stays locked after the swap.
    pub fn add_staging(&mut self, staging: &Path) -> Result<()> {
        self.files.push(lock_in(staging)?);
        Ok(())
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let only_lock = std::fs::read_dir(&self.dir).map(|mut it| it.all(|e| e.is_ok_and(|e| is_lock_file(&e.file_name().to_string_lossy())))).unwrap_or(false);
        if only_lock && std::fs::remove_file(self.dir.join(LOCK_FILE)).is_ok() && self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Whether `name` is the lock file (which an empty output directory may hold).
pub fn is_lock_file(name: &str) -> bool {
    name == LOCK_FILE
}

/// Opens and locks `dir/.betadpo-lock`, retrying when the file was replaced between the open and
/// the lock (a directory swapped into place), then writes this process's id into it.
fn lock_in(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    for _ in 0..5 {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK).mode(0o644);
        }
        let mut file = options.open(&path).map_err(|e| Error::io(&path, e))?;
        if !file.metadata().map_err(|e| Error::io(&path, e))?.is_file() {
            return Err(Error::NotRegularFile { path, detail: "is not a regular file".into() });
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = (&file).take(256).read_to_string(&mut text);
                return Err(Error::Locked { path: dir.to_path_buf(), holder: describe_holder(&text) });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        if !same_file(&file, &path) {
            continue;
        }
        let me = format!("{} {}\n", std::process::id(), std::env::args().nth(1).unwrap_or_default());
        file.set_len(0).and_then(|()| file.write_all(me.as_bytes())).map_err(|e| Error::io(&path, e))?;
        return Ok(file);
    }
    Err(Error::Locked { path: dir.to_path_buf(), holder: "another betadpo process that keeps replacing it".into() })
}

/// The lock file's text (`<pid> <subcommand>`) as words for the refusal.
fn describe_holder(text: &str) -> String {
    let mut words = text.split_whitespace();
    match (words.next().and_then(|p| p.parse::<u32>().ok()), words.next()) {
        (Some(pid), Some(cmd)) => format!("betadpo process {pid} ({cmd})"),
        (Some(pid), None) => format!("betadpo process {pid}"),
        _ => "another betadpo process (starting)".into(),
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::symlink_metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_refused_to_another_lock_and_its_holder_named() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let held = hold(&run).unwrap();
        std::fs::write(run.join("metrics.jsonl"), "").unwrap();
        // another open file description conflicts as another process's would
        let e = hold(&run).err().unwrap().to_string();
        assert!(e.contains(&format!("in use by betadpo process {}", std::process::id())), "{e}");
        assert!(!e.contains('\n'));
        drop(held);
        let _again = hold(&run).unwrap();
    }

    #[test]
    fn a_dead_holders_lock_file_blocks_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LOCK_FILE), "999999999 train\n").unwrap();
        let f = lock_in(d.path()).unwrap();
        drop(f);
        let text = std::fs::read_to_string(d.path().join(LOCK_FILE)).unwrap();
        assert!(text.starts_with(&format!("{} ", std::process::id())), "{text}");
    }

    #[test]
    fn created_and_unused_directories_are_removed_on_release() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        std::fs::create_dir(&c).unwrap();
        let (la, lb, lc) = (hold(&a).unwrap(), hold(&b).unwrap(), hold(&c).unwrap());
        std::fs::write(b.join("metrics.jsonl"), "").unwrap();
        drop((la, lb, lc));
        assert!(!a.exists() && b.join("metrics.jsonl").exists() && b.join(LOCK_FILE).exists());
        assert!(c.is_dir() && std::fs::read_dir(&c).unwrap().count() == 0, "a user's empty folder stays, empty");
    }
}
