//! Times the gradient allreduce (`Collective::sum_f32`) for the gradient sizes of a few models:
//! `mpirun -np 2 target/debug/examples/allreduce_bench [ELEMENTS...]` after
//! `cargo build --features mpi --example allreduce_bench`. Rank 0 prints, per size, the best of 3
//! timings and the bus bandwidth it implies (a ring allreduce moves 2(N-1)/N of the buffer per rank).

use std::time::Instant;

fn main() -> betadpo::Result<()> {
    let coll = betadpo::distributed::from_environment()?;
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    // SmolLM2-135M with LoRA rank 16 on every block projection, and in full
    let sizes = if sizes.is_empty() { vec![4_884_480, 134_515_008] } else { sizes };
    let n = coll.size() as f64;
    for len in sizes {
        let mut buf = vec![1.0f32; len];
        coll.sum_f32(&mut buf)?; // warm-up: pages faulted in, connections set up
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            coll.barrier()?;
            let t = Instant::now();
            coll.sum_f32(&mut buf)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        if coll.is_root() {
            let bytes = 4.0 * len as f64;
            let moved = 2.0 * (n - 1.0) / n * bytes;
            println!("{len} float32 ({:.1} MB) over {} ranks: {best:.4} s, bus bandwidth {:.2} GB/s", bytes / 1e6, coll.size(), moved / best / 1e9);
        }
    }
    Ok(())
}
