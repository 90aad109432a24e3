//! Which directories betadpo may write into, replace or clear: an absent or empty one, or one that
//! already holds betadpo's own output of the same kind (artifacts carry their `manifest.json`, a
//! run its `train_config.json`, a quickstart directory a marker file). Anything else, such as a
//! user's `~/notes` named by mistake as `--out`, is refused in one line and left untouched.
//!
//! Each layer says what its own output looks like (`is_ours`), so this module depends on none of
//! them.

use std::path::Path;

use crate::{Error, Result};

/// The marker file of a run or quickstart directory; it holds the kind of output (`run`, ...).
pub const MARKER: &str = ".betadpo-output";

/// Marks `dir` (which must exist) as holding betadpo's output of `kind`, before anything else is
/// written there, so that a run killed early can still be resumed or replaced.
pub fn mark(dir: &Path, kind: &str) -> Result<()> {
    crate::temp_files::write_atomically(&dir.join(MARKER), 0o644, |w| std::io::Write::write_all(w, kind.as_bytes()))
}

/// Whether `dir` carries the marker of `kind`.
pub fn marked(dir: &Path, kind: &str) -> bool {
    crate::fs_guard::read_inside(dir, &dir.join(MARKER)).map(|b| b == kind.as_bytes()).unwrap_or(false)
}

/// What an output directory must hold to count as betadpo's, for the refusal message.
pub struct Kind<'a> {
    /// The command-line flag that named the directory, e.g. `--out`.
    pub flag: &'a str,
    /// Human words for the output, e.g. "betadpo artifacts (manifest.json)".
    pub what: &'a str,
    /// Whether the directory may be replaced or cleared as a whole (not only written into): then a
    /// symbolic link is refused too, since replacing it would remove the user's link.
    pub replaced: bool,
}

/// Ok when `dir` is absent, an empty directory, or satisfies `is_ours`; otherwise a one-line
/// refusal that names the flag and what was expected.
pub fn claim(dir: &Path, kind: &Kind, is_ours: impl FnOnce(&Path) -> bool) -> Result<()> {
    let refuse =
        |detail: String| Err(Error::Refused { path: dir.to_path_buf(), detail: format!("{detail} (choose another {}, or remove it yourself)", kind.flag) });
    let meta = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() && kind.replaced {
        return refuse("is a symbolic link; betadpo replaces only directories it wrote".into());
    }
    if !dir.is_dir() {
        return refuse("exists and is not a directory".into());
    }
    // A process killed while writing its first file (the marker) leaves only a temporary file of
    // ours: the directory still counts as empty, or that run could never be resumed.
    let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let empty = entries.all(|e| e.is_ok_and(|e| is_bookkeeping(&e.file_name().to_string_lossy())));
    if empty || is_ours(dir) {
        return Ok(());
    }
    refuse(format!("is not empty and does not hold {}; betadpo never deletes or overwrites what it did not write", kind.what))
}

/// Files any output directory of betadpo may hold besides its output: the marker, the lock file,
/// temporary files of a writer.
fn is_bookkeeping(name: &str) -> bool {
    crate::temp_files::is_temporary_file(name) || crate::dir_lock::is_lock_file(name) || name == MARKER
}

/// [`claim`] for a directory that will be replaced or cleared as a whole: also refused, naming
/// them, when it holds entries that are not betadpo's own output (`own` says which names are, e.g.
/// the files a manifest lists), such as a run or an exported model put inside artifacts, or a
/// user's notes.
pub fn claim_replacing(dir: &Path, kind: &Kind, is_ours: impl FnOnce(&Path) -> bool, own: impl Fn(&str) -> bool) -> Result<()> {
    claim(dir, kind, is_ours)?;
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let mut foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_bookkeeping(n) && !own(n) && !crate::temp_files::is_temporary_dir(n))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let shown = if foreign.len() > 5 { format!("{} and {} more", foreign[..5].join(", "), foreign.len() - 5) } else { foreign.join(", ") };
    Err(Error::Refused {
        path: dir.to_path_buf(),
        detail: format!(
            "holds {shown}, which betadpo did not write there; replacing {} would delete them (move them out, or choose another {})",
            kind.what, kind.flag
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: Kind = Kind { flag: "--out", what: "test output (ours.txt)", replaced: true };

    fn ours(d: &Path) -> bool {
        d.join("ours.txt").is_file()
    }

    #[test]
    fn absent_empty_and_own_directories_are_claimed() {
        let tmp = tempfile::tempdir().unwrap();
        claim(&tmp.path().join("absent"), &KIND, ours).unwrap();
        claim(tmp.path(), &KIND, ours).unwrap();
        std::fs::write(tmp.path().join(format!("{}abc", crate::temp_files::file_prefix())), "half a marker").unwrap();
        claim(tmp.path(), &KIND, ours).unwrap();
        std::fs::write(tmp.path().join("ours.txt"), "").unwrap();
        claim(tmp.path(), &KIND, ours).unwrap();
    }

    #[test]
    fn marks_name_their_kind() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!marked(tmp.path(), "run"));
        mark(tmp.path(), "run").unwrap();
        assert!(marked(tmp.path(), "run") && !marked(tmp.path(), "quickstart"));
    }

    #[test]
    fn other_directories_files_and_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let notes = tmp.path().join("notes");
        std::fs::create_dir(&notes).unwrap();
        std::fs::write(notes.join("todo.md"), "keep me").unwrap();
        let e = claim(&notes, &KIND, ours).unwrap_err().to_string();
        assert!(e.contains("notes: is not empty and does not hold test output (ours.txt)") && e.contains("--out"), "{e}");
        assert!(!e.contains('\n'));
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(claim(&file, &KIND, ours).unwrap_err().to_string().contains("is not a directory"));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("empty"), &link).unwrap();
        std::fs::create_dir(tmp.path().join("empty")).unwrap();
        assert!(claim(&link, &KIND, ours).unwrap_err().to_string().contains("symbolic link"));
        claim(&link, &Kind { replaced: false, ..KIND }, ours).unwrap();
        assert_eq!(std::fs::read_to_string(notes.join("todo.md")).unwrap(), "keep me");
    }

    #[test]
    fn replacing_names_what_is_not_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let own = |n: &str| n == "ours.txt";
        std::fs::write(tmp.path().join("ours.txt"), "").unwrap();
        std::fs::write(tmp.path().join(crate::dir_lock::LOCK_FILE), "1 train").unwrap();
        claim_replacing(tmp.path(), &KIND, ours, own).unwrap();
        std::fs::write(tmp.path().join("NOTES.md"), "mine").unwrap();
        std::fs::create_dir(tmp.path().join("myrun")).unwrap();
        let e = claim_replacing(tmp.path(), &KIND, ours, own).unwrap_err().to_string();
        assert!(e.contains("holds NOTES.md, myrun, which betadpo did not write there"), "{e}");
    }
}
