//! Running the `betadpo` binary under a time limit, for inputs that once hung or aborted: a run
//! past its limit is killed and fails the test, and a refusal must be one `error:` line (no
//! panic, no backtrace) with a non-zero exit.

#![allow(dead_code)]

use std::time::Duration;

/// What a run printed and how it exited (the hostile-directory tests' type).
pub type Outcome = super::hostile::Ran;

/// Runs `betadpo args` and kills it (failing the test) past `limit`.
pub fn betadpo_within(args: &[&str], limit: Duration) -> Outcome {
    super::hostile::wait(super::hostile::spawn(args), limit, &format!("betadpo {args:?}"))
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
