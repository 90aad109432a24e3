//! TRL's names for `train`: a `DPOConfig` YAML trains the same run as the equivalent flags, the
//! command line overrides the file, a key or value betadpo cannot honour is one line naming it, and
//! a run shows its settings first, then plain progress lines (standard error is a pipe here) and,
//! with `--report-to tensorboard`, event files holding the metrics.

mod common;

use std::path::{Path, PathBuf};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, ObjectiveConfig};
use betadpo::run_layout::{self, EVENTS_DIR};
use betadpo::train::metrics::read_log;
use betadpo::train::tensorboard::{read_events, scalars};
use serde_json::{Map, Value};

use common::cli::{assert_one_line_error, betadpo};

struct Setup {
    dir: PathBuf,
    art: PathBuf,
    data: PathBuf,
    tokenizer: PathBuf,
}

/// Fixed-beta (0.1) artifacts of the bundled tiny model, so that TRL's `beta: 0.1` holds.
fn setup(name: &str) -> Setup {
    let q = common::fixtures::quickstart();
    let dir = common::fixtures::scratch(name);
    let art = dir.join("art");
    let objective = ObjectiveConfig { fixed_beta: Some(0.1), ..Default::default() };
    build_artifacts(&q.join("model.onnx"), &art, &BuildOptions { objective, layout: LayoutChoice::Padded, ..Default::default() }).unwrap();
    Setup { dir, art, data: q.join("train.jsonl"), tokenizer: q.join("tokenizer.json") }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every metrics line without its timings (the only values that differ between identical runs).
fn metrics_without_timings(run: &Path) -> Vec<Map<String, Value>> {
    let mut log = read_log(&run.join(run_layout::METRICS_FILE)).unwrap();
    for r in &mut log {
        r.retain(|k, _| !k.ends_with("_time_s"));
    }
    log
}

const FLAGS: &str = "--lr 1e-3 --beta 0.1 --loss-type sigmoid --label-smoothing 0 --batch-size 4 --grad-accum 2 --max-steps 4 \
    --max-length 128 --truncation-mode keep_end --warmup-ratio 0.25 --lr-schedule cosine --weight-decay 0.01 --max-grad-norm 0.5 \
    --logging-steps 2 --save-every 2 --save-total-limit 1 --seed 7 --threads 1";

fn yaml(st: &Setup, out: &Path) -> String {
    format!(
        "# a TRL DPOConfig, with betadpo's own keys for what TRL takes elsewhere\n\
         learning_rate: 1.0e-3\nbeta: 0.1\nloss_type: sigmoid\nlabel_smoothing: 0.0\n\
         per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nmax_steps: 4\nnum_train_epochs: 3.0\n\
         max_length: 128\ntruncation_mode: keep_end\nwarmup_steps: 0.25\nlr_scheduler_type: cosine\n\
         weight_decay: 0.01\nmax_grad_norm: 0.5\nlogging_steps: 2\nsave_steps: 2\nsave_total_limit: 1\nseed: 7\n\
         precompute_ref_log_probs: true\nreport_to: none\neval_strategy: \"no\"\ngradient_checkpointing: true\n\
         output_dir: {}\nartifacts: {}\ndata: {}\ntokenizer: {}\nthreads: 1\n",
        s(out),
        s(&st.art),
        s(&st.data),
        s(&st.tokenizer)
    )
}

#[test]
fn dpo_config_yaml_trains_the_same_run_as_flags() {
    let st = setup("trl-config-same-run");
    let (by_file, by_flags) = (st.dir.join("by-file"), st.dir.join("by-flags"));
    let config = st.dir.join("dpo.yaml");
    std::fs::write(&config, yaml(&st, &by_file)).unwrap();
    let (code, _, err) = betadpo(&["train", "--config", s(&config), "--quiet"]);
    assert_eq!(code, 0, "{err}");

    let mut args = vec!["train", "--artifacts", s(&st.art), "--data", s(&st.data), "--tokenizer", s(&st.tokenizer), "--out", s(&by_flags)];
    args.extend(FLAGS.split_whitespace());
    args.extend(["--report-to", "tensorboard"]);
    let (code, _, err) = betadpo(&args);
    assert_eq!(code, 0, "{err}");

    let (a, b) = (metrics_without_timings(&by_file), metrics_without_timings(&by_flags));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "the YAML and the flags train the same run");
    // warmup_steps 0.25 is transformers 5's ratio: ceil(0.25 x 4) = 1 step of warm-up from 0
    let lr: Vec<f64> = a.iter().map(|r| r["learning_rate"].as_f64().unwrap()).collect();
    assert_eq!(lr[0], 0.0);
    assert_eq!(lr[1], 1e-3);
    assert!((lr[2] - 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 3.0).cos())).abs() < 1e-18, "{lr:?}");

    // The run's first lines and its plain progress lines (standard error is a pipe here).
    let all: Vec<&str> = err.lines().collect();
    let first = all.iter().position(|l| l.starts_with("train: ")).unwrap_or_else(|| panic!("no first lines in:\n{err}"));
    let lines = &all[first..];
    assert!(lines[0].starts_with("train: 4 steps of 8 pairs"), "{err}");
    assert!(lines[1].starts_with("learning rate: model 1e-3; cosine schedule, 1 warm-up steps (ceil of --warmup-ratio 0.25 x 4)"), "{err}");
    assert_eq!(lines[2], "beta: fixed 0.1 (TRL's beta)", "{err}");
    assert!(lines[3].starts_with("trainable: ") && lines[3].contains(" model parameters ("), "{err}");
    let progress: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(progress.len(), 3, "steps 1, 2 and 4 with --logging-steps 2:\n{err}");
    assert!(progress[1].starts_with("step 2/4: loss ") && progress[1].contains("learning rate 1.000e-3"), "{err}");

    // TensorBoard's scalars: every record, at its step, under transformers' tags.
    let events_dir = by_flags.join(EVENTS_DIR);
    let files: Vec<PathBuf> = std::fs::read_dir(&events_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let log = read_log(&by_flags.join(run_layout::METRICS_FILE)).unwrap();
    assert_eq!(events.len(), 1 + log.len());
    for (e, rec) in events[1..].iter().zip(&log) {
        assert_eq!(e.step, rec["step"].as_i64().unwrap());
        let got: Vec<(String, f32)> = e.summary.as_ref().unwrap().value.iter().map(|v| (v.tag.clone(), v.simple_value.unwrap())).collect();
        assert_eq!(got, scalars(rec));
        let loss = got.iter().find(|(t, _)| t == "train/loss").unwrap().1;
        assert_eq!(loss, rec["loss"].as_f64().unwrap() as f32);
    }
}

