//! Data-parallel training under MPI: `mpirun --oversubscribe -np N betadpo train` against one
//! process with the same global batch: the same parameters (to float32 reduction order), the same
//! metrics and reference cache, on padded and packed artifacts, straight and resumed; and a killed
//! rank ends the job with a message, leaving complete checkpoints to resume from.
//!
//! The MPI binary: `$BETADPO_MPI_BIN` (`.ci/run` builds one with `scripts/build_mpi.sh`, as plain
//! `cargo test` builds without the `mpi` feature), else this build's own when it has the feature
//! (`cargo test --features mpi`). Without one, or without `mpirun`, the tests skip with a notice on a
//! developer's machine and fail under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, ObjectiveConfig};
use betadpo::store::{read_safetensors, NamedTensor};
use betadpo::train::checkpoint;
use betadpo::train::metrics::read_log;
use serde_json::{Map, Value};

use common::fixtures::{repo, scratch, shared, skip};

/// Float32 tolerance on parameters between N ranks and one process. The ranks' gradients are
/// means over shares of the batch, weighted and summed, where one process sums the whole batch at
/// once: the same values rounded in another order (a pair's own log-probs are the same bits, see
/// `dpo::answer_logps`). AdamW divides each gradient by its running RMS, so an element whose
/// gradient is a near-cancelling sum (|g| near Adam's epsilon) turns a rounding difference into
/// a step difference of up to about `lr |dg| / epsilon`. Measured max |diff| (lr 1e-3): 2 ranks,
/// 6 steps: 4.8e-6 padded, 1.6e-6 packed; 3 ranks with unequal shares and 2 micro-batches, 3
/// steps: 1.7e-5. The tolerance is 5% of one step's largest move (lr).
const PARAM_TOL: f32 = 5e-5;
/// Metrics (float64 sums of float32 values, over the same pairs in the same order).
const METRIC_TOL: f64 = 1e-4;

struct Inputs {
    model: PathBuf,
    tokenizer: PathBuf,
    train: PathBuf,
    test: PathBuf,
}

fn inputs() -> Option<Inputs> {
    let q = repo().join("graphs/quickstart");
    if q.join("model.onnx").exists() {
        return Some(Inputs { model: q.join("model.onnx"), tokenizer: q.join("tokenizer.json"), train: q.join("train.jsonl"), test: q.join("test.jsonl") });
    }
    let f = shared("")?;
    Some(Inputs {
        model: f.join("tiny-llama-dynamo/model.onnx"),
        tokenizer: f.join("tokenizer/tokenizer.json"),
        train: f.join("prefs/train.jsonl"),
        test: f.join("prefs/test.jsonl"),
    })
}

/// `mpirun` and a betadpo built with the `mpi` feature, or a notice (a failure under CI) and `None`.
fn mpi() -> Option<(PathBuf, PathBuf)> {
    let mpirun = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpirun")).find(|m| m.is_file()));
    let Some(mpirun) = mpirun else {
        skip("mpirun is not on PATH (.ci/run installs openmpi-bin)");
        return None;
    };
    let bin = match std::env::var_os("BETADPO_MPI_BIN") {
        Some(b) => PathBuf::from(b),
        None if cfg!(feature = "mpi") => PathBuf::from(env!("CARGO_BIN_EXE_betadpo")),
        None => {
            skip("BETADPO_MPI_BIN is not set and this test build lacks the mpi feature (scripts/build_mpi.sh builds one; .ci/run does)");
            return None;
        }
    };
    assert!(bin.is_file(), "BETADPO_MPI_BIN={} is not a file", bin.display());
    Some((mpirun, bin))
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The first `n` rows of a JSONL file, written to `dir/name`.
fn head(src: &Path, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let out = dir.join(name);
    std::fs::write(&out, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    out
}

struct Setup {
    mpirun: PathBuf,
    mpi_bin: PathBuf,
    art: PathBuf,
    data: PathBuf,
    eval: PathBuf,
    tokenizer: PathBuf,
}

impl Setup {
    fn new(layout: LayoutChoice, name: &str) -> Option<(Setup, PathBuf)> {
        let (mpirun, mpi_bin) = mpi()?;
        let inp = inputs()?;
        let dir = scratch(name);
        let art = dir.join("art");
        build_artifacts(&inp.model, &art, &BuildOptions { layout, objective: ObjectiveConfig::default(), ..Default::default() }).unwrap();
        // 44 pairs in batches of 8: the sixth batch of an epoch has 4.
        let data = head(&inp.train, 44, &dir, "train.jsonl");
        let eval = head(&inp.test, 20, &dir, "eval.jsonl");
        Some((Setup { mpirun, mpi_bin, art, data, eval, tokenizer: inp.tokenizer }, dir))
    }

    fn args(&self, out: &Path, flags: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--artifacts",
            &s(&self.art),
            "--data",
            &s(&self.data),
            "--eval-data",
            &s(&self.eval),
            "--tokenizer",
            &s(&self.tokenizer),
            "--out",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(
            "--batch-size 8 --lr 1e-3 --head-lr 1e-3 --lr-schedule constant --threads 1 --max-length 128 --pack-tokens 96 --save-total-limit 0 --quiet"
                .split(' ')
                .map(String::from),
        );
        a.extend(flags.split_whitespace().map(String::from));
        a
    }

    /// One process, the plain build (no MPI at all).
    fn single(&self, out: &Path, flags: &str) {
        let o = Command::new(env!("CARGO_BIN_EXE_betadpo")).args(self.args(out, flags)).output().unwrap();
        assert!(o.status.success(), "one process into {}:\n{}", out.display(), String::from_utf8_lossy(&o.stderr));
    }

    fn mpirun(&self, ranks: usize) -> Command {
        let mut c = Command::new(&self.mpirun);
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()]);
        // Containers often forbid the cross-memory attach OpenMPI's shared-memory transport tries first.
        c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
        c.arg(&self.mpi_bin);
        c
    }

    fn ranks(&self, ranks: usize, out: &Path, flags: &str) -> Output {
        let o = self.mpirun(ranks).args(self.args(out, flags)).output().unwrap();
        assert!(o.status.success(), "{ranks} ranks into {}:\n{}", out.display(), String::from_utf8_lossy(&o.stderr));
        o
    }
}

