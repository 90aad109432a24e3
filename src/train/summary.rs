//! What a finished run reports.

use std::path::PathBuf;

use serde_json::{Map, Value};

/// What a finished run reports.
pub struct TrainSummary {
    pub run: PathBuf,
    pub steps: u64,
    pub initial_eval: Option<Map<String, Value>>,
    pub final_eval: Option<Map<String, Value>>,
    pub last_train: Option<Map<String, Value>>,
    pub resumed_from: Option<u64>,
    /// Pairs whose reference log-probs this run computed (the others came from the run's cache).
    pub reference_pairs_computed: usize,
    pub stats: String,
    pub report: PathBuf,
}
