//! `train --config FILE`: a TRL `DPOConfig` / `TrainingArguments` file (YAML or JSON, one flat
//! mapping) turned into `train` flags. TRL's field names map to betadpo's flags, betadpo's own flag
//! names are keys too, and flags given on the command line come after these and win. A key that
//! names nothing is refused with the closest supported key; a TRL key whose value betadpo cannot
//! honour is refused with its value. TRL settings that live in the artifacts (`beta`, `loss_type`,
//! `label_smoothing`) become `--beta`, `--loss-type` and `--label-smoothing`, checked against the
//! manifest by [`check_artifacts`].

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::dpo::objective::config::{LossKind, ObjectiveConfig};
use crate::{Error, Result};

/// A long flag of `train` as the command line defines it (the caller reads them from clap).
#[derive(Clone, Debug)]
pub struct OwnFlag {
    /// Long name and aliases, without the dashes.
    pub names: Vec<String>,
    /// A switch (`--resume`) rather than a flag with a value.
    pub switch: bool,
}

/// What a TRL key becomes.
enum Rule {
    /// The value, given to this flag.
    Flag(&'static str),
    /// Accepted when `ok(value)`, with no flag; otherwise refused with `why`.
    Only(fn(&Value) -> bool, &'static str),
}

/// TRL's `DPOConfig` / `TrainingArguments` fields betadpo reads.
fn trl_rule(key: &str) -> Option<Rule> {
    use Rule::*;
    Some(match key {
        "learning_rate" => Flag("lr"),
        "beta" => Flag("beta"),
        "loss_type" => Flag("loss-type"),
        "label_smoothing" => Flag("label-smoothing"),
        "per_device_train_batch_size" => Flag("batch-size"),
        "gradient_accumulation_steps" => Flag("grad-accum"),
        "num_train_epochs" => Flag("epochs"),
        "max_steps" => Flag("max-steps"),
        "max_length" => Flag("max-length"),
        "max_prompt_length" => Flag("max-prompt-length"),
        "truncation_mode" => Flag("truncation-mode"),
        "warmup_ratio" => Flag("warmup-ratio"),
        "warmup_steps" => Flag("warmup-steps"),
        "lr_scheduler_type" => Flag("lr-schedule"),
        "weight_decay" => Flag("weight-decay"),
        "max_grad_norm" => Flag("max-grad-norm"),
        "adam_beta1" => Flag("adam-beta1"),
        "adam_beta2" => Flag("adam-beta2"),
        "adam_epsilon" => Flag("adam-epsilon"),
        "logging_steps" => Flag("logging-steps"),
        "eval_steps" => Flag("eval-every"),
        "save_steps" => Flag("save-every"),
        "save_total_limit" => Flag("save-total-limit"),
        "seed" => Flag("seed"),
        "output_dir" => Flag("out"),
        "report_to" => Flag("report-to"),
        // betadpo always caches the reference's log-probs before training: the same numbers TRL
        // computes either way, since the reference never changes
        "precompute_ref_log_probs" => Only(|v| v.is_boolean(), "must be true or false"),
        "eval_strategy" | "save_strategy" | "logging_strategy" => {
            Only(|v| matches!(v.as_str(), Some("steps" | "no")), "betadpo counts in steps (\"steps\" or \"no\")")
        }
        // memory against time only: the numbers are the same
        "gradient_checkpointing" => Only(|v| v.is_boolean(), "must be true or false"),
        "bf16" | "fp16" => Only(|v| v == &Value::Bool(false) || v.is_null(), "precision is chosen when the artifacts are built (build-graph --precision)"),
        "optim" => Only(|v| matches!(v.as_str(), Some("adamw_torch" | "adamw_torch_fused")), "betadpo's optimizer is AdamW (adamw_torch)"),
        "lr_scheduler_kwargs" => Only(|v| v.as_object().is_some_and(|o| o.is_empty()) || v.is_null(), "no schedule takes arguments here"),
        _ => return None,
    })
}

const TRL_KEYS: &[&str] = &[
    "learning_rate",
    "beta",
    "loss_type",
    "label_smoothing",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "max_prompt_length",
    "truncation_mode",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler_type",
    "weight_decay",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "seed",
    "output_dir",
    "report_to",
    "precompute_ref_log_probs",
    "eval_strategy",
    "save_strategy",
    "logging_strategy",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "optim",
    "lr_scheduler_kwargs",
];

/// The file's keys and values, in the file's order of keys sorted (a mapping has no order that matters).
pub fn read(path: &Path) -> Result<BTreeMap<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed: std::result::Result<Value, String> =
        if is_json { serde_json::from_str(&text).map_err(|e| e.to_string()) } else { serde_norway::from_str(&text).map_err(|e| e.to_string()) };
    let bad = |detail: String| Error::BadFlag { flag: "--config".into(), detail: format!("{}: {detail}", path.display()) };
    match parsed.map_err(|e| bad(format!("not {} ({e})", if is_json { "JSON" } else { "YAML" })))? {
        Value::Object(m) => Ok(m.into_iter().collect()),
        Value::Null => Ok(BTreeMap::new()),
        _ => Err(bad("not a mapping of keys to values (TRL's DPOConfig fields)".into())),
    }
}

/// `train` flags for the file's keys, to be placed before the command line's own.
pub fn to_flags(path: &Path, entries: &BTreeMap<String, Value>, own: &[OwnFlag]) -> Result<Vec<String>> {
    let key_error = |key: &str, detail: String| Error::BadFlag { flag: "--config".into(), detail: format!("{}: {key}: {detail}", path.display()) };
    let mut args = Vec::new();
    let mut set_by: BTreeMap<String, &str> = BTreeMap::new();
    for (key, value) in entries {
        let (flag, switch) = match trl_rule(key) {
            Some(Rule::Only(ok, _)) if ok(value) => continue,
            Some(Rule::Only(_, why)) => return Err(key_error(key, format!("{} is not supported: {why}", show(value)))),
            // transformers 5 reads a warmup_steps below 1 as a ratio of the run's steps
            Some(Rule::Flag("warmup-steps")) if value.as_f64().is_some_and(|v| v > 0.0 && v < 1.0) => ("warmup-ratio".to_string(), false),
            Some(Rule::Flag(f)) => (f.to_string(), false),
            None => match own_flag(key, own) {
                Some(f) => (f.names[0].clone(), f.switch),
                None => return Err(key_error(key, format!("unknown key (the closest supported key is {})", closest(key, own)))),
            },
        };
        if let Some(other) = set_by.insert(flag.clone(), key) {
            return Err(key_error(key, format!("sets --{flag}, which {other} sets too")));
        }
        let Some(text) = flag_value(key, value).map_err(|d| key_error(key, d))? else { continue };
        match (switch, text.as_str()) {
            (true, "true") => args.push(format!("--{flag}")),
            (true, "false") => {}
            (true, _) => return Err(key_error(key, format!("{text} (must be true or false)"))),
            (false, _) => args.push(format!("--{flag}={text}")),
        }
    }
    Ok(args)
}

/// The command-line text of a value; `None` for values that mean "not set" in TRL.
fn flag_value(key: &str, value: &Value) -> std::result::Result<Option<String>, String> {
    match (key, value) {
        // TrainingArguments' "not set"
        ("max_steps", Value::Number(n)) if n.as_i64() == Some(-1) => Ok(None),
        ("max_prompt_length" | "eval_steps", Value::Null) => Ok(None),
        // TRL's None keeps every checkpoint, as betadpo's 0 does
        ("save_total_limit", Value::Null) => Ok(Some("0".into())),
        ("report_to", Value::Array(items)) if items.is_empty() => Ok(Some("none".into())),
        ("report_to" | "loss_type", Value::Array(items)) if items.len() == 1 => flag_value(key, &items[0]),
        (_, Value::String(s)) => Ok(Some(s.clone())),
        (_, Value::Number(n)) => Ok(Some(n.to_string())),
        (_, Value::Bool(b)) => Ok(Some(b.to_string())),
        (_, Value::Null) => Err("null is not supported here (give a value, or leave the key out for the default)".into()),
        (_, other) => Err(format!("{} is not supported (one value expected)", show(other))),
    }
}

fn show(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The own flag a key names (`head_lr` or `head-lr` for `--head-lr`).
fn own_flag<'a>(key: &str, own: &'a [OwnFlag]) -> Option<&'a OwnFlag> {
    let dashed = key.replace('_', "-");
    own.iter().find(|f| f.names.iter().any(|n| *n == dashed)).filter(|_| dashed != "config")
}