fn final_params(run: &Path) -> Vec<NamedTensor> {
    read_safetensors(&run.join("final").join(checkpoint::PARAMS)).unwrap().0
}

/// The largest |a - b| over all parameters (names and shapes must agree).
fn max_diff(a: &[NamedTensor], b: &[NamedTensor]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut max = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        for (p, q) in x.data.iter().zip(&y.data) {
            assert!(p.is_finite() && q.is_finite(), "{}: non-finite parameter", x.name);
            max = max.max((p - q).abs());
        }
    }
    max
}

fn metrics(run: &Path) -> Vec<Map<String, Value>> {
    read_log(&run.join("metrics.jsonl")).unwrap()
}

/// Same records (steps, keys), every number within `METRIC_TOL` (relative), times aside.
fn assert_close_records(a: &[Map<String, Value>], b: &[Map<String, Value>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: record count");
    for (x, y) in a.iter().zip(b) {
        let keys = |r: &Map<String, Value>| r.keys().filter(|k| !k.ends_with("_time_s")).cloned().collect::<Vec<_>>();
        assert_eq!(keys(x), keys(y), "{what}: keys at step {}", x["step"]);
        for k in keys(x) {
            match (x[&k].as_f64(), y[&k].as_f64()) {
                (Some(p), Some(q)) => assert!((p - q).abs() <= METRIC_TOL * p.abs().max(1.0), "{what}: {k} at step {}: {p} vs {q}", x["step"]),
                _ => assert_eq!(x[&k], y[&k], "{what}: {k} at step {}", x["step"]),
            }
        }
    }
}

/// The reference cache files, by name, as bytes.
fn reference_files(run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(run.join("reference"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

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
        assert_eq!(checkpoint::list(run).iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6], "{}", run.display());
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

/// Unequal shares (8 pairs on 3 ranks: 3, 3, 2) and two micro-batches a step: each rank's
/// gradient weighs by its share, so the average is still the batch mean.
#[test]
fn three_ranks_unequal_shares() {
    let Some((setup, dir)) = Setup::new(LayoutChoice::Padded, "mpi-three") else { return };
    let (one, three) = (dir.join("one"), dir.join("three"));
    setup.single(&one, "--max-steps 3 --grad-accum 2");
    setup.ranks(3, &three, "--max-steps 3 --grad-accum 2");
    let diff = max_diff(&final_params(&one), &final_params(&three));
    eprintln!("max |param diff| one process vs 3 ranks (unequal shares, grad-accum 2) after 3 steps: {diff:e}");
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
    while checkpoint::list(&run).len() < 2 {
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

    let saved = checkpoint::list(&run);
    assert!(!saved.is_empty());
    for (step, d) in &saved {
        let l = checkpoint::load(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        assert_eq!(l.state.step, *step, "{}", d.display());
    }
    let last = saved.last().unwrap().0;
    let out = setup.ranks(2, &run, &format!("--max-steps {} --save-every 2 --eval-every 0 --resume", last + 2));
    assert!(out.status.success());
    assert_eq!(checkpoint::list(&run).last().unwrap().0, last + 2, "resumed to its end");
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
    assert!(checkpoint::list(&run).is_empty(), "a checkpoint was written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A betadpo built without the `mpi` feature, started as several ranks, refuses (each rank would
/// otherwise train alone into the same run directory).
#[test]
fn build_without_mpi_refuses_several_ranks() {
    if cfg!(feature = "mpi") {
        return;
    }
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
