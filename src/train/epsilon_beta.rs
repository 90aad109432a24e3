//! The trainer's side of epsilon-DPO (see `dpo::objective::epsilon_dpo`): the global beta it carries from step
//! to step and checkpoints, and the tally of the pairs' steps over the micro-batches of one
//! optimizer step that updates it.

use serde_json::{Map, Value};

/// The steps of one optimizer step's pairs, all micro-batches together.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTally {
    up: usize,
    down: usize,
    pairs: usize,
}

impl StepTally {
    /// Adds a micro-batch's steps (+1, -1 or 0 per pair, as the graph returns them).
    pub fn add(&mut self, steps: &[f32]) {
        self.up += steps.iter().filter(|&&s| s > 0.5).count();
        self.down += steps.iter().filter(|&&s| s < -0.5).count();
        self.pairs += steps.len();
    }

    /// The counts `[up, down, pairs]`, for summing over ranks ([`StepTally::from_counts`]).
    pub fn counts(&self) -> [f64; 3] {
        [self.up as f64, self.down as f64, self.pairs as f64]
    }

    pub fn from_counts(c: [f64; 3]) -> Self {
        StepTally { up: c[0] as usize, down: c[1] as usize, pairs: c[2] as usize }
    }

    /// The mean step over the pairs of the whole optimizer step (the reference code averages the
    /// micro-batches' means, the same for equal micro-batches).
    pub fn mean(&self) -> f64 {
        (self.up as f64 - self.down as f64) / self.pairs.max(1) as f64
    }
}

/// `beta / (1 + eps mean(step))`, rounded to float32 as the graph reads it, so a checkpoint's JSON
/// holds exactly the value the next step feeds.
pub fn next_beta(beta: f64, epsilon: f64, tally: &StepTally) -> f64 {
    (beta / (1.0 + epsilon * tally.mean())) as f32 as f64
}

/// The reference code's metric names: the beta this step used, the mean step, and the fractions of
/// pairs stepping up (+1) and down (-1).
pub fn record(rec: &mut Map<String, Value>, beta_used: f64, tally: &StepTally) {
    let num = |x: f64| serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null);
    let n = tally.pairs.max(1) as f64;
    rec.insert("kl/beta".into(), num(beta_used));
    rec.insert("kl/avg_steps".into(), num(tally.mean()));
    rec.insert("kl/p_epsilon_steps".into(), num(tally.up as f64 / n));
    rec.insert("kl/n_epsilon_steps".into(), num(tally.down as f64 / n));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_is_over_all_pairs_of_the_step() {
        let mut t = StepTally::default();
        t.add(&[1.0, 1.0, 0.0, -1.0]);
        t.add(&[1.0, 0.0]);
        assert_eq!(t.mean(), 2.0 / 6.0);
        assert_eq!(next_beta(0.1, 0.01, &t), (0.1 / (1.0 + 0.01 * 2.0 / 6.0)) as f32 as f64);
    }
}
