pub mod fixtures;
pub mod gradcheck;
pub mod tiny_lm;