/// The supported key nearest to `key` by edit distance (TRL's names, then betadpo's).
fn closest(key: &str, own: &[OwnFlag]) -> String {
    let own_keys = own.iter().flat_map(|f| f.names.iter()).filter(|n| *n != "config").map(|n| n.replace('-', "_"));
    let candidates: Vec<String> = TRL_KEYS.iter().map(|k| k.to_string()).chain(own_keys).collect();
    candidates.into_iter().min_by_key(|c| edit_distance(key, c)).unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let next = (diag + usize::from(ca != b[j])).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// TRL settings the artifacts fix, as `train` was given them (`--beta`, `--loss-type`, `--label-smoothing`).
#[derive(Clone, Debug, Default)]
pub struct ArtifactSettings {
    pub beta: Option<f64>,
    pub loss_type: Option<String>,
    pub label_smoothing: Option<f64>,
}

/// Refuses a setting the artifacts were not built with, saying which `build-graph` flag gives it.
pub fn check_artifacts(o: &ObjectiveConfig, want: &ArtifactSettings) -> Result<()> {
    let bad = |flag: &str, detail: String| Err(Error::BadFlag { flag: flag.into(), detail });
    if let Some(beta) = want.beta {
        let built = o.fixed_beta.or(o.beta_dpo.map(|d| d.beta0)).or(o.epsilon_dpo.map(|e| e.beta0));
        match built {
            Some(b) if b == beta => {}
            Some(b) => return bad("--beta", format!("{beta}, but the artifacts were built with beta {b}: rebuild them with build-graph --fixed-beta {beta}")),
            None => {
                return bad(
                    "--beta",
                    format!(
                        "{beta} is TRL's fixed beta, but the artifacts learn beta (a head starting at {}, build-graph --beta-init): \
                         rebuild them with build-graph --fixed-beta {beta} for TRL's DPO, or leave beta out to train the learned beta",
                        o.beta_init
                    ),
                )
            }
        }
    }
    if let Some(loss) = &want.loss_type {
        let built = match o.loss {
            LossKind::Sigmoid => "sigmoid",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
        };
        if loss != built {
            let fix = if matches!(loss.as_str(), "sigmoid" | "ipo" | "hinge") {
                format!("rebuild them with build-graph --loss {loss}")
            } else {
                "betadpo has sigmoid, ipo and hinge".to_string()
            };
            return bad("--loss-type", format!("{loss}, but the artifacts were built with the {built} loss: {fix}"));
        }
    }
    if let Some(ls) = want.label_smoothing.filter(|&l| l != o.label_smoothing) {
        return bad(
            "--label-smoothing",
            format!("{ls}, but the artifacts were built with {}: rebuild them with build-graph --label-smoothing {ls}", o.label_smoothing),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Vec<OwnFlag> {
        let f = |names: &[&str], switch| OwnFlag { names: names.iter().map(|s| s.to_string()).collect(), switch };
        vec![f(&["lr", "learning-rate"], false), f(&["head-lr"], false), f(&["resume"], true), f(&["out", "output-dir"], false), f(&["max-steps"], false)]
    }

    fn flags(yaml: &str) -> Result<Vec<String>> {
        let entries: BTreeMap<String, Value> = serde_norway::from_str::<serde_json::Map<String, Value>>(yaml).unwrap().into_iter().collect();
        to_flags(Path::new("dpo.yaml"), &entries, &own())
    }

    #[test]
    fn trl_and_own_keys_become_flags() {
        let got = flags("learning_rate: 5.0e-7\nhead_lr: 0.001\nresume: true\nmax_steps: -1\noutput_dir: runs/a\nreport_to: [tensorboard]\nprecompute_ref_log_probs: false\n").unwrap();
        assert_eq!(got, ["--head-lr=0.001", "--lr=5e-7", "--out=runs/a", "--report-to=tensorboard", "--resume"]);
    }

    #[test]
    fn unknown_and_unsupported_keys_are_named() {
        let e = flags("learnig_rate: 1e-6\n").unwrap_err().to_string();
        assert_eq!(e, "invalid value for --config: dpo.yaml: learnig_rate: unknown key (the closest supported key is learning_rate)");
        let e = flags("optim: sgd\n").unwrap_err().to_string();
        assert!(e.contains("optim: \"sgd\" is not supported"), "{e}");
        let e = flags("lr: 1e-6\nlearning_rate: 2e-6\n").unwrap_err().to_string();
        assert!(e.contains("sets --lr, which learning_rate sets too"), "{e}");
        let e = flags("bf16: true\n").unwrap_err().to_string();
        assert!(e.contains("bf16: true is not supported: precision"), "{e}");
    }

    #[test]
    fn beta_is_checked_against_the_artifacts() {
        let learned = ObjectiveConfig::default();
        let fixed = ObjectiveConfig { fixed_beta: Some(0.1), ..Default::default() };
        let want = |b| ArtifactSettings { beta: Some(b), ..Default::default() };
        assert!(check_artifacts(&fixed, &want(0.1)).is_ok());
        let e = check_artifacts(&fixed, &want(0.2)).unwrap_err().to_string();
        assert!(e.contains("built with beta 0.1: rebuild them with build-graph --fixed-beta 0.2"), "{e}");
        let e = check_artifacts(&learned, &want(0.1)).unwrap_err().to_string();
        assert!(e.contains("0.1 is TRL's fixed beta, but the artifacts learn beta"), "{e}");
        let e = check_artifacts(&learned, &ArtifactSettings { loss_type: Some("robust".into()), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("robust, but the artifacts were built with the sigmoid loss: betadpo has sigmoid, ipo and hinge"), "{e}");
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("learnig_rate", "learning_rate"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
