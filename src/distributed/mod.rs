//! Data-parallel training across processes: the collective operations the trainer needs, behind
//! [`Collective`], so the training loop is the same code in one process ([`Single`]) and under
//! `mpirun` (the `mpi` feature's [`MpiCollective`]).
//!
//! Every rank runs the whole loop on the same data order; what the ranks exchange is summed or
//! gathered, so that after every step each rank holds the same parameters and rank 0 the metrics
//! one process would have written (see `train::trainer` for what is sharded and how).

#[cfg(feature = "mpi")]
mod mpi;
pub mod nccl;
mod watchdog;
pub mod wire;

#[cfg(feature = "mpi")]
pub use self::mpi::MpiCollective;
#[cfg(not(feature = "mpi"))]
use crate::Error;
use crate::Result;

/// Most elements one MPI call moves: MPI counts are C `int`s, so larger buffers go in chunks.
pub const MAX_CHUNK: usize = 1 << 30;

/// The collective operations of data-parallel training. Every rank must call them in the same
/// order with buffers of the same length (for the sums); a rank that dies or errors ends the job
/// (see [`Collective::abort`]), so none waits forever.
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of processes in the job.
    fn size(&self) -> usize;
    /// Sums `buf` element-wise over the ranks, in place; every rank receives the sum.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// As [`Collective::sum_f32`], for the few float64 tallies behind metrics.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `mine`, in rank order, on every rank (lengths may differ).
    fn gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with exit status `code` (after this rank printed why).
    fn abort(&self, code: i32) -> !;

    /// Whether this rank writes the run's files (metrics, checkpoints, report) and draws progress.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: nothing to exchange.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The job size an MPI launcher announced in the environment (OpenMPI's `mpirun`, MPICH's and
/// Intel MPI's Hydra, MVAPICH), if this process was started by one.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// This rank's index among the ranks on its machine, as the launcher announced it (OpenMPI, MPICH's
/// Hydra, MVAPICH, Slurm's `srun`); it picks the GPU of a rank that was not given one.
pub fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The collective for this process: MPI when an MPI launcher started it (and this build has the
/// `mpi` feature), else [`Single`]. A launch of several ranks by a build without MPI is refused:
/// each rank would train alone, all into the same run directory.
pub fn from_environment() -> Result<Box<dyn Collective>> {
    let Some(n) = launched_size() else { return Ok(Box::new(Single)) };
    #[cfg(feature = "mpi")]
    {
        let _ = n;
        Ok(Box::new(MpiCollective::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    if n <= 1 {
        Ok(Box::new(Single))
    } else {
        Err(Error::Distributed(format!(
            "started by an MPI launcher as one of {n} ranks, but this betadpo was built without MPI (build it with `cargo build --release --features mpi`)"
        )))
    }
}

/// The `[start, end)` ranges of at most [`MAX_CHUNK`] elements that cover `0..len`.
pub fn chunks(len: usize, max: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len).step_by(max.max(1)).map(move |s| s..(s + max.max(1)).min(len))
}

/// The contiguous share of `n` items that rank `rank` of `size` takes: the first `n % size` ranks
/// take one more, so concatenating the shares in rank order gives back `0..n`.
pub fn share(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_partition_in_rank_order() {
        for n in 0..20 {
            for size in 1..6 {
                let joined: Vec<usize> = (0..size).flat_map(|r| share(n, r, size)).collect();
                assert_eq!(joined, (0..n).collect::<Vec<_>>(), "n {n} size {size}");
                let lens: Vec<usize> = (0..size).map(|r| share(n, r, size).len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "n {n} size {size}: {lens:?}");
            }
        }
    }

    #[test]
    fn chunks_cover_without_overlap() {
        let c: Vec<_> = chunks(10, 4).collect();
        assert_eq!(c, vec![0..4, 4..8, 8..10]);
        assert_eq!(chunks(0, 4).count(), 0);
        assert_eq!(chunks(8, 4).collect::<Vec<_>>(), vec![0..4, 4..8]);
    }
}
