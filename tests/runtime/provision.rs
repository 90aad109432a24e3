//! Provisioning tests: private cache directories (never the process-wide environment variables), concurrent
//! provisioning from threads and from child processes (this test binary re-run on `provision::child_provision`),
//! and the single error message when nothing works.

use std::path::{Path, PathBuf};
use std::process::Command;

use betadpo::runtime::{check_library, Flavor, Locator, LIB_NAME};

fn private_locator(cache: &Path) -> Locator {
    Locator::in_cache(cache, Default::default())
}

/// Checks the provisioned cache holds exactly one complete main library and no leftovers of the atomic writes.
fn assert_clean_cache(cache: &Path) -> PathBuf {
    let dir = cache.join(Flavor::Cpu.dir_name());
    let lib = dir.join(LIB_NAME);
    let bytes = std::fs::read(&lib).expect("provisioned library");
    assert_eq!(&bytes[..4], b"\x7fELF", "not a shared library");
    assert!(bytes.len() > 1_000_000, "suspiciously small library: {} bytes", bytes.len());
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(cache).unwrap())
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".betadpo-tmp-") || n.starts_with(".wheel-"))
        .collect();
    assert!(leftovers.is_empty(), "leftovers: {leftovers:?}");
    lib
}

#[test]
fn provisions_into_an_empty_cache_without_ort_dylib_path() {
    let cache = tempfile::tempdir().unwrap();
    let locator = private_locator(cache.path());
    let path = locator.resolve(Flavor::Cpu).expect("provisioning");
    assert_eq!(path, locator.cached_library(Flavor::Cpu));
    assert_eq!(assert_clean_cache(cache.path()), path);
    // A second resolve finds the cache and does not provision again.
    let again = locator.resolve(Flavor::Cpu).unwrap();
    assert_eq!(again, path);
}

#[test]
fn ort_dylib_path_to_a_missing_file_is_an_error() {
    let cache = tempfile::tempdir().unwrap();
    let locator = Locator { dylib_override: Some("/nonexistent/libonnxruntime.so".into()), ..Locator::in_cache(cache.path(), Default::default()) };
    let err = locator.resolve(Flavor::Cpu).unwrap_err().to_string();
    assert!(err.contains("ORT_DYLIB_PATH") && err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    assert!(!locator.cached_library(Flavor::Cpu).exists(), "must not provision when the override is set");
}

#[test]
fn concurrent_provisioning_from_threads_yields_one_file() {
    let cache = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| private_locator(cache.path()).resolve(Flavor::Cpu))).collect();
        handles.into_iter().map(|h| h.join().unwrap().expect("provisioning")).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]), "{paths:?}");
    assert_eq!(assert_clean_cache(cache.path()), paths[0]);
}

const CHILD_ENV: &str = "BETADPO_TEST_PROVISION_DIR";
const CHILD_TEST: &str = "provision::child_provision";

/// Not a test on its own: `concurrent_provisioning_from_processes` runs it in child processes.
#[test]
#[ignore]
fn child_provision() {
    let Some(cache) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = match private_locator(Path::new(&cache)).resolve(Flavor::Cpu) {
        Ok(path) => path,
        Err(e) => return println!("PROVISION_FAILED {e}"),
    };
    // Loading the file (in this child only) proves it is complete and the right version.
    let version = check_library(&path).expect("valid library");
    println!("PROVISIONED {} {version}", path.display());
}

#[test]
fn concurrent_provisioning_from_processes_yields_one_valid_file() {
    let cache = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(&exe)
                .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, cache.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut reports = Vec::new();
    let mut provision_logs = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        provision_logs += stderr.matches("provisioning ONNX Runtime").count();
        // The harness prints "test child_provision ... " on the same line, so look for the marker anywhere.
        let line = stdout.lines().find_map(|l| l.find("PROVISIONED ").map(|i| l[i..].to_string()));
        reports.push(line.unwrap_or_else(|| panic!("no report from child:\n{stdout}\n{stderr}")));
    }
    assert_eq!(provision_logs, 1, "exactly one process provisions");
    assert!(reports.windows(2).all(|w| w[0] == w[1]), "{reports:?}");
    assert!(reports[0].ends_with(" 1.32.0"), "{}", reports[0]);
    assert_clean_cache(cache.path());
}

#[test]
fn provisioning_failure_is_one_clear_message() {
    // Without python3 on PATH neither the wheel download nor the installed-package fallback can work.
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, cache.path())
        .env("PATH", cache.path().join("no-such-bin"))
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.find("PROVISION_FAILED ").map(|i| &l[i..]));
    let line = line.unwrap_or_else(|| panic!("child did not fail as expected:\n{stdout}"));
    for needle in ["pip install onnxruntime==1.32.0", "ORT_DYLIB_PATH=/path/to/libonnxruntime.so.1.32.0"] {
        assert!(line.contains(needle), "{line}");
    }
    assert!(!cache.path().join(Flavor::Cpu.dir_name()).join(LIB_NAME).exists());
}

/// Downloads the large onnxruntime-gpu wheel, so it only runs on request (`cargo test -- --ignored gpu_build`).
#[test]
#[ignore]
fn gpu_build_provisions_with_its_provider_libraries() {
    let cache = tempfile::tempdir().unwrap();
    let lib = private_locator(cache.path()).resolve(Flavor::Gpu).expect("provisioning the GPU build");
    let dir = lib.parent().unwrap();
    assert!(dir.ends_with("onnxruntime-gpu-1.32.0"), "{}", dir.display());
    for name in ["libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
}
