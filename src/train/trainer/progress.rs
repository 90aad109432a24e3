//! What `train` shows on standard error (nothing with `--quiet`): its first lines, then a progress
//! bar on a terminal or plain lines every `--logging-steps` in a log file.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

use crate::dpo::manifest::Manifest;
use crate::dpo::objective::config::ObjectiveConfig;
use crate::train::config::TrainConfig;

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

/// The first lines of a run: its length, learning rates and schedule, where beta comes from, and
/// what it trains, so a wrong setting shows before the first step is spent.
pub fn header(cfg: &TrainConfig, m: &Manifest, total: u64, warmup: u64, per_epoch: f64) -> String {
    let (mut model, mut head, mut tensors) = (0u64, 0u64, 0usize);
    for p in m.trainable() {
        let n: u64 = p.shape.iter().map(|&d| d.max(0) as u64).product();
        tensors += 1;
        if p.beta_head {
            head += n;
        } else {
            model += n;
        }
    }
    let pairs = cfg.batch_size * cfg.grad_accum;
    let epochs = if per_epoch > 0.0 { total as f64 * cfg.grad_accum as f64 / per_epoch } else { f64::NAN };
    let what = if m.lora.is_some() { "LoRA adapter" } else { "model" };
    let head_part = if head > 0 { format!(" + {head} in the beta head") } else { String::new() };
    let warm = match (cfg.lr_schedule.warms_up(), warmup) {
        (_, 0) => "no warm-up".to_string(),
        (true, w) if cfg.warmup_steps == 0 => format!("{w} warm-up steps (ceil of --warmup-ratio {} x {total})", cfg.warmup_ratio),
        (true, w) => format!("{w} warm-up steps"),
        (false, w) => format!("no warm-up (transformers' constant ignores the {w} warm-up steps; constant_with_warmup uses them)"),
    };
    let head_rate = if head > 0 { format!(", beta head {:e}", cfg.head_lr) } else { String::new() };
    format!(
        "train: {total} steps of {pairs} pairs ({:.2} epochs), seed {}\n\
         learning rate: model {:e}{head_rate}; {} schedule, {warm}\n\
         beta: {}\n\
         trainable: {} {what} parameters{head_part} ({tensors} tensors)",
        epochs,
        cfg.seed,
        cfg.lr,
        cfg.lr_schedule,
        beta_mode(&m.objective),
        model,
    )
}

/// Where beta comes from, in TRL's terms.
pub fn beta_mode(o: &ObjectiveConfig) -> String {
    if let Some(b) = o.fixed_beta {
        format!("fixed {b} (TRL's beta)")
    } else if let Some(d) = o.beta_dpo {
        format!("beta-DPO, one beta per batch from beta_0 {} (alpha {}, rho {})", d.beta0, d.alpha, d.rho)
    } else if let Some(e) = o.epsilon_dpo {
        format!("epsilon-DPO, from {} (epsilon {})", e.beta0, e.epsilon)
    } else {
        format!("learned by a head, initial value {} (bounds {}..{}); TRL's fixed beta is build-graph --fixed-beta", o.beta_init, o.beta_min, o.beta_max)
    }
}

/// Plain progress lines for a log file (standard error is not a terminal): the first step,
/// every `--logging-steps`, and the last.
pub struct PlainLines {
    every: u64,
    total: u64,
    started: Instant,
    first_step: u64,
}

impl PlainLines {
    /// Lines when progress is on and standard error is not a terminal (the bar shows otherwise).
    pub fn new(cfg: &TrainConfig, total: u64, start_step: u64, enabled: bool) -> Option<Self> {
        (enabled && cfg.progress && !std::io::stderr().is_terminal()).then(|| PlainLines {
            every: cfg.logging_steps,
            total,
            started: Instant::now(),
            first_step: start_step,
        })
    }

    /// The line after the step `rec` records, when one is due.
    pub fn line(&self, rec: &Map<String, Value>) -> Option<String> {
        let step = rec.get("step").and_then(Value::as_u64)?;
        if !(step == self.first_step + 1 || step % self.every == 0 || step == self.total) {
            return None;
        }
        let done = (step - self.first_step) as f64;
        let eta = self.started.elapsed().as_secs_f64() / done * (self.total - step) as f64;
        Some(format!(
            "step {step}/{}: loss {:.4}, accuracy {:.3}, beta {:.4}, learning rate {:.3e}, epoch {:.2}, {:.2} s/step, ETA {}",
            self.total,
            value(rec, "loss"),
            value(rec, "rewards/accuracies"),
            value(rec, "beta/mean"),
            value(rec, "learning_rate"),
            value(rec, "epoch"),
            value(rec, "step_time_s"),
            duration(eta)
        ))
    }
}

/// `1h02m`, `3m05s`, `12s`.
fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}
