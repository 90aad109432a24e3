//! The NCCL gradient allreduce (`--allreduce nccl`, the default with a GPU provider under `mpirun`),
//! tested without GPUs: `tests/stand_ins/nccl_over_mpi.c` exports the NCCL and CUDA runtime entry
//! points betadpo calls, on host memory, with the sums done by MPI, and checks what real NCCL
//! requires (rank 0's id on every rank, rank and size, float32 sums in place, balanced groups). So
//! the whole path runs: loading by path, the id carried over MPI, the weighted on-device sum of
//! micro-batches (an ONNX graph), one grouped allreduce a step, polling the stream, the timeout of
//! a hung rank. What only a GPU can show (real device memory, NCCL's transports) waits for one.
//!
//! Needs `mpirun`, `mpicc` and the MPI build of betadpo (see tests/mpi.rs); without them the tests
//! skip with a notice on a developer's machine and fail under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use betadpo::dpo::packing::LayoutChoice;

use common::fixtures::{repo, skip};
use common::mpi_job::{assert_close_records, final_params, max_diff, metrics, Setup, PARAM_TOL};

/// Builds the stand-in library into `dir` with `mpicc` (it calls the job's MPI).
fn stand_in(dir: &Path) -> Option<PathBuf> {
    let Some(mpicc) = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpicc")).find(|m| m.is_file())) else {
        skip("mpicc is not on PATH (.ci/run installs libopenmpi-dev)");
        return None;
    };
    let lib = dir.join("libnccl_stand_in.so");
    let o = Command::new(mpicc).args(["-shared", "-fPIC", "-O1", "-o"]).arg(&lib).arg(repo().join("tests/stand_ins/nccl_over_mpi.c")).output().unwrap();
    assert!(o.status.success(), "mpicc failed:\n{}", String::from_utf8_lossy(&o.stderr));
    Some(lib)
}

/// `ranks` ranks of the MPI build with the stand-in as NCCL and CUDA runtime (exit status not checked).
fn run_with_stand_in(setup: &Setup, lib: &Path, ranks: usize, out: &Path, flags: &str, extra_env: &[(&str, &str)]) -> Output {
    let mut c = setup.mpirun(ranks);
    c.args(setup.args(out, flags)).env("BETADPO_NCCL_LIB", lib).env("BETADPO_CUDART_LIB", lib).env("BETADPO_NCCL_HOST_MEMORY", "1");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// The stand-in's log: per rank, the (allreduces, elements) of each group, in order.
fn groups(log: &Path, rank: usize) -> Vec<(usize, usize)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0] == "rank" && f[1].parse::<usize>().ok()? == rank).then(|| (f[3].parse().unwrap(), f[4].parse().unwrap()))
        })
        .collect()
}

