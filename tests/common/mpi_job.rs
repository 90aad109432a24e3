//! An MPI job of `betadpo train` against one process, for tests/mpi.rs and tests/nccl.rs: the
//! inputs, the launcher, and comparisons of parameters and metrics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, ObjectiveConfig};
use betadpo::run_layout;
use betadpo::store::{read_safetensors, NamedTensor};
use betadpo::train::metrics::read_log;
use serde_json::{Map, Value};

use super::fixtures::{scratch, skip};

/// Float32 tolerance on parameters between N ranks and one process. The ranks' gradients are
/// means over shares of the batch, weighted and summed, where one process sums the whole batch at
/// once: the same values rounded in another order (a pair's own log-probs are the same bits, see
/// `dpo::objective::answer_logps`). AdamW divides each gradient by its running RMS, so an element whose
/// gradient is a near-cancelling sum (|g| near Adam's epsilon) turns a rounding difference into
/// a step difference of up to about `lr |dg| / epsilon`. Measured max |diff| (lr 1e-3): 2 ranks,
/// 6 steps: 4.8e-6 padded, 1.6e-6 packed; 3 ranks with unequal shares and 2 micro-batches, 3
/// steps: 1.7e-5. The tolerance is 5% of one step's largest move (lr).
pub const PARAM_TOL: f32 = 5e-5;
/// Metrics (float64 sums of float32 values, over the same pairs in the same order).
pub const METRIC_TOL: f64 = 1e-4;

/// `mpirun` and a betadpo built with the `mpi` feature, or a notice (a failure under CI) and `None`.
pub fn mpi() -> Option<(PathBuf, PathBuf)> {
    let mpirun = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpirun")).find(|m| m.is_file()));
    let Some(mpirun) = mpirun else {
        skip("mpirun is not on PATH (.ci/run installs openmpi-bin)");
        return None;
    };
    let bin = match std::env::var_os("BETADPO_MPI_BIN") {
        Some(b) => PathBuf::from(b),
        None if cfg!(feature = "mpi") => PathBuf::from(env!("CARGO_BIN_EXE_betadpo")),
        None => {
            skip("BETADPO_MPI_BIN is not set and this test build lacks the mpi feature (scripts/ci/build_mpi.sh builds one; .ci/run does)");
            return None;
        }
    };
    assert!(bin.is_file(), "BETADPO_MPI_BIN={} is not a file", bin.display());
    Some((mpirun, bin))
}

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// The first `n` rows of a JSONL file, written to `dir/name`.
pub fn head(src: &Path, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let out = dir.join(name);
    std::fs::write(&out, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    out
}

pub struct Setup {
    pub mpirun: PathBuf,
    pub mpi_bin: PathBuf,
    pub art: PathBuf,
    pub data: PathBuf,
    pub eval: PathBuf,
    pub tokenizer: PathBuf,
}

impl Setup {
    pub fn new(layout: LayoutChoice, name: &str) -> Option<(Setup, PathBuf)> {
        let (mpirun, mpi_bin) = mpi()?;
        let inp = super::train_run::inputs()?;
        let dir = scratch(name);
        let art = dir.join("art");
        build_artifacts(&inp.model, &art, &BuildOptions { layout, objective: ObjectiveConfig::default(), ..Default::default() }).unwrap();
        // 44 pairs in batches of 8: the sixth batch of an epoch has 4.
        let data = head(&inp.train, 44, &dir, "train.jsonl");
        let eval = head(&inp.test, 20, &dir, "eval.jsonl");
        Some((Setup { mpirun, mpi_bin, art, data, eval, tokenizer: inp.tokenizer }, dir))
    }

    pub fn args(&self, out: &Path, flags: &str) -> Vec<String> {
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
    pub fn single(&self, out: &Path, flags: &str) {
        let o = Command::new(env!("CARGO_BIN_EXE_betadpo")).args(self.args(out, flags)).output().unwrap();
        assert!(o.status.success(), "one process into {}:\n{}", out.display(), String::from_utf8_lossy(&o.stderr));
    }

    pub fn mpirun(&self, ranks: usize) -> Command {
        let mut c = Command::new(&self.mpirun);
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string()]);
        // Containers often forbid the cross-memory attach OpenMPI's shared-memory transport tries first.
        c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
        c.arg(&self.mpi_bin);
        c
    }

    pub fn ranks(&self, ranks: usize, out: &Path, flags: &str) -> Output {
        let o = self.mpirun(ranks).args(self.args(out, flags)).output().unwrap();
        assert!(o.status.success(), "{ranks} ranks into {}:\n{}", out.display(), String::from_utf8_lossy(&o.stderr));
        o
    }
}

pub fn final_params(run: &Path) -> Vec<NamedTensor> {
    read_safetensors(&run.join(run_layout::FINAL_DIR).join(run_layout::PARAMS)).unwrap().0
}

/// The largest |a - b| over all parameters (names and shapes must agree).
pub fn max_diff(a: &[NamedTensor], b: &[NamedTensor]) -> f32 {
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

pub fn metrics(run: &Path) -> Vec<Map<String, Value>> {
    read_log(&run.join(run_layout::METRICS_FILE)).unwrap()
}

/// Same records (steps, keys), every number within `METRIC_TOL` (relative), times aside.
pub fn assert_close_records(a: &[Map<String, Value>], b: &[Map<String, Value>], what: &str) {
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
pub fn reference_files(run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(run.join("reference"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}
