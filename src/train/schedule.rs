//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to zero.

use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!("{other:?} is not a schedule (constant, linear, cosine)")),
        }
    }
}

/// Multiplier of the base learning rate at optimizer step `step` (1-based) of `total`.
pub fn factor(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step.saturating_sub(warmup)) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - progress,
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(factor(Schedule::Constant, 1, 4, 10), 0.25);
        assert_eq!(factor(Schedule::Constant, 4, 4, 10), 1.0);
        assert_eq!(factor(Schedule::Constant, 9, 4, 10), 1.0);
        assert!((factor(Schedule::Linear, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert!((factor(Schedule::Cosine, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert!(factor(Schedule::Cosine, 10, 4, 10).abs() < 1e-12);
        assert_eq!(factor(Schedule::Linear, 5, 0, 10), 0.5);
    }
}