/// 2 ranks summing through the NCCL path train as one process does (same tolerance as MPI's
/// host path, tests/mpi.rs), with exactly one grouped allreduce a step holding every gradient.
fn nccl_trains_as_one(layout: LayoutChoice, ranks: usize, steps: usize, flags: &str) {
    let Some((setup, dir)) = Setup::new(layout, &format!("nccl-{layout:?}-{ranks}")) else { return };
    let Some(lib) = stand_in(&dir) else { return };
    let (one, many, log) = (dir.join("one"), dir.join("many"), dir.join("groups.log"));
    setup.single(&one, &format!("--max-steps {steps} {flags}"));
    let log_s = log.to_str().unwrap();
    let o = run_with_stand_in(&setup, &lib, ranks, &many, &format!("--max-steps {steps} --allreduce nccl {flags}"), &[("BETADPO_STAND_IN_LOG", log_s)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{ranks} ranks with the NCCL stand-in:\n{err}");
    assert!(err.contains("gradients are summed on device memory by NCCL 2.19.0"), "rank 0 says what sums:\n{err}");

    let (p1, pn) = (final_params(&one), final_params(&many));
    let diff = max_diff(&p1, &pn);
    eprintln!("{layout:?}, {ranks} ranks, NCCL path ({flags}): max |param diff| vs one process after {steps} steps: {diff:e}");
    assert!(diff <= PARAM_TOL, "the NCCL path differs from one process by {diff}");
    assert_close_records(&metrics(&one), &metrics(&many), "metrics, one process vs the NCCL path");
    let elements: usize = p1.iter().map(|t| t.data.len()).sum();
    for rank in 0..ranks {
        assert_eq!(groups(&log, rank), vec![(p1.len(), elements); steps], "rank {rank}: one group of every gradient per step");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nccl_two_ranks_train_as_one_packed() {
    nccl_trains_as_one(LayoutChoice::Packed, 2, 4, "");
}

/// Unequal shares (3, 3, 2 pairs) and two micro-batches: the on-device weighted sum (`w g`, then
/// `acc + w g`) gives the batch mean.
#[test]
fn nccl_three_ranks_unequal_shares_accumulate() {
    nccl_trains_as_one(LayoutChoice::Padded, 3, 4, "--grad-accum 2");
}

/// 5 ranks, 6 steps: the sixth batch of the epoch has 4 pairs, so one rank has none and adds zeros.
#[test]
fn nccl_rank_without_pairs_adds_zeros() {
    nccl_trains_as_one(LayoutChoice::Padded, 5, 6, "");
}

/// A rank whose allreduce never completes: it gives up after --nccl-timeout, says so in one line,
/// and the job ends non-zero instead of hanging.
#[test]
fn nccl_hung_rank_times_out() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "nccl-hang") else { return };
    let Some(lib) = stand_in(&dir) else { return };
    let started = Instant::now();
    let o = run_with_stand_in(&setup, &lib, 2, &dir.join("run"), "--max-steps 3 --allreduce nccl --nccl-timeout 2", &[("BETADPO_STAND_IN_HANG_RANK", "1")]);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("the job ended {:.1} s after it started", started.elapsed().as_secs_f64());
    assert!(!o.status.success(), "a hung rank's job exited 0");
    assert!(
        err.contains("error: rank 1 of 2: ") && err.contains("the NCCL gradient allreduce did not finish within 2 s: a rank is hung or gone"),
        "rank 1 names the hang:\n{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(120), "the job took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer's failure that NCCL reports asynchronously (ncclRemoteError): the rank aborts its
/// communicator and ends the job with NCCL's reason.
#[test]
fn nccl_async_error_ends_the_job() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "nccl-async") else { return };
    let Some(lib) = stand_in(&dir) else { return };
    let o = run_with_stand_in(&setup, &lib, 2, &dir.join("run"), "--max-steps 3 --allreduce nccl", &[("BETADPO_STAND_IN_ASYNC_ERROR_RANK", "0")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an NCCL error's job exited 0");
    assert!(
        err.contains("error: rank 0 of 2: ")
            && err.contains("NCCL allreduce (asynchronous error; a rank may have died) failed: remote process exited or there was a network error (stand-in) (ncclResult 6)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank stuck inside a blocking NCCL call (joining the communicator): the watchdog ends it after
/// --nccl-timeout with a message, and the job ends.
#[test]
fn nccl_blocked_init_is_bounded() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "nccl-block") else { return };
    let Some(lib) = stand_in(&dir) else { return };
    let started = Instant::now();
    let o =
        run_with_stand_in(&setup, &lib, 2, &dir.join("run"), "--max-steps 3 --allreduce nccl --nccl-timeout 2", &[("BETADPO_STAND_IN_BLOCK_INIT_RANK", "1")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a blocked rank's job exited 0");
    assert!(err.contains("error: rank 1 of 2: joining the NCCL communicator did not finish within 2 s: a rank is hung or gone"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(120), "the job took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// No GPU and no NCCL: `--allreduce nccl` on the CPU, and a library that is not there, each fail in
/// one line before any step.
#[test]
fn nccl_refusals() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "nccl-refuse") else { return };
    let o = setup.mpirun(2).args(setup.args(&dir.join("cpu"), "--max-steps 2 --allreduce nccl")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("invalid value for --allreduce: nccl sums GPU memory and needs --ep cuda or tensorrt"), "{err}");
    // a missing library in the stand-in's place
    let missing = dir.join("no-such-libnccl.so.2");
    let o = run_with_stand_in(&setup, &missing, 2, &dir.join("missing"), "--max-steps 2 --allreduce nccl", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("distributed training: --allreduce nccl: rank 0 cannot use NCCL: distributed training: cannot load NCCL (")
            && err.contains("set BETADPO_NCCL_LIB to its path)"),
        "{err}"
    );
    // --allreduce auto (the default) falls back to MPI on every rank, says so, and trains
    let o = run_with_stand_in(&setup, &missing, 2, &dir.join("fallback"), "--max-steps 2", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("notice: gradients are summed through MPI on host memory: rank 0 cannot use NCCL: distributed training: cannot load NCCL ("), "{err}");
    assert_eq!(betadpo::run_layout::list_checkpoints(&dir.join("fallback")).last().map(|c| c.0), Some(2));
    for run in ["cpu", "missing"] {
        assert!(betadpo::run_layout::list_checkpoints(&dir.join(run)).is_empty(), "{run}: a checkpoint was written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
