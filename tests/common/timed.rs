//! Running the `betadpo` binary under a time limit, for inputs that once hung or aborted: a run
//! past its limit is killed and fails the test, and a refusal must be one `error:` line (no
//! panic, no backtrace) with a non-zero exit.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `betadpo args` and kills it (failing the test) past `limit`.
pub fn betadpo_within(args: &[&str], limit: Duration) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_betadpo")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let (out, err) = (drain(Box::new(child.stdout.take().unwrap())), drain(Box::new(child.stderr.take().unwrap())));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("betadpo {args:?} ran past {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome { code: status.code().unwrap_or(-1), stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Asserts a refusal: a non-zero exit (not a panic's 101 nor a signal) and stderr of exactly one
/// `error:` line (notes before it allowed when `notes` is true) that contains `needle`.
pub fn assert_refused(o: &Outcome, needle: &str, what: &str) {
    assert!(o.code != 0 && o.code != 101 && o.code != -1, "{what}: exit {} (0, a panic or a signal):\n{}", o.code, o.stderr);
    assert!(!o.stderr.contains("panicked") && !o.stderr.contains("backtrace") && !o.stderr.contains('\x1b'), "{what}: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("note: ")).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one error line, got:\n{}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{what}: {}", o.stderr);
    assert!(lines[0].contains(needle), "{what}: expected {needle:?} in:\n{}", o.stderr);
}

/// The largest resident set of the children this process has waited for, in bytes.
pub fn peak_child_rss() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

/// The bundled quickstart model, tokenizer and data.
pub fn quickstart() -> std::path::PathBuf {
    super::fixtures::repo().join("graphs/quickstart")
}

/// A path as a command-line argument.
pub fn arg(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// Artifacts built from `model` into a fresh scratch directory named `name`.
pub fn build(model: &std::path::Path, name: &str) -> std::path::PathBuf {
    let art = super::fixtures::scratch(name).join("art");
    betadpo::dpo::build_artifacts(model, &art, &Default::default()).unwrap();
    art
}
