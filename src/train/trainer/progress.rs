//! The progress bars `train` draws on standard error (hidden with `--quiet`).

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

/// A bar of `total` units labelled `prefix`, at `pos`; hidden unless `enabled`.
pub fn bar(prefix: &'static str, total: u64, pos: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template").progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb.set_position(pos);
    pb
}

/// A record's value at `key`, NaN when absent or not a number.
fn value(rec: &Map<String, Value>, key: &str) -> f64 {
    rec.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// The train bar's message after a step.
pub fn step_message(rec: &Map<String, Value>) -> String {
    format!("loss {:.4} acc {:.2} beta {:.3}", value(rec, "loss"), value(rec, "rewards/accuracies"), value(rec, "beta/mean"))
}

/// The line printed above the bar after an evaluation at `step`.
pub fn eval_line(step: u64, rec: &Map<String, Value>) -> String {
    format!(
        "step {step}: eval loss {:.4}, accuracy {:.3}, beta {:.3}",
        value(rec, "eval/loss"),
        value(rec, "eval/rewards/accuracies"),
        value(rec, "eval/beta/mean")
    )
}
