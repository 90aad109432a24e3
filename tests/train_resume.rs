//! `betadpo train` resumes exactly: 8 straight steps equal 4 + `--resume` to 8, bit for bit, and a run
//! SIGKILLed at any moment resumes from its last complete checkpoint to the same result.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::ObjectiveConfig;
use betadpo::run_layout;
use betadpo::store::NamedTensor;
use betadpo::train::config::TrainConfig;
use betadpo::train::schedule::Schedule;

use common::fixtures::scratch;
use common::train_run::*;

// ---------------------------------------------------------------------------------------------
// Exact resume

#[test]
fn resume_is_exact_padded() {
    resume_is_exact(LayoutChoice::Padded);
}

/// Packed is the layout `build-graph` picks for these models by default.
#[test]
fn resume_is_exact_packed() {
    resume_is_exact(LayoutChoice::Packed);
}

fn resume_is_exact(layout: LayoutChoice) {
    let Some(inp) = inputs() else { return };
    let dir = scratch(&format!("resume-{layout:?}"));
    let art = artifacts_in(layout, &inp.model, &dir, ObjectiveConfig::default());
    // 40 pairs = 10 micro-batches of 4 = 5 steps of 2 per epoch: 8 steps cross an epoch boundary,
    // and the resume point (step 4) is mid-epoch.
    let data = head(&inp.train, 40, &dir, "train.jsonl");
    let eval = head(&inp.test, 12, &dir, "eval.jsonl");
    let base = |out: &Path, steps: u64| TrainConfig { grad_accum: 2, save_every: 2, ..config(&art, &data, &inp, out, steps) };

    // (a) constant schedule: 8 straight steps == 4 steps, then --resume to 8.
    let (straight, split) = straight_and_resumed(&art, &data, &inp, &dir);
    let ck = |run: &Path, f: &str| params(&run_layout::checkpoint_dir(run, 8).join(f));
    assert_bit_identical(&ck(&straight, run_layout::OPTIMIZER), &ck(&split, run_layout::OPTIMIZER), "Adam moments at step 8");
    assert_eq!(steps_of(&train_records(&split)), (1..=8).collect::<Vec<_>>(), "one metrics line per step after resume");

    // (b) linear schedule with warmup and evaluation: a run of 8 steps loses its last checkpoints
    // (as if killed after step 4) and is resumed; the schedule and the log come out the same.
    let lin = |out: &Path| TrainConfig {
        lr_schedule: Schedule::Linear,
        warmup_steps: 3,
        eval_data: Some(eval.clone()),
        eval_every: 4,
        save_total_limit: 0,
        weight_decay: 0.01,
        ..base(out, 8)
    };
    let full = dir.join("linear");
    run_train(&lin(&full));
    let reference_params = final_params(&full);
    let reference_train = train_records(&full);
    let reference_eval = eval_records(&full);
    assert_eq!(steps_of(&reference_eval), vec![0, 4, 8]);
    assert_eq!(checkpoint_entries(&full), vec!["step-2", "step-4", "step-6", "step-8"], "save_total_limit 0 keeps all");
    for n in [6, 8] {
        std::fs::remove_dir_all(run_layout::checkpoints_dir(&full).join(format!("step-{n}"))).unwrap();
    }
    std::fs::remove_dir_all(full.join(run_layout::FINAL_DIR)).unwrap();
    let s = run_train(&TrainConfig { resume: true, ..lin(&full) });
    assert_eq!((s.steps, s.resumed_from), (8, Some(4)));
    assert!(s.initial_eval.is_none(), "a resumed run does not re-evaluate step 0");
    assert_bit_identical(&reference_params, &final_params(&full), "linear schedule, resumed from step 4");
    assert_eq!(steps_of(&train_records(&full)), (1..=8).collect::<Vec<_>>());
    assert_same_records(&reference_train, &train_records(&full), "linear schedule metrics");
    assert_same_records(&reference_eval, &eval_records(&full), "eval records (0, 4, 8 once each)");
    let lr: Vec<f64> = reference_train.iter().map(|r| f(r, "learning_rate")).collect();
    assert!(lr[0] < lr[1] && lr[1] < lr[2] && lr[3] > lr[7], "warmup then linear decay: {lr:?}");

    // Resuming a finished run is a no-op that rewrites the same final parameters.
    let s = run_train(&TrainConfig { resume: true, ..lin(&full) });
    assert_eq!((s.steps, s.resumed_from), (8, Some(8)));
    assert_bit_identical(&reference_params, &final_params(&full), "resume of a finished run");
    assert_eq!(steps_of(&train_records(&full)), (1..=8).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at any moment

struct KillSetup {
    art: PathBuf,
    data: PathBuf,
    tokenizer: PathBuf,
    steps: u64,
}

impl KillSetup {
    /// `--resume` once a checkpoint exists (with none, `--resume` is refused, as transformers'
    /// `resume_from_checkpoint=True` is: a run killed before its first checkpoint starts again).
    fn args(&self, out: &Path) -> Vec<String> {
        let resume = if run_layout::list_checkpoints(out).is_empty() { "" } else { " --resume" };
        let flags = format!("--max-steps {} --batch-size 4 --save-every 1 --threads 1 --max-length 128 --quiet{resume}", self.steps);
        train_args(&self.art, &self.data, &self.tokenizer, out, &flags)
    }
    fn spawn(&self, out: &Path) -> Child {
        bin().args(self.args(out)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }
    fn complete(&self, out: &Path) -> Duration {
        let t = Instant::now();
        let (code, _, err) = run_bin(&self.args(out), &[]);
        assert_eq!(code, 0, "--resume into {} failed:\n{err}", out.display());
        t.elapsed()
    }
}

/// After a kill: every `step-N` is complete (the rest may only be temporary `.partial-*` entries).
fn check_after_kill(run: &Path, what: &str) -> usize {
    let mut partial = 0;
    for name in checkpoint_entries(run) {
        if name.starts_with(".partial-") {
            partial += 1;
        } else {
            let d = run_layout::checkpoints_dir(run).join(&name);
            assert!(d.is_dir(), "{what}: stray file {name}");
            assert_complete_checkpoint(&d);
        }
    }
    partial
}

/// After a successful resume: only complete `step-N`, the last one the final step.
fn check_after_resume(run: &Path, k: &KillSetup, reference: &[NamedTensor], what: &str) {
    let entries = checkpoint_entries(run);
    assert!(!entries.is_empty(), "{what}: no checkpoints");
    for name in &entries {
        assert!(name.starts_with("step-"), "{what}: {name} left in checkpoints/ after resume ({entries:?})");
        assert_complete_checkpoint(&run_layout::checkpoints_dir(run).join(name));
    }
    assert_eq!(run_layout::list_checkpoints(run).last().unwrap().0, k.steps, "{what}");
    assert_bit_identical(reference, &final_params(run), what);
    assert_eq!(steps_of(&train_records(run)), (1..=k.steps).collect::<Vec<_>>(), "{what}: one metrics line per step");
    for dir in [run.to_path_buf(), run.join(run_layout::FINAL_DIR), run.join("reference")] {
        let stray: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".betadpo-tmp-")).collect())
            .unwrap_or_default();
        assert!(stray.is_empty(), "{what}: temporary files of the killed run left in {}: {stray:?}", dir.display());
    }
}

