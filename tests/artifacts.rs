//! CI graph validation: artifacts built from every fixture model pass `betadpo validate` and
//! `onnx.checker.check_model(full_check=True)` (ONNX's own reference checker, from Python).

mod common;

use std::path::Path;
use std::process::Command;

use betadpo::dpo::packing::{Layout, LayoutChoice, ATTENTION_BIAS};
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
    if !common::fixtures::python_imports("onnx", "onnx.checker's full check") {
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

/// The backward pass leaves none of the patterns `autodiff::fold` removes (each costs a full-size copy
/// per step on a tied embedding, so a regression would show as time, not as a wrong value).
fn assert_folded(dir: &Path, tag: &str) {
    let model = betadpo::onnx::load_model(&dir.join("train.onnx")).unwrap();
    let nodes = &model.graph.as_ref().unwrap().node;
    let producer: std::collections::HashMap<&str, &betadpo::onnx::NodeProto> =
        nodes.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let mut uses: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for n in nodes {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    let from = |x: &str, op: &str| producer.get(x).filter(|p| p.op_type == op).copied();
    for n in nodes.iter().filter(|n| n.name.starts_with("grad/")) {
        let input = |k: usize| n.input.get(k).map(String::as_str).unwrap_or("");
        match n.op_type.as_str() {
            "Transpose" => {
                let gemm = from(input(0), "Gemm").filter(|g| g.input.len() == 2 && uses[g.output[0].as_str()] == 1);
                assert!(gemm.is_none(), "{tag}: {} transposes a Gemm result", n.name);
            }
            "Sum" => {
                for x in &n.input {
                    let into_zeros = from(x, "ScatterND").and_then(|s| from(&s.input[0], "ConstantOfShape"));
                    assert!(into_zeros.is_none(), "{tag}: {} adds a scatter into zeros", n.name);
                }
            }
            "Sub" => {
                let scattered = from(input(0), "ScatterElements").and_then(|s| from(&s.input[0], "ConstantOfShape"));
                assert!(scattered.is_none(), "{tag}: {} subtracts from a scatter into zeros (log-softmax gradient left unfolded)", n.name);
            }
            "Identity" => {
                let copies = producer.get(input(0)).is_some_and(|p| p.name.starts_with("grad/")) && uses[input(0)] == 1;
                assert!(!copies, "{tag}: {} copies a single gradient contribution", n.name);
            }
            _ => {}
        }
    }
}

fn build_and_check(model: &Path, objective: ObjectiveConfig, tag: &str) {
    let out = common::fixtures::scratch(&format!("art-{tag}"));
    build_artifacts(model, &out, &BuildOptions { objective, ..Default::default() }).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let checks = validate(&out, &ValidateOptions::default()).unwrap();
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    assert!(failed.is_empty(), "{} ({tag}): validate failed:\n{}", model.display(), failed.join("\n"));
    assert_folded(&out, tag);
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

/// Packed artifacts (every fixture build-graph packs) pass validate, whose last check compares the
/// packed graphs with the model's own forward on padded rows; with the packed attention bias
/// zeroed in the eval graph (pairs attend to each other and to later tokens) that check fails.
#[test]
fn packed_artifacts_match_the_models_forward() {
    let mut packed = 0;
    for m in common::fixtures::all_models() {
        let tag = m.file_name().unwrap().to_string_lossy().to_string();
        for (name, objective) in [
            ("default", ObjectiveConfig::default()),
            ("sequence-mean", ObjectiveConfig { beta_source: BetaSource::Sequence, beta_aggregate: BetaAggregate::Mean, ..Default::default() }),
        ] {
            let out = common::fixtures::scratch(&format!("packed-{tag}-{name}"));
            let report = build_artifacts(&m.join("model.onnx"), &out, &BuildOptions { objective, layout: LayoutChoice::Auto, ..Default::default() }).unwrap();
            if report.manifest.layout != Layout::Packed {
                let _ = std::fs::remove_dir_all(&out);
                continue;
            }
            packed += 1;
            let checks = validate(&out, &ValidateOptions::default()).unwrap();
            let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
            assert!(failed.is_empty(), "{tag} ({name}): validate failed:\n{}", failed.join("\n"));
            assert!(checks.iter().any(|c| c.name.starts_with("packed layout")), "{tag}: no packed-layout check ran");
            if name == "default" {
                zero_attention_bias(&out.join("eval.onnx"));
                let checks = validate(&out, &ValidateOptions::default()).unwrap();
                let packed_check = checks.iter().find(|c| c.name.starts_with("packed layout")).unwrap();
                assert!(!packed_check.ok, "{tag}: a zeroed attention bias passed the packed-layout check: {}", packed_check.detail);
            }
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    assert!(packed >= 2, "expected at least one packable fixture model (got {packed} packed builds)");
}

/// Rewrites `path` so every reader of the packed attention bias reads `bias * 0` instead.
fn zero_attention_bias(path: &Path) {
    use betadpo::onnx::{attr_t, load_model, save_model, tensor_f32, SaveOptions};
    use common::onnx_model::{node, node_with};
    let mut model = load_model(path).unwrap();
    let g = model.graph.as_mut().unwrap();
    for n in g.node.iter_mut() {
        for i in n.input.iter_mut().filter(|i| *i == ATTENTION_BIAS) {
            *i = "tampered_bias".into();
        }
    }
    let zero = node_with("Constant", &[], &["tampered_zero"], vec![attr_t("value", tensor_f32("", &[], &[0.0]))]);
    let mul = node("Mul", &[ATTENTION_BIAS, "tampered_zero"], &["tampered_bias"]);
    g.node.splice(0..0, [zero, mul]);
    save_model(&model, path, &SaveOptions::default()).unwrap();
}

/// `--detach-head-input`: the model's gradient treats beta as a constant and the head's own
/// parameters still move it. validate checks exactly that by central differences (the model's part
/// of a direction at held betas, the head's part through the graph's loss), on both layouts and with
/// the log-beta regulariser; and a head that is not detached, labelled as detached, fails it.
#[test]
fn detached_head_gradient_is_checked_by_differences() {
    let Some(model) = common::fixtures::all_models().into_iter().find(|m| m.ends_with("tiny-llama-dynamo")) else {
        common::fixtures::skip("no tiny-llama-dynamo fixture");
        return;
    };
    let detached = ObjectiveConfig { detach_head_input: true, beta_reg: 0.1, ..Default::default() };
    for layout in [LayoutChoice::Padded, LayoutChoice::Packed] {
        let out = common::fixtures::scratch(&format!("detached-{layout:?}"));
        build_artifacts(&model.join("model.onnx"), &out, &BuildOptions { objective: detached.clone(), layout, ..Default::default() }).unwrap();
        let checks = validate(&out, &ValidateOptions::default()).unwrap();
        let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
        assert!(failed.is_empty(), "{layout:?}: validate failed:\n{}", failed.join("\n"));
        let _ = std::fs::remove_dir_all(&out);
    }
    // joint artifacts whose manifest claims a detached head: the path through the hidden state is
    // in the model's gradient, and the check at held betas sees it
    let out = common::fixtures::scratch("detached-mislabelled");
    build_artifacts(
        &model.join("model.onnx"),
        &out,
        &BuildOptions { objective: ObjectiveConfig { detach_head_input: false, beta_reg: 0.1, ..Default::default() }, ..Default::default() },
    )
    .unwrap();
    let manifest = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("\"detach_head_input\": false"), "the manifest records the choice");
    std::fs::write(&manifest, text.replace("\"detach_head_input\": false", "\"detach_head_input\": true")).unwrap();
    let checks = validate(&out, &ValidateOptions::default()).unwrap();
    let grad = checks.iter().find(|c| c.detail.contains("directional") || c.name.contains("gradient")).expect("a gradient check");
    assert!(!grad.ok, "a joint head passed as detached: {}", grad.detail);
    eprintln!("mislabelled joint head: {}: {}", grad.name, grad.detail);
    let _ = std::fs::remove_dir_all(&out);
}
