pub mod cli;
pub mod fixtures;
pub mod fuzz;
pub mod golden;
pub mod mpi_job;
pub mod gradcheck;
pub mod tiny_lm;
