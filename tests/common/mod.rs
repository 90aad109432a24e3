pub mod fixtures;
pub mod golden;
pub mod gradcheck;
pub mod tiny_lm;
