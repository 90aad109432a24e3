//! Running `betadpo` against hostile directories: every run under a timeout (a hang fails the test
//! instead of stalling the suite), its refusal checked to be one line with no panic or backtrace,
//! and the directories it was pointed at fingerprinted before and after, so a test can assert that
//! nothing was deleted, replaced or added.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Default limit for one command on the tiny bundled model (a healthy run takes a few seconds).
pub const LIMIT: Duration = Duration::from_secs(120);

/// The output of a command that ended by itself.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_betadpo")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits for `child`, killing it and failing the test after `limit`.
pub fn wait(mut child: Child, limit: Duration, what: &str) -> Ran {
    let t = Instant::now();
    // read both pipes on threads, so a chatty child never blocks on a full pipe
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?} (a hang); killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran { code: status.code().unwrap_or(-1), stdout: out_reader.join().unwrap(), stderr: err_reader.join().unwrap() }
}

/// Runs `betadpo args` under [`LIMIT`].
pub fn run(args: &[&str]) -> Ran {
    wait(spawn(args), LIMIT, &format!("{args:?}"))
}

/// Runs `betadpo args`, which must succeed.
pub fn run_ok(args: &[&str]) -> Ran {
    let r = run(args);
    assert_eq!(r.code, 0, "{args:?} failed: {}", r.stderr);
    r
}

/// Runs `betadpo args`, which must fail with one `error:` line containing every needle, and no
/// panic or backtrace; returns that line.
pub fn refused(args: &[&str], needles: &[&str]) -> String {
    let r = run(args);
    assert_ne!(r.code, 0, "{args:?} should fail; stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got:\n{}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{args:?}: {}", r.stderr);
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!r.stderr.contains(bad), "{args:?}: {}", r.stderr);
    }
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: expected {n:?} in {}", lines[0]);
    }
    lines[0].to_string()
}

/// What `dir` holds, entry by entry without following links: a file's SHA-256, a link's target, or
/// the kind of a special file (never opened: it may be a FIFO). The lock file is left out: every
/// command that takes the lock writes its pid there, which is its purpose.
pub fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if e.file_name() == betadpo::dir_lock::LOCK_FILE {
            continue;
        }
        let ft = std::fs::symlink_metadata(&path).unwrap().file_type();
        let what = if ft.is_symlink() {
            format!("link to {}", std::fs::read_link(&path).unwrap().display())
        } else if ft.is_dir() {
            walk(root, &path, out);
            "dir".into()
        } else if ft.is_file() {
            format!("{:x}", Sha256::digest(std::fs::read(&path).unwrap()))
        } else {
            "special".into()
        };
        out.insert(rel, what);
    }
}

/// Fails when `dir` no longer holds exactly `before`.
pub fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, String>, what: &str) {
    let after = fingerprint(dir);
    if &after != before {
        let changed: Vec<_> = before.keys().chain(after.keys()).filter(|k| before.get(*k) != after.get(*k)).collect();
        panic!("{what}: {} changed: {changed:?}", dir.display());
    }
}

/// Makes a FIFO at `path` (replacing a file there).
pub fn fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Replaces `path` by a symbolic link to `target`.
pub fn link(path: &Path, target: &Path) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).unwrap();
}

/// `train` arguments for `steps` steps on the bundled data into `out`, checkpointing every step.
pub fn train_args(art: &Path, out: &Path, steps: u64) -> Vec<String> {
    let q = super::fixtures::quickstart();
    [
        "train",
        "--artifacts",
        art.to_str().unwrap(),
        "--data",
        q.join("train.jsonl").to_str().unwrap(),
        "--tokenizer",
        q.join("tokenizer.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        &steps.to_string(),
        "--save-every",
        "1",
        "--batch-size",
        "4",
        "--quiet",
    ]
    .map(String::from)
    .into()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
