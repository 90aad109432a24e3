//! Hostile run directories (issue 24): two runs into one `--out`, a killed run resumed, FIFOs and
//! devices in place of a run's files, checkpoints that lie about their step or hold NaN, and flags
//! that match nothing. Each command runs under a timeout; each refusal is one line, a non-zero exit,
//! and the run directory is byte for byte what it was.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use betadpo::run_layout;
use betadpo::store::RawTensor;
use betadpo::train::batch::LoaderPosition;
use betadpo::train::checkpoint::{self, TrainerState};
use common::fixtures::quickstart_artifacts as artifacts;
use common::fixtures::scratch;
use common::hostile::{assert_unchanged, fifo, fingerprint, link, refused, run_ok, spawn, strs, train_args, wait, LIMIT};

/// Artifacts and a finished 3-step run (`--save-every 1`, the last two checkpoints kept).
fn finished_run(name: &str) -> (PathBuf, PathBuf, Vec<String>) {
    let dir = scratch(name);
    let art = artifacts(&dir);
    let run = dir.join("run");
    let args = train_args(&art, &run, 3);
    run_ok(&strs(&args));
    (art, run, args)
}

fn resume_args(args: &[String]) -> Vec<String> {
    let mut v = args.to_vec();
    v.push("--resume".into());
    v
}

fn with(args: &[String], extra: &[&str]) -> Vec<String> {
    args.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect()
}

/// `--resume` of `run` is refused with every needle, and `run` is left as it was.
fn resume_refused(run: &Path, args: &[String], needles: &[&str]) {
    let before = fingerprint(run);
    refused(&strs(&resume_args(args)), needles);
    assert_unchanged(run, &before, &format!("resume refused with {needles:?}"));
}

fn steps_logged(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join(run_layout::METRICS_FILE)).unwrap();
    let steps = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step")?.as_u64());
    let mut v: Vec<u64> = steps.collect();
    v.dedup();
    v
}

#[test]
fn a_second_run_into_the_same_directory_is_refused_naming_the_first() {
    let dir = scratch("two-runs");
    let art = artifacts(&dir);
    let run = dir.join("run");
    let args = train_args(&art, &run, 300);
    let first = spawn(&strs(&args));
    let pid = first.id();
    // the first holds the lock once its pid is in the lock file
    let t = Instant::now();
    let lock = run.join(betadpo::dir_lock::LOCK_FILE);
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.starts_with(&format!("{pid} "))) {
        assert!(t.elapsed() < LIMIT, "the first run never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = refused(&strs(&args), &[&format!("in use by betadpo process {pid} (train)"), "run"]);
    let resumed = refused(&strs(&resume_args(&args)), &[&pid.to_string()]);
    let first = wait(first, LIMIT, "the first run");
    assert_eq!(first.code, 0, "the first run failed after the second was refused ({err}; {resumed}): {}", first.stderr);
    let steps = steps_logged(&run);
    assert!(steps.windows(2).all(|w| w[0] < w[1]) && steps.last() == Some(&300), "one run's steps, once each: {steps:?}");
    // the first run is intact and resumable
    run_ok(&strs(&resume_args(&train_args(&art, &run, 302))));
    assert_eq!(run_layout::list_checkpoints(&run).last().unwrap().0, 302);
}

#[test]
fn a_killed_runs_lock_never_blocks_its_resume() {
    let dir = scratch("killed-run");
    let art = artifacts(&dir);
    let run = dir.join("run");
    let args = train_args(&art, &run, 200);
    let mut child = spawn(&strs(&args));
    let t = Instant::now();
    while run_layout::list_checkpoints(&run).is_empty() {
        assert!(t.elapsed() < LIMIT && child.try_wait().unwrap().is_none(), "no checkpoint before the run ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs, the kernel drops the lock
    child.wait().unwrap();
    let holder = std::fs::read_to_string(run.join(betadpo::dir_lock::LOCK_FILE)).unwrap();
    assert!(holder.starts_with(&format!("{} ", child.id())), "{holder}");
    run_ok(&strs(&resume_args(&args)));
    assert_eq!(run_layout::list_checkpoints(&run).last().unwrap().0, 200);
}

#[test]
fn fifos_and_devices_in_a_run_are_refused_without_hanging() {
    let (_, run, args) = finished_run("run-fifos");
    let (_, last) = run_layout::list_checkpoints(&run).pop().unwrap();
    for (file, needle) in
        [(last.join(run_layout::OPTIMIZER), "is a FIFO"), (last.join(run_layout::STATE), "is a FIFO"), (run.join(run_layout::METRICS_FILE), "is a FIFO")]
    {
        let keep = dir_copy(&file);
        fifo(&file);
        resume_refused(&run, &args, &[file.file_name().unwrap().to_str().unwrap(), needle]);
        restore(&file, &keep);
    }
    let params = last.join(run_layout::PARAMS);
    let keep = dir_copy(&params);
    link(&params, Path::new("/dev/zero"));
    resume_refused(&run, &args, &["params.safetensors", "kernel file"]);
    restore(&params, &keep);
    // a link out of the run to a real checkpoint file elsewhere is not followed either
    let elsewhere = run.parent().unwrap().join("elsewhere.safetensors");
    std::fs::write(&elsewhere, &keep).unwrap();
    link(&params, &elsewhere);
    resume_refused(&run, &args, &["params.safetensors", "outside"]);
    restore(&params, &keep);
    run_ok(&strs(&resume_args(&args)));
}

#[test]
fn a_reference_cache_that_is_a_device_is_an_error_not_ignored() {
    let (art, run, _) = finished_run("run-ref-zero");
    let cache =
        std::fs::read_dir(run.join("reference")).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "safetensors")).unwrap();
    link(&cache, Path::new("/dev/zero"));
    let more = train_args(&art, &run, 5);
    resume_refused(&run, &more, &["reference", "kernel file"]);
    fifo(&cache);
    resume_refused(&run, &more, &["reference", "is a FIFO"]);
}

#[test]
fn checkpoints_that_lie_about_their_step_or_position_are_refused() {
    let (_, run, args) = finished_run("run-lying-state");
    let (_, last) = run_layout::list_checkpoints(&run).pop().unwrap();
    let state_path = last.join(run_layout::STATE);
    let original = std::fs::read_to_string(&state_path).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&state_path, v.to_string()).unwrap();
    };
    edit(&|v| v["step"] = serde_json::json!(1u64 << 48));
    resume_refused(&run, &args, &["holds the state of step 281474976710656, not of step 3"]);
    edit(&|v| v["position"]["epoch"] = serde_json::json!(1u64 << 40));
    resume_refused(&run, &args, &["epoch 1099511627776 is beyond"]);
    edit(&|v| v["position"]["index"] = serde_json::json!(100_000));
    resume_refused(&run, &args, &["data position 100000 is beyond"]);
    std::fs::write(&state_path, &original).unwrap();

    // the newest checkpoint renamed step-1000: not "resumed from step 1000", and nothing deleted
    let renamed = last.with_file_name("step-1000");
    std::fs::rename(&last, &renamed).unwrap();
    resume_refused(&run, &args, &["holds the state of step 3, not of step 1000"]);
    // and named for its own step but beyond the run's steps
    let far = last.with_file_name("step-281474976710656");
    std::fs::rename(&renamed, &far).unwrap();
    edit_state(&far, |v| v["step"] = serde_json::json!(1u64 << 48));
    resume_refused(&run, &args, &["step 281474976710656 is beyond the 3 steps this run trains"]);
}

