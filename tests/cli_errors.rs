//! Bad input gets one clear line on stderr, a non-zero exit, and nothing half-written.

mod common;

use common::cli::{assert_absent, assert_one_line_error, betadpo};

#[test]
fn missing_model_file() {
    let dir = common::fixtures::scratch("missing");
    let out = dir.join("art");
    assert_one_line_error(&["build-graph", "--model", dir.join("nope.onnx").to_str().unwrap(), "--out", out.to_str().unwrap()], "nope.onnx");
    assert_absent(&out);
}

#[test]
fn truncated_model_file() {
    let dir = common::fixtures::scratch("truncated");
    let bytes = prost::Message::encode_to_vec(&common::tiny_lm::model(&["Tanh"]));
    let path = dir.join("model.onnx");
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = dir.join("art");
    assert_one_line_error(&["build-graph", "--model", path.to_str().unwrap(), "--out", out.to_str().unwrap()], "truncated");
    assert_absent(&out);
}

#[test]
fn truncated_external_data() {
    let Some(llama) = common::fixtures::shared("tiny-llama-dynamo") else { return };
    let dir = common::fixtures::scratch("truncated-data");
    std::fs::copy(llama.join("model.onnx"), dir.join("model.onnx")).unwrap();
    let data = std::fs::read(llama.join("model.onnx.data")).unwrap();
    std::fs::write(dir.join("model.onnx.data"), &data[..data.len() / 2]).unwrap();
    let out = dir.join("art");
    assert_one_line_error(&["build-graph", "--model", dir.join("model.onnx").to_str().unwrap(), "--out", out.to_str().unwrap()], "truncated");
    assert_absent(&out);
}

#[test]
fn model_without_logits() {
    let dir = common::fixtures::scratch("nologits");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    m.graph.as_mut().unwrap().output[0].name = "scores".into();
    m.graph.as_mut().unwrap().node.last_mut().unwrap().output[0] = "scores".into();
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &m);
    let out = dir.join("art");
    assert_one_line_error(&["build-graph", "--model", path.to_str().unwrap(), "--out", out.to_str().unwrap()], "no `logits` output");
    assert_absent(&out);
}

#[test]
fn unsupported_ops_are_all_listed() {
    let dir = common::fixtures::scratch("unsupported");
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &common::tiny_lm::model(&["Selu", "Tanh", "Celu"]));
    let out = dir.join("art");
    let err = assert_one_line_error(&["build-graph", "--model", path.to_str().unwrap(), "--out", out.to_str().unwrap()], "2 op(s)");
    assert!(err.contains("Selu (act0)") && err.contains("Celu (act2)"), "{err}");
    assert_absent(&out);
}

#[test]
fn bad_flag_values() {
    let dir = common::fixtures::scratch("badflags");
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &common::tiny_lm::model(&["Tanh"]));
    let out = dir.join("art");
    let m = path.to_str().unwrap();
    let o = out.to_str().unwrap();
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-init", "-1"], "--beta-init");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-max", "0.05"], "--beta-max");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--freeze", "(["], "--freeze");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--label-smoothing", "0.7"], "--label-smoothing");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-reg", "-1"], "--beta-reg");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-min", "nan"], "--beta-min");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--fixed-beta", "0"], "--fixed-beta");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--fixed-beta", "0.1", "--trainable", "head"], "--trainable head");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-init", "-1e-3"], "--beta-init");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-dpo-alpha", "0.5"], "--beta-dpo-alpha");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "beta-dpo", "--fixed-beta", "0.1"], "--fixed-beta");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "beta-dpo", "--beta-dpo-rho", "1"], "--beta-dpo-rho");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "beta-dpo", "--beta-dpo-beta0", "0"], "--beta-dpo-beta0");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "beta-dpo", "--trainable", "head"], "--trainable head");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--epsilon", "0.01"], "--epsilon");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "epsilon-dpo", "--epsilon", "1"], "--epsilon");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "epsilon-dpo", "--epsilon", "nan"], "--epsilon");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "epsilon-dpo", "--fixed-beta", "0.1"], "--fixed-beta");
    assert_one_line_error(&["build-graph", "--model", m, "--out", o, "--beta-method", "epsilon-dpo", "--trainable", "head"], "--trainable head");
    assert_absent(&out);
}

#[test]
fn good_tiny_model_builds_and_validates() {
    let dir = common::fixtures::scratch("tiny-ok");
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &common::tiny_lm::model(&["Tanh", "Softplus"]));
    let out = dir.join("art");
    let (code, stdout, err) = betadpo(&["build-graph", "--model", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("beta_head.weight"), "{stdout}");
    let (code, stdout, err) = betadpo(&["validate", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("all 10 checks passed"), "{stdout}");
}
