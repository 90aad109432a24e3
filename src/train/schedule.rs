//! Learning-rate schedules as transformers' `get_scheduler` computes them: `linear`, `cosine`,
//! `constant` and `constant_with_warmup`, with a linear warm-up from 0 (transformers' `constant`
//! has none). transformers steps its `LambdaLR` after each optimizer step, so optimizer step `s`
//! (1-based) runs at `lambda(s - 1)`: the first step of a run without warm-up gets the full rate,
//! the first of a warm-up gets 0, and a linear decay reaches 0 only after the last step.

use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// transformers' `constant`: the full rate at every step, warm-up ignored.
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl Schedule {
    pub const NAMES: &'static str = "linear, cosine, constant, constant_with_warmup";

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// Whether the schedule reads the warm-up length (transformers' `constant` does not).
    pub fn warms_up(self) -> bool {
        self != Schedule::Constant
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "constant_with_warmup" => Ok(Schedule::ConstantWithWarmup),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!("{other:?} is not a schedule ({})", Schedule::NAMES)),
        }
    }
}

/// Warm-up steps as `TrainingArguments.get_warmup_steps` resolves them: the step count when it is
/// positive, otherwise `ceil(ratio × total)`.
pub fn warmup_steps(steps: u64, ratio: f64, total: u64) -> u64 {
    if steps > 0 {
        steps
    } else {
        (ratio * total as f64).ceil() as u64
    }
}

/// transformers' lambda at scheduler step `current` (0-based) of `total` with `warmup` warm-up steps.
pub fn lambda(schedule: Schedule, current: u64, warmup: u64, total: u64) -> f64 {
    let current_f = current as f64;
    if schedule.warms_up() && current < warmup {
        return current_f / warmup.max(1) as f64;
    }
    match schedule {
        Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
        Schedule::Linear => (total as f64 - current_f).max(0.0) / total.saturating_sub(warmup).max(1) as f64,
        Schedule::Cosine => {
            let progress = (current_f - warmup as f64) / total.saturating_sub(warmup).max(1) as f64;
            // num_cycles = 0.5: half a cosine period, from 1 down to 0
            (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
        }
    }
}

/// Multiplier of the base learning rate at optimizer step `step` (1-based) of `total`.
pub fn factor(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    lambda(schedule, step.saturating_sub(1), warmup, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_steps_match_transformers_by_hand() {
        // get_linear_schedule_with_warmup(N=2, W=0): steps 1, 2 at 1.0 and 0.5 of the rate
        assert_eq!(factor(Schedule::Linear, 1, 0, 2), 1.0);
        assert_eq!(factor(Schedule::Linear, 2, 0, 2), 0.5);
        // warm-up of 4 in 10: 0, 1/4, 2/4, 3/4, then 6/6 .. 1/6
        assert_eq!(factor(Schedule::Linear, 1, 4, 10), 0.0);
        assert_eq!(factor(Schedule::Linear, 4, 4, 10), 0.75);
        assert_eq!(factor(Schedule::Linear, 5, 4, 10), 1.0);
        assert!((factor(Schedule::Linear, 10, 4, 10) - 1.0 / 6.0).abs() < 1e-15);
        assert_eq!(factor(Schedule::Constant, 1, 4, 10), 1.0, "transformers' constant ignores warm-up");
        assert_eq!(factor(Schedule::ConstantWithWarmup, 2, 4, 10), 0.25);
        assert_eq!(factor(Schedule::Cosine, 5, 4, 10), 1.0);
    }

    #[test]
    fn warmup_ratio_rounds_up_as_training_arguments_does() {
        assert_eq!(warmup_steps(0, 0.1, 25), 3);
        // 100 × 0.07 is 7.000000000000001 in binary: transformers' ceil makes it 8, and so does this
        assert_eq!(warmup_steps(0, 0.07, 100), 8);
        assert_eq!(warmup_steps(5, 0.5, 30), 5, "a positive step count wins");
        assert_eq!(warmup_steps(0, 0.0, 30), 0);
    }
}