fn edit_state(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let path = dir.join(run_layout::STATE);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

fn state(step: u64) -> TrainerState {
    TrainerState {
        step,
        position: LoaderPosition { epoch: 0, index: step as usize },
        tokens: 0,
        skipped_nonfinite: 0,
        updates: step,
        run_key: "k".into(),
        margin_stats: Default::default(),
        epsilon_beta: None,
        loss_scale: None,
    }
}

#[test]
fn a_checkpoint_is_written_only_from_finite_state() {
    let run = scratch("nan-checkpoint");
    let good = [1.0f32, 2.0];
    let params = [RawTensor::of_f32("w", vec![2], &good)];
    checkpoint::save(&run, &state(3), &params, &[RawTensor::of_f32("w.adam_m", vec![2], &good)], 2).unwrap();
    let before = fingerprint(&run);
    let nan = [0.5f32, f32::NAN];
    let err = checkpoint::save(&run, &state(4), &params, &[RawTensor::of_f32("w.adam_m", vec![2], &nan)], 2).unwrap_err().to_string();
    assert!(err.contains("checkpoint step-4 not written: w.adam_m[1] is NaN"), "{err}");
    assert!(!err.contains("intact"), "{err}");
    assert_unchanged(&run, &before, "a refused NaN checkpoint");
    let inf = [f32::INFINITY, 0.0];
    let err = checkpoint::save(&run, &state(4), &[RawTensor::of_f32("w", vec![2], &inf)], &[], 2).unwrap_err().to_string();
    assert!(err.contains("w[0] is inf"), "{err}");
    assert_eq!(run_layout::list_checkpoints(&run).iter().map(|c| c.0).collect::<Vec<_>>(), [3]);
}

#[test]
fn retention_never_removes_a_checkpoint_newer_than_the_one_saved() {
    let run = scratch("retention-newer");
    let v = [1.0f32];
    let save = |step| checkpoint::save(&run, &state(step), &[RawTensor::of_f32("w", vec![1], &v)], &[], 2).unwrap();
    for step in [1, 2, 9] {
        save(step);
    }
    assert_eq!(run_layout::list_checkpoints(&run).iter().map(|c| c.0).collect::<Vec<_>>(), [2, 9]);
    // a run resumed at step 2 (the newest once step-9 was set aside) saves 3 and 4; step-9 stays
    save(3);
    save(4);
    assert_eq!(run_layout::list_checkpoints(&run).iter().map(|c| c.0).collect::<Vec<_>>(), [3, 4, 9]);
}

#[test]
fn flags_that_match_nothing_are_refused_by_name() {
    let (art, run, _) = finished_run("run-nothing-matches");
    let before = fingerprint(&run);
    let more = resume_args(&train_args(&art, &run, 4));
    refused(&strs(&with(&more, &["--group-by", "nosuchcolumn"])), &["--group-by", "\"nosuchcolumn\"", "regime"]);
    refused(&strs(&with(&more, &["--profile", "/nonexistent/x"])), &["--profile", "/nonexistent", "does not exist"]);
    assert_unchanged(&run, &before, "refused flags");
    // --resume with nothing to resume: an absent and an empty --out
    let absent = run.parent().unwrap().join("absent");
    refused(&strs(&resume_args(&train_args(&art, &absent, 3))), &["--resume", "holds no checkpoint to resume"]);
    assert!(!absent.exists(), "a refused resume created {}", absent.display());
    let empty = run.parent().unwrap().join("empty");
    std::fs::create_dir(&empty).unwrap();
    refused(&strs(&resume_args(&train_args(&art, &empty, 3))), &["--resume", "empty", "holds no checkpoint"]);
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "a refused resume wrote into an empty --out");
}

/// The bytes of `file`, to put back with [`restore`].
fn dir_copy(file: &Path) -> Vec<u8> {
    std::fs::read(file).unwrap()
}

fn restore(file: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(file);
    std::fs::write(file, bytes).unwrap();
}
