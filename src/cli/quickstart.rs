//! The whole pipeline on the bundled model and data: build-graph → train → eval → export → infer,
//! with a fixed-beta run beside it for comparison.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use betadpo::dpo::export::export_model;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::validate::{validate, ValidateOptions};
use betadpo::dpo::{build_artifacts, BuildOptions, ObjectiveConfig};
use betadpo::infer::Predictor;
use betadpo::output_dir;
use betadpo::runtime::SessionConfig;
use betadpo::text::{load_preferences, LoadOptions};
use betadpo::train::config::TrainConfig;
use betadpo::train::report::eval_groups;
use betadpo::train::trainer::{train, TrainSummary};
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Where the bundled model, tokenizer and data are.
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Output directory: created, or an earlier quickstart's output there replaced (any other
    /// non-empty directory is refused).
    #[arg(long, default_value = "quickstart-run")]
    out: PathBuf,
    /// Optimizer steps of each training run.
    #[arg(long, default_value_t = 400)]
    steps: u64,
    /// Skip the fixed-beta baseline run.
    #[arg(long)]
    no_baseline: bool,
    #[arg(long)]
    quiet: bool,
    /// Intra-op threads of every session (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
}

/// The kind written in a quickstart directory's marker.
const QUICKSTART_MARK: &str = "quickstart";

fn assets_dir(a: &Args) -> Result<PathBuf> {
    let candidates = match &a.assets {
        Some(p) => vec![p.clone()],
        None => vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("graphs/quickstart"), PathBuf::from("graphs/quickstart")],
    };
    candidates
        .into_iter()
        .find(|p| p.join("model.onnx").exists())
        .ok_or_else(|| anyhow::anyhow!("cannot find the bundled quickstart assets (graphs/quickstart/model.onnx); pass --assets DIR"))
}

fn train_run(assets: &Path, artifacts: &Path, out: &Path, a: &Args) -> Result<TrainSummary> {
    let steps = a.steps;
    let cfg = TrainConfig {
        artifacts: artifacts.to_path_buf(),
        data: assets.join("train.jsonl"),
        eval_data: Some(assets.join("test.jsonl")),
        tokenizer: assets.join("tokenizer.json"),
        out: out.to_path_buf(),
        max_steps: Some(steps),
        batch_size: 8,
        // the tiny model's rates (the defaults suit pretrained models)
        lr: 1e-3,
        head_lr: 3e-3,
        eval_every: (steps / 8).max(1),
        group_by: Some("regime".into()),
        progress: !a.quiet,
        threads: a.threads,
        ..Default::default()
    };
    Ok(train(&cfg)?)
}

fn get(r: Option<&Map<String, Value>>, key: &str) -> String {
    r.and_then(|r| r.get(key)).and_then(Value::as_f64).map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

/// What quickstart writes into its folder (besides its marker and lock): the only entries it clears.
fn is_own_output(name: &str) -> bool {
    ["artifacts", "artifacts-fixed", "run-learned", "run-fixed"].contains(&name) || name.starts_with("model.onnx")
}

/// Takes `out` for this quickstart: refused unless it is empty or an earlier quickstart's, locked,
/// and cleared of what an earlier quickstart wrote (and only that).
fn claim_out(out: &Path) -> Result<betadpo::dir_lock::DirLock> {
    // Cleared only when an earlier quickstart wrote it (its marker), so `--out ~/notes` is refused.
    let kind = output_dir::Kind { flag: "--out", what: "an earlier quickstart's output (its .betadpo-output marker)", replaced: true };
    output_dir::claim_replacing(out, &kind, |d| output_dir::marked(d, QUICKSTART_MARK), is_own_output)?;
    let lock = betadpo::dir_lock::hold(out)?;
    // claimed again under the lock; then only what an earlier quickstart wrote is cleared
    output_dir::claim_replacing(out, &kind, |d| output_dir::marked(d, QUICKSTART_MARK), is_own_output)?;
    for e in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let e = e?;
        if is_own_output(&e.file_name().to_string_lossy()) {
            let p = e.path();
            if e.file_type()?.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) }
                .with_context(|| format!("clearing {}", p.display()))?;
        }
    }
    output_dir::mark(out, QUICKSTART_MARK)?;
    Ok(lock)
}

