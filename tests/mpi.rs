//! Data-parallel training under MPI: `mpirun --oversubscribe -np N betadpo train` against one
//! process with the same global batch: the same parameters (to float32 reduction order), the same
//! metrics and reference cache, on padded and packed artifacts, straight and resumed; and a killed
//! rank ends the job with a message, leaving complete checkpoints to resume from.
//!
//! The MPI binary: `$BETADPO_MPI_BIN` (`.ci/run` builds one with `scripts/ci/build_mpi.sh`, as plain
//! `cargo test` builds without the `mpi` feature), else this build's own when it has the feature
//! (`cargo test --features mpi`). Without one, or without `mpirun`, the tests skip with a notice on a
//! developer's machine and fail under `CI=true`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::run_layout;
use betadpo::store::read_safetensors;
use betadpo::train::checkpoint;
use serde_json::{Map, Value};

use common::fixtures::scratch;
use common::mpi_job::{assert_close_records, final_params, max_diff, metrics, mpi, reference_files, s, Setup, PARAM_TOL};

/// One process and 2 ranks, global batch 8, 6 steps: the same parameters, metrics and reference
/// cache; 3 steps then `--resume` to 6 under MPI gives the straight MPI run bit for bit.
fn two_ranks_train_as_one(layout: LayoutChoice) {
    let Some((setup, dir)) = Setup::new(layout, &format!("mpi-{layout:?}")) else { return };
    let one = dir.join("one");
    let two = dir.join("two");
    let split = dir.join("split");
    setup.single(&one, "--max-steps 6 --eval-every 3 --save-every 3");
    let out = setup.ranks(2, &two, "--max-steps 6 --eval-every 3 --save-every 3");
    assert!(String::from_utf8_lossy(&out.stdout).matches("steps").count() <= 1, "rank 0 alone prints the summary:\n{}", String::from_utf8_lossy(&out.stdout));

    let initial = read_safetensors(&setup.art.join("parameters.safetensors")).map(|t| t.0).ok();
    let (p1, p2) = (final_params(&one), final_params(&two));
    let diff = max_diff(&p1, &p2);
    eprintln!("{layout:?}: max |param diff| one process vs 2 ranks after 6 steps: {diff:e}");
    assert!(diff <= PARAM_TOL, "{layout:?}: 2 ranks differ from one process by {diff} (tolerance {PARAM_TOL})");
    if let Some(initial) = initial {
        let moved = max_diff(&p1, &initial);
        assert!(moved > 20.0 * PARAM_TOL, "{layout:?}: training moved parameters by only {moved}: the comparison says nothing");
    }
    assert_close_records(&metrics(&one), &metrics(&two), &format!("{layout:?} metrics, one process vs 2 ranks"));
    assert_eq!(reference_files(&one), reference_files(&two), "{layout:?}: reference caches differ");
    for run in [&one, &two] {
        assert_eq!(run_layout::list_checkpoints(run).iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6], "{}", run.display());
    }

    setup.ranks(2, &split, "--max-steps 3 --eval-every 3 --save-every 3");
    setup.ranks(2, &split, "--max-steps 6 --eval-every 3 --save-every 3 --resume");
    assert_eq!(max_diff(&final_params(&two), &final_params(&split)), 0.0, "{layout:?}: 2 ranks, resumed at step 3, differ from straight");
    let strip = |v: Vec<Map<String, Value>>| {
        v.into_iter()
            .map(|mut r| {
                r.retain(|k, _| !k.ends_with("_time_s"));
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(metrics(&two)), strip(metrics(&split)), "{layout:?}: metrics of the resumed MPI run");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_ranks_train_as_one_padded() {
    two_ranks_train_as_one(LayoutChoice::Padded);
}

#[test]
fn two_ranks_train_as_one_packed() {
    two_ranks_train_as_one(LayoutChoice::Packed);
}

/// Unequal shares (8 pairs on 3 ranks: 3, 3, 2), two micro-batches a step, and each rank's share
/// computed in passes of one pair (`--micro-batch-tokens 1`): each pass's gradient weighs by its
/// pairs' share of the batch, so the average is still the batch mean of one process's whole batch.
#[test]
fn three_ranks_unequal_shares() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "mpi-three") else { return };
    let (one, three) = (dir.join("one"), dir.join("three"));
    setup.single(&one, "--max-steps 3 --grad-accum 2 --micro-batch-tokens 0");
    setup.ranks(3, &three, "--max-steps 3 --grad-accum 2 --micro-batch-tokens 1");
    let diff = max_diff(&final_params(&one), &final_params(&three));
    eprintln!("max |param diff| one process vs 3 ranks (unequal shares in passes of a pair, grad-accum 2) after 3 steps: {diff:e}");
    assert!(diff <= PARAM_TOL, "3 ranks differ from one process by {diff}");
    assert_close_records(&metrics(&one), &metrics(&three), "metrics, one process vs 3 ranks");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid of rank `rank` among `mpirun`'s children (OpenMPI launches local ranks itself).
fn rank_pid(mpirun: &Child, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // the parent pid is the 2nd field after the parenthesised command name
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        ppid == Some(mpirun.id()) && env.split(|&b| b == 0).any(|v| v == want.as_bytes())
    })
}

