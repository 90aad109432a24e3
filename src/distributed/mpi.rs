//! [`Collective`] over MPI (rsmpi), for `mpirun -np N betadpo train ...`.
//!
//! Failures: MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) ends the whole job when a
//! collective fails, and `mpirun` ends the others when a rank dies (OpenMPI: "mpirun noticed that
//! process rank 1 ... exited on signal 9"); a rank whose own work fails prints its error and calls
//! [`Collective::abort`]. No rank waits forever on one that is gone.

use std::cell::RefCell;

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Count;

use super::{chunks, Collective, MAX_CHUNK};

/// Elements per `MPI_Allreduce` call: below [`MAX_CHUNK`], and a send copy of 64 MiB.
const SUM_CHUNK: usize = if MAX_CHUNK < 1 << 24 { MAX_CHUNK } else { 1 << 24 };
use crate::{Error, Result};

/// `MPI_COMM_WORLD` of an initialised MPI; finalised when dropped.
pub struct MpiCollective {
    world: SimpleCommunicator,
    scratch_f32: RefCell<Vec<f32>>,
    scratch_f64: RefCell<Vec<f64>>,
    // Dropped last: MPI_Finalize.
    _universe: Universe,
}

impl MpiCollective {
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| Error::Distributed("MPI was already initialised in this process".into()))?;
        Ok(MpiCollective { world: universe.world(), scratch_f32: RefCell::default(), scratch_f64: RefCell::default(), _universe: universe })
    }

    /// `MPI_Allreduce(MPI_SUM)` of `buf` into itself, through `scratch`, in chunks whose counts
    /// fit a C `int` (the safe API has no `MPI_IN_PLACE`; the copy costs far less than the transfer).
    fn sum_chunked<T: Equivalence + Copy + Default>(&self, buf: &mut [T], scratch: &RefCell<Vec<T>>) {
        let mut send = scratch.borrow_mut();
        for range in chunks(buf.len(), SUM_CHUNK) {
            let part = &mut buf[range];
            send.clear();
            send.extend_from_slice(part);
            self.world.all_reduce_into(&send[..], part, SystemOperation::sum());
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_chunked(buf, &self.scratch_f32);
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_chunked(buf, &self.scratch_f64);
        Ok(())
    }
    fn gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let too_long = || Error::Distributed("a gathered message exceeds 2 GiB".into());
        let len = Count::try_from(mine.len()).map_err(|_| too_long())?;
        let mut counts = vec![0 as Count; self.size()];
        self.world.all_gather_into(&len, &mut counts[..]);
        let mut displs = Vec::with_capacity(counts.len());
        let mut total: Count = 0;
        for &c in &counts {
            displs.push(total);
            total = total.checked_add(c).ok_or_else(too_long)?;
        }
        let mut all = vec![0u8; total as usize];
        {
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut parts);
        }
        Ok(counts.iter().zip(&displs).map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec()).collect())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
