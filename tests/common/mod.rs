pub mod cli;
pub mod fixtures;
pub mod fuzz;
pub mod golden;
pub mod gradcheck;
pub mod mpi_job;
pub mod onnx_model;
pub mod tiny_lm;
