#!/usr/bin/env bash
# Builds betadpo with the `mpi` feature and copies it to target/mpi/betadpo, printing that path.
# Plain `cargo test` builds without the feature; tests/mpi.rs runs this binary under `mpirun` when
# BETADPO_MPI_BIN names it (.ci/run does). Needs an MPI library (mpicc) and libclang.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --features mpi --bin betadpo >&2
mkdir -p target/mpi
# a copy, not cargo's hard link: the next plain build replaces target/debug/betadpo
cp target/debug/betadpo target/mpi/betadpo.tmp
mv target/mpi/betadpo.tmp target/mpi/betadpo
echo "$PWD/target/mpi/betadpo"
