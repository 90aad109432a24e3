//! Running the `betadpo` binary and checking how it fails: one clear line on stderr, a non-zero
//! exit, and nothing half-written.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub fn betadpo(args: &[&str]) -> (i32, String, String) {
    betadpo_with_env(args, &[])
}

/// `betadpo ARGS` with extra environment variables (a cache folder, a fake wheel index).
pub fn betadpo_with_env(args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_betadpo"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `betadpo doctor --ep EP`: exit code, stdout, stderr.
pub fn doctor(ep: &str, env: &[(&str, &Path)]) -> (i32, String, String) {
    betadpo_with_env(&["doctor", "--ep", ep], env)
}

pub fn assert_one_line_error(args: &[&str], needle: &str) -> String {
    let (code, _, err) = betadpo(args);
    assert_ne!(code, 0, "{args:?} should fail");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error"), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    err
}

pub fn assert_absent(p: &Path) {
    assert!(!p.exists(), "{} should not exist after a failed build", p.display());
    let parent = p.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}
