//! Dynamic loss scaling for float16 products (`build-graph --precision fp16`).
//!
//! float16's smallest normal is 6.1e-5, and many of a language model's gradients are smaller: computed in
//! float16 they would flush to zero. The train graph therefore differentiates `loss x loss_scale` (its
//! input), the optimizer multiplies the gradients by `1 / loss_scale` before anything reads them (their
//! norm, clipping, AdamW), and the scale follows PyTorch's `GradScaler`: a step whose gradients are not
//! all finite is skipped and halves the scale; [`GROWTH_INTERVAL`] clean steps in a row double it. The
//! state is part of the checkpoint, so a resumed run scales exactly as the uninterrupted one would.

use serde::{Deserialize, Serialize};

/// The first scale, as PyTorch's `GradScaler` (2^16).
pub const INITIAL_SCALE: f64 = 65536.0;
/// Clean steps in a row after which the scale doubles (`GradScaler`'s `growth_interval`).
pub const GROWTH_INTERVAL: u64 = 2000;
/// The scale never shrinks below this: a model whose gradients overflow even at 1 has a real fault.
pub const MIN_SCALE: f64 = 1.0;
/// Nor does it grow past this (float32's gradients, unscaled, must stay finite).
pub const MAX_SCALE: f64 = 16777216.0;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// What the loss is multiplied by before differentiation.
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
}

/// What the optimizer step does with this step's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Apply,
    /// Some gradient overflowed at this scale: skip the update.
    Skip,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale { scale: INITIAL_SCALE, clean_steps: 0 }
    }
}

impl LossScale {
    /// A run's first state: `scale` (`--loss-scale-init`), or [`INITIAL_SCALE`].
    pub fn starting_at(scale: Option<f64>) -> Self {
        LossScale { scale: scale.unwrap_or(INITIAL_SCALE), clean_steps: 0 }
    }

    /// The factor that turns the graph's scaled gradients back into the loss's gradients.
    pub fn unscale(&self) -> f64 {
        1.0 / self.scale
    }

    /// Updates the scale after a step whose gradients were all finite or not.
    pub fn after_step(&mut self, gradients_finite: bool) -> Verdict {
        if !gradients_finite {
            self.scale = (self.scale / 2.0).max(MIN_SCALE);
            self.clean_steps = 0;
            return Verdict::Skip;
        }
        self.clean_steps += 1;
        if self.clean_steps == GROWTH_INTERVAL {
            self.scale = (self.scale * 2.0).min(MAX_SCALE);
            self.clean_steps = 0;
        }
        Verdict::Apply
    }

    /// Whether this scale can still back off (a non-finite step at the minimum is a real fault).
    pub fn at_minimum(&self) -> bool {
        self.scale <= MIN_SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_skips_and_halves() {
        let mut s = LossScale { scale: 1024.0, clean_steps: 7 };
        assert_eq!(s.after_step(false), Verdict::Skip);
        assert_eq!(s, LossScale { scale: 512.0, clean_steps: 0 });
    }

    #[test]
    fn clean_steps_double_after_the_interval_and_restart_counting() {
        let mut s = LossScale::default();
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert_eq!(s.after_step(true), Verdict::Apply);
        }
        assert_eq!(s.scale, INITIAL_SCALE);
        assert_eq!(s.after_step(true), Verdict::Apply);
        assert_eq!(s, LossScale { scale: 2.0 * INITIAL_SCALE, clean_steps: 0 });
    }

    #[test]
    fn an_overflow_resets_the_clean_count() {
        let mut s = LossScale { scale: 8.0, clean_steps: GROWTH_INTERVAL - 1 };
        s.after_step(false);
        s.after_step(true);
        assert_eq!(s, LossScale { scale: 4.0, clean_steps: 1 });
    }

    #[test]
    fn the_scale_stays_within_its_bounds() {
        let mut s = LossScale { scale: 2.0, clean_steps: 0 };
        s.after_step(false);
        s.after_step(false);
        assert_eq!(s.scale, MIN_SCALE);
        assert!(s.at_minimum());
        let mut s = LossScale { scale: MAX_SCALE, clean_steps: GROWTH_INTERVAL - 1 };
        s.after_step(true);
        assert_eq!(s.scale, MAX_SCALE);
    }

    #[test]
    fn the_state_round_trips_through_json_exactly() {
        let s = LossScale { scale: 131072.0, clean_steps: 1234 };
        let back: LossScale = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(s.unscale() * s.scale, 1.0);
    }
}