#[test]
fn the_command_line_overrides_the_file_and_bad_keys_are_named() {
    let st = setup("trl-config-override");
    let out = st.dir.join("run");
    let config = st.dir.join("dpo.yaml");
    std::fs::write(&config, yaml(&st, &out)).unwrap();
    let (code, _, err) = betadpo(&["train", "--config", s(&config), "--max-steps", "1", "--learning-rate", "2e-3", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    let log = metrics_without_timings(&out);
    assert_eq!(log.len(), 1, "--max-steps 1 wins over the file's 4");
    assert_eq!(log[0]["learning_rate"].as_f64(), Some(0.0), "the file's warm-up stays");

    let bad = |name: &str, body: &str| {
        let p = st.dir.join(name);
        std::fs::write(&p, format!("{}{body}", yaml(&st, &st.dir.join(name).with_extension("run")))).unwrap();
        p
    };
    let typo = bad("typo.yaml", "learnig_rate: 1.0e-6\n");
    assert_one_line_error(&["train", "--config", s(&typo)], "learnig_rate: unknown key (the closest supported key is learning_rate)");
    let loss = st.dir.join("loss.yaml");
    std::fs::write(&loss, yaml(&st, &st.dir.join("loss-run")).replace("loss_type: sigmoid", "loss_type: robust")).unwrap();
    assert_one_line_error(&["train", "--config", s(&loss)], "--loss-type: robust, but the artifacts were built with the sigmoid loss");
    let optim = bad("optim.yaml", "optim: sgd\n");
    assert_one_line_error(&["train", "--config", s(&optim)], "optim: \"sgd\" is not supported: betadpo's optimizer is AdamW");
    assert_one_line_error(&["train", "--config", s(&config), "--beta", "0.2"], "--beta: 0.2, but the artifacts were built with beta 0.1");
    let json = st.dir.join("dpo.json");
    std::fs::write(&json, "[1, 2]").unwrap();
    assert_one_line_error(&["train", "--config", s(&json)], "not a mapping of keys to values");
}