#[cfg(unix)]
#[test]
fn sigkill_then_resume_padded() {
    sigkill_then_resume(LayoutChoice::Padded);
}

/// Packed is the layout `build-graph` picks for these models by default.
#[cfg(unix)]
#[test]
fn sigkill_then_resume_packed() {
    sigkill_then_resume(LayoutChoice::Packed);
}

/// Kills a run in each phase it names (start-up before the first checkpoint, training, writing a
/// checkpoint, repeatedly) and asserts that each phase was really hit; the state a kill leaves while
/// an old checkpoint is being removed (a microsecond window) is planted. Every resume ends
/// bit-identical to the uninterrupted run.
#[cfg(unix)]
fn sigkill_then_resume(layout: LayoutChoice) {
    let Some(inp) = inputs() else { return };
    let dir = scratch(&format!("sigkill-{layout:?}"));
    let art = artifacts_in(layout, &inp.model, &dir, ObjectiveConfig::default());
    let k = KillSetup { data: head(&inp.train, 32, &dir, "train.jsonl"), art, tokenizer: inp.tokenizer.clone(), steps: 12 };

    // The uninterrupted run, timed: start-up (runtime, tokenization, reference log-probs), then steps.
    let reference_run = dir.join("reference");
    let t = Instant::now();
    let mut child = k.spawn(&reference_run);
    let mut first_save = None;
    while child.try_wait().unwrap().is_none() {
        if first_save.is_none() && !run_layout::list_checkpoints(&reference_run).is_empty() {
            first_save = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let whole = t.elapsed();
    assert!(child.wait().unwrap().success(), "the uninterrupted run failed");
    let first_save = first_save.unwrap_or(whole / 2);
    let reference = final_params(&reference_run);
    let reference_train = train_records(&reference_run);
    eprintln!("uninterrupted run: {:.2}s, first checkpoint after {:.2}s", whole.as_secs_f64(), first_save.as_secs_f64());
    let mut rng = Rng::from_env_or_clock();

    // Killed during start-up (runtime, tokenization, reference log-probs): before any checkpoint
    // exists. A kill that came too late is retried with a shorter delay, so the phase is hit.
    let mut startup_kills = 0;
    for attempt in 0..8 {
        let run = dir.join(format!("startup-{attempt}"));
        let delay = first_save.mul_f64((0.1 + 0.8 * rng.unit()) / f64::from(1 << (attempt / 2)));
        let mut child = k.spawn(&run);
        std::thread::sleep(delay);
        let before_first_save = run_layout::list_checkpoints(&run).is_empty() && child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        child.wait().unwrap();
        check_after_kill(&run, &format!("start-up kill {attempt} after {delay:?}"));
        startup_kills += usize::from(before_first_save);
        eprintln!("start-up kill {attempt}: after {:.0} ms, before the first checkpoint: {before_first_save}", delay.as_secs_f64() * 1e3);
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("start-up kill {attempt} after {delay:?}"));
        if startup_kills == 2 {
            break;
        }
    }
    assert_eq!(startup_kills, 2, "no kill landed before the first checkpoint in 8 attempts");

    // Killed once at a random moment while training (the first checkpoint on disk, then a random
    // share of the steps), then resumed to the end.
    let mut killed = 0;
    for i in 2..6 {
        let run = dir.join(format!("random-{i}"));
        let mut child = k.spawn(&run);
        let t = Instant::now();
        let delay = {
            while run_layout::list_checkpoints(&run).is_empty() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            t.elapsed() + whole.saturating_sub(first_save).mul_f64(0.9 * rng.unit())
        };
        std::thread::sleep(delay.saturating_sub(t.elapsed()));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        killed += usize::from(!finished);
        let partial = check_after_kill(&run, &format!("kill {i} after {delay:?}"));
        let done = run_layout::list_checkpoints(&run).last().map(|c| c.0);
        eprintln!("kill {i}: after {:.0} ms, newest checkpoint {done:?}, {partial} partial", delay.as_secs_f64() * 1e3);
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("random kill {i} after {delay:?}"));
        assert_same_records(&reference_train, &train_records(&run), &format!("metrics after kill {i}"));
    }
    assert!(killed >= 2, "only {killed} of 4 runs were still running when killed; the delays are too long");

    // Killed while a checkpoint is being written: watch checkpoints/ for a temporary directory,
    // until two runs were caught there.
    let mut caught = 0;
    for i in 0..8 {
        if caught == 2 {
            break;
        }
        let run = dir.join(format!("in-save-{i}"));
        let mut child = k.spawn(&run);
        let deadline = Instant::now() + whole * 3;
        let mut seen_steps = 0;
        loop {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            let names = checkpoint_entries(&run);
            // Skip the first few saves so the kill also lands mid-run and during rotation.
            if names.iter().any(|n| n.starts_with(".partial-")) {
                seen_steps += 1;
                if seen_steps > 2 * (i % 3) {
                    let _ = child.kill();
                    caught += 1;
                    break;
                }
                while checkpoint_entries(&run).iter().any(|n| n.starts_with(".partial-")) && child.try_wait().unwrap().is_none() {}
            }
        }
        let _ = child.kill();
        child.wait().unwrap();
        let partial = check_after_kill(&run, &format!("kill {i} during a save"));
        eprintln!("kill during save {i}: {} partial entries left, newest checkpoint {:?}", partial, run_layout::list_checkpoints(&run).last().map(|c| c.0));
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("kill {i} during a save"));
    }
    assert_eq!(caught, 2, "fewer than 2 of 8 runs were killed while writing a checkpoint");

    // Killed while an old checkpoint is being removed (save_total_limit): it is renamed to
    // `.partial-removing-*` first and deleted then, a window of microseconds that a watcher catches
    // only sometimes. So the state such a kill leaves is also planted below, where it is asserted.
    let mut caught = 0;
    for i in 0..3 {
        let run = dir.join(format!("in-rotation-{i}"));
        let mut child = k.spawn(&run);
        let deadline = Instant::now() + whole * 3;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            if checkpoint_entries(&run).iter().any(|n| n.starts_with(".partial-removing-")) {
                let _ = child.kill();
                caught += 1;
                break;
            }
        }
        let _ = child.kill();
        child.wait().unwrap();
        check_after_kill(&run, &format!("kill {i} during checkpoint rotation"));
        k.complete(&run);
        check_after_resume(&run, &k, &reference, &format!("kill {i} during checkpoint rotation"));
    }
    eprintln!("caught {caught} of 3 runs while an old checkpoint was being removed");
    let run = dir.join("planted-rotation");
    let mut child = k.spawn(&run);
    while run_layout::list_checkpoints(&run).len() < 2 && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    child.wait().unwrap();
    let (step, oldest) = run_layout::list_checkpoints(&run).first().cloned().expect("a checkpoint before the kill");
    let removing = run_layout::checkpoints_dir(&run).join(format!(".partial-removing-step-{step}-1"));
    std::fs::rename(&oldest, &removing).unwrap();
    std::fs::remove_file(removing.join(run_layout::PARAMS)).unwrap();
    k.complete(&run);
    assert!(!removing.exists(), "a half-removed checkpoint is cleaned up on resume");
    check_after_resume(&run, &k, &reference, "after a kill while an old checkpoint was being removed");

    // Killed repeatedly: each resume is itself killed, then the last one finishes.
    let run = dir.join("repeated");
    for round in 0..4 {
        let delay = whole.mul_f64(0.2 + 0.5 * rng.unit());
        let mut child = k.spawn(&run);
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().unwrap();
        check_after_kill(&run, &format!("repeated kill {round}"));
    }
    k.complete(&run);
    check_after_resume(&run, &k, &reference, "after 4 kills in a row");

    // A temporary directory left behind is removed, never loaded.
    let ck = run_layout::checkpoints_dir(&run);
    std::fs::create_dir_all(ck.join(".partial-step-99-1")).unwrap();
    std::fs::write(ck.join(".partial-step-99-1").join(run_layout::STATE), "{ half").unwrap();
    k.complete(&run);
    assert!(!checkpoint_entries(&run).iter().any(|n| n.starts_with(".partial-")), "{:?}", checkpoint_entries(&run));
    check_after_resume(&run, &k, &reference, "with a planted partial checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
}