/// SIGKILL rank 1 mid-run: mpirun ends rank 0 and exits non-zero within a bound, saying which rank
/// died; every checkpoint left is complete, and the run resumes under MPI to its end.
#[cfg(target_os = "linux")]
#[test]
fn killed_rank_stops_the_job() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "mpi-kill") else { return };
    let run = dir.join("run");
    let mut job = setup
        .mpirun(2)
        .args(setup.args(&run, "--max-steps 100000 --save-every 2 --eval-every 0"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while run_layout::list_checkpoints(&run).len() < 2 {
        if job.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the job ended before it was killed:\n{err}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no second checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = rank_pid(&job, 1).expect("rank 1 among mpirun's children");
    let killed = Instant::now();
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    const BOUND: Duration = Duration::from_secs(60);
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > BOUND {
            let _ = job.kill();
            panic!("rank 0 still running {BOUND:?} after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("job ended {:.2} s after rank 1 was killed, exit {status:?}", killed.elapsed().as_secs_f64());
    assert!(!status.success(), "mpirun exited 0 after a rank was killed");
    assert!(err.contains("rank 1") && (err.contains("signal 9") || err.contains("Killed")), "the message names the dead rank and how it died:\n{err}");

    let saved = run_layout::list_checkpoints(&run);
    assert!(!saved.is_empty());
    for (step, d) in &saved {
        let l = checkpoint::load(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        assert_eq!(l.state.step, *step, "{}", d.display());
    }
    let last = saved.last().unwrap().0;
    let out = setup.ranks(2, &run, &format!("--max-steps {} --save-every 2 --eval-every 0 --resume", last + 2));
    assert!(out.status.success());
    assert_eq!(run_layout::list_checkpoints(&run).last().unwrap().0, last + 2, "resumed to its end");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ranks started with different flags would train different runs: they refuse with one clear
/// message instead of averaging unrelated gradients.
#[test]
fn ranks_with_different_flags_refuse() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "mpi-mismatch") else { return };
    let run = dir.join("run");
    let mut c = Command::new(&setup.mpirun);
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", "1"]).arg(&setup.mpi_bin).args(setup.args(&run, "--max-steps 2"));
    c.args([":", "-np", "1"]).arg(&setup.mpi_bin).args(setup.args(&run, "--max-steps 2 --weight-decay 0.5"));
    let o = c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mismatched ranks trained:\n{err}");
    assert!(err.contains("would train different runs") && err.contains("same flags and data"), "{err}");
    assert!(run_layout::list_checkpoints(&run).is_empty(), "a checkpoint was written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A betadpo built without the `mpi` feature, started as several ranks, refuses (each rank would
/// otherwise train alone into the same run directory).
#[test]
#[cfg(not(feature = "mpi"))]
fn build_without_mpi_refuses_several_ranks() {
    let Some((mpirun, _)) = mpi() else { return };
    let dir = scratch("mpi-plain");
    let o = Command::new(mpirun)
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            env!("CARGO_BIN_EXE_betadpo"),
            "train",
            "--artifacts",
            "a",
            "--data",
            "d",
            "--tokenizer",
            "t",
        ])
        .args(["--out", &s(&dir.join("run"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("error: distributed training: started by an MPI launcher as one of 2 ranks, but this betadpo was built without MPI"), "{err}");
    assert!(!dir.join("run").exists(), "a run directory was created");
    let _ = std::fs::remove_dir_all(&dir);
}
