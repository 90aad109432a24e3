//! CI graph validation: artifacts built from every fixture model pass `betadpo validate` and
//! `onnx.checker.check_model(full_check=True)` (ONNX's own reference checker, from Python).

mod common;

use std::path::Path;
use std::process::Command;

use betadpo::dpo::validate::{validate, ValidateOptions};
use betadpo::dpo::{build_artifacts, BetaAggregate, BetaSource, BuildOptions, LossKind, ObjectiveConfig};

/// Runs ONNX's checker with full shape inference on every graph in `dir`.
fn onnx_checker(dir: &Path) {
    let script = r#"
import sys, glob, onnx
bad = []
for f in sorted(glob.glob(sys.argv[1] + "/*.onnx")):
    try:
        onnx.checker.check_model(onnx.load(f), full_check=True)
    except Exception as e:
        bad.append(f + ": " + str(e).splitlines()[0])
print("\n".join(bad))
sys.exit(1 if bad else 0)
"#;
    let has_onnx = Command::new("python3").args(["-c", "import onnx"]).status().map(|s| s.success()).unwrap_or(false);
    if !has_onnx {
        assert!(std::env::var_os("CI").is_none(), "CI must install the onnx Python package (.ci/run does)");
        eprintln!("notice: python3 -c 'import onnx' failed; skipping onnx.checker (pip install onnx)");
        return;
    }
    let out = Command::new("python3").args(["-c", script, dir.to_str().unwrap()]).output().unwrap();
    assert!(
        out.status.success(),
        "onnx.checker rejected graphs in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_and_check(model: &Path, objective: ObjectiveConfig, tag: &str) {
    let out = common::fixtures::scratch(&format!("art-{tag}"));
    build_artifacts(model, &out, &BuildOptions { objective, ..Default::default() }).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let checks = validate(&out, &ValidateOptions::default()).unwrap();
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    assert!(failed.is_empty(), "{} ({tag}): validate failed:\n{}", model.display(), failed.join("\n"));
    onnx_checker(&out);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn fixture_models_default_objective() {
    for m in common::fixtures::all_models() {
        let tag = m.file_name().unwrap().to_string_lossy().to_string();
        build_and_check(&m.join("model.onnx"), ObjectiveConfig::default(), &tag);
    }
}

#[test]
fn objective_variants_on_each_fixture() {
    let variants = [
        (
            "sequence-mean-ipo",
            ObjectiveConfig { beta_source: BetaSource::Sequence, beta_aggregate: BetaAggregate::Mean, loss: LossKind::Ipo, ..Default::default() },
        ),
        ("hinge-reg-bounds", ObjectiveConfig { loss: LossKind::Hinge, beta_reg: 0.1, beta_min: 0.01, beta_max: 2.0, ..Default::default() }),
        ("cdpo", ObjectiveConfig { label_smoothing: 0.1, ..Default::default() }),
        ("fixed", ObjectiveConfig { fixed_beta: Some(0.1), ..Default::default() }),
    ];
    for m in common::fixtures::all_models().into_iter().take(2) {
        for (name, cfg) in &variants {
            let tag = format!("{}-{name}", m.file_name().unwrap().to_string_lossy());
            build_and_check(&m.join("model.onnx"), cfg.clone(), &tag);
        }
    }
}

#[test]
fn hand_built_model_without_fixtures() {
    let dir = common::fixtures::scratch("handbuilt");
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &common::tiny_lm::model(&["Tanh", "Sigmoid", "Erf"]));
    build_and_check(&path, ObjectiveConfig::default(), "handbuilt");
}