/// Accuracy before and after, the learned beta and the drift, per regime, learned against fixed.
fn print_table(learned: &TrainSummary, fixed: Option<&TrainSummary>) {
    let after = learned.final_eval.as_ref();
    let before = learned.initial_eval.as_ref();
    let base = fixed.and_then(|f| f.final_eval.as_ref());
    println!();
    println!("{:<8} {:>12} {:>14} {:>14} {:>13} {:>14} {:>14}", "regime", "accuracy", "accuracy", "accuracy", "learned", "drift", "drift");
    println!("{:<8} {:>12} {:>14} {:>14} {:>13} {:>14} {:>14}", "", "before", "learned beta", "fixed 0.1", "beta", "learned beta", "fixed 0.1");
    let mut groups = after.map(eval_groups).unwrap_or_default();
    groups.push(String::new());
    for g in groups {
        let sfx = if g.is_empty() { String::new() } else { format!("/{g}") };
        println!(
            "{:<8} {:>12} {:>14} {:>14} {:>13} {:>14} {:>14}",
            if g.is_empty() { "all" } else { &g },
            get(before, &format!("eval/rewards/accuracies{sfx}")),
            get(after, &format!("eval/rewards/accuracies{sfx}")),
            get(base, &format!("eval/rewards/accuracies{sfx}")),
            get(after, &format!("eval/beta/mean{sfx}")),
            get(after, &format!("eval/drift/abs_logratio{sfx}")),
            get(base, &format!("eval/drift/abs_logratio{sfx}")),
        );
    }
    println!("(accuracy before training is 0: policy and reference agree, so no pair has a positive margin yet;");
    println!(" drift = mean |policy − reference| log-prob of an answer, how far training moved the model)");
}

pub fn run(a: Args) -> Result<()> {
    betadpo::runtime::tune_heap(betadpo::runtime::HeapUse::Speed);
    if a.steps == 0 {
        anyhow::bail!(betadpo::Error::BadFlag { flag: "--steps".into(), detail: "0 (must be at least 1)".into() });
    }
    let assets = assets_dir(&a)?;
    let out = a.out.clone();
    let _lock = claim_out(&out)?;
    let step = |s: &str| {
        if !a.quiet {
            eprintln!("\n== {s}");
        }
    };
    step("1/5 build-graph: the bundled tiny Llama + learned beta head + DPO loss, differentiated, then validated");
    let art = out.join("artifacts");
    let report = build_artifacts(&assets.join("model.onnx"), &art, &BuildOptions { layout: LayoutChoice::Auto, ..Default::default() })?;
    if !a.quiet {
        eprintln!("{} backward nodes, {} parameters, {} layout", report.backward_nodes, report.manifest.parameters.len(), report.manifest.layout);
    }
    let checks = validate(&art, &ValidateOptions { threads: a.threads, ..Default::default() })?;
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        anyhow::bail!("validate {}: {}: {}", art.display(), bad.name, bad.detail);
    }
    if !a.quiet {
        eprintln!("validate: all {} checks passed (structure, ONNX Runtime loads every graph, gradient against central differences, packed graphs against the model's own forward)", checks.len());
    }
    step(&format!("2/5 train {} steps with the learned beta (eval on test.jsonl by regime)", a.steps));
    let learned = train_run(&assets, &art, &out.join("run-learned"), &a)?;
    let fixed = if a.no_baseline {
        None
    } else {
        step("3/5 the same with a fixed beta = 0.1 (standard DPO) for comparison");
        let art_fixed = out.join("artifacts-fixed");
        build_artifacts(
            &assets.join("model.onnx"),
            &art_fixed,
            &BuildOptions { objective: ObjectiveConfig { fixed_beta: Some(0.1), ..Default::default() }, layout: LayoutChoice::Auto, ..Default::default() },
        )?;
        Some(train_run(&assets, &art_fixed, &out.join("run-fixed"), &a)?)
    };
    step("4/5 export: trained weights + beta head in one ONNX model");
    let model = out.join("model.onnx");
    export_model(&art, &learned.run.join("final/params.safetensors"), &model, &Default::default())?;
    step("5/5 infer: the learned beta for a few held-out prompts");
    let test = load_preferences(&assets.join("test.jsonl"), &LoadOptions::default())?;
    let mut examples = Vec::new();
    for regime in ["clean", "mixed", "noise"] {
        if let Some(r) = test.rows.iter().find(|r| r.extras.get("regime").map(String::as_str) == Some(regime)) {
            examples.push((regime, r.prompt.clone()));
        }
    }
    let mut pred = Predictor::new(&model, &assets.join("tokenizer.json"), None, &SessionConfig { intra_threads: a.threads, ..Default::default() })?;
    let prompts: Vec<_> = examples.iter().map(|(_, p)| p.clone()).collect();
    let preds = pred.predict(&prompts, false, 0)?;

    print_table(&learned, fixed.as_ref());
    println!();
    for ((regime, _), p) in examples.iter().zip(&preds) {
        println!("infer [{regime}] beta {:.3}  {}", p.beta, p.prompt.replace('\n', "\\n"));
    }
    println!();
    println!("report:         {}", learned.report.display());
    if let Some(f) = &fixed {
        println!("baseline:       {}", f.report.display());
    }
    println!("exported model: {}", model.display());
    println!("metrics:        {}", learned.run.join(betadpo::run_layout::METRICS_FILE).display());
    Ok(())
}
