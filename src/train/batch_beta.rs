//! The trainer's side of beta-DPO (see `dpo::objective::beta_dpo`): the running margin statistics it carries
//! from batch to batch and checkpoints, and the Gumbel noise its filter samples with.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::session_io::BatchBetaInputs;

/// beta-DPO's moving averages of the margin's mean (M_0) and standard deviation. Kept as f64 so the
/// checkpoint's JSON holds the graph's float32 values exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MarginStats {
    pub mean: f64,
    pub std: f64,
}

impl MarginStats {
    pub fn of(v: [f32; 2]) -> Self {
        MarginStats { mean: v[0] as f64, std: v[1] as f64 }
    }

    /// The graph inputs for one micro-batch of `pairs` pairs; `micro_batch` counts micro-batches
    /// from the start of the run, so a resumed run draws the same noise as an uninterrupted one.
    pub fn inputs(&self, seed: u64, micro_batch: u64, pairs: usize) -> BatchBetaInputs {
        BatchBetaInputs { margin_stats: [self.mean as f32, self.std as f32], selection_noise: gumbel_noise(seed, micro_batch, pairs), ..Default::default() }
    }
}

/// Standard Gumbel samples `-ln(-ln u)`: top-k of `log w + g` samples k items without
/// replacement with probabilities proportional to `w`, as `torch.multinomial(w, k)` does.
pub fn gumbel_noise(seed: u64, micro_batch: u64, pairs: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(micro_batch);
    (0..pairs)
        .map(|_| {
            // in (0, 1): both logarithms stay finite
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            -(-u.ln()).ln() as f32
        })
        .collect()
}
