//! Trainable-set flags (`--trainable head`, `--freeze`, `--train`) and saving/loading models with
//! external data.

mod common;

use betadpo::dpo::model::params::Selection;
use betadpo::dpo::validate::{validate, ValidateOptions};
use betadpo::dpo::{build_artifacts, BuildOptions, Manifest};
use betadpo::onnx::{load_model, save_model, SaveOptions};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use ndarray::{ArrayD, IxDyn};

use common::fixtures::quickstart_model;

fn build(sel: Selection, tag: &str) -> (std::path::PathBuf, Manifest) {
    let out = common::fixtures::scratch(tag);
    build_artifacts(&quickstart_model(), &out, &BuildOptions { selection: sel, ..Default::default() }).unwrap();
    let m = Manifest::load(&out).unwrap();
    let failed: Vec<String> =
        validate(&out, &ValidateOptions::default()).unwrap().into_iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    assert!(failed.is_empty(), "{tag}: {failed:?}");
    (out, m)
}

#[test]
fn head_only_trains_just_the_head() {
    let (_, m) = build(Selection { head_only: true, ..Default::default() }, "head-only");
    let trainable: Vec<&str> = m.trainable().map(|p| p.name.as_str()).collect();
    assert_eq!(trainable, ["beta_head.weight", "beta_head.bias"]);
    assert_eq!(m.graph("train").unwrap().outputs.iter().filter(|o| o.role == "gradient").count(), 2);
}

#[test]
fn freeze_and_train_patterns() {
    let (_, all) = build(Selection::default(), "sel-all");
    let n_all = all.trainable().count();
    let (_, frozen) = build(Selection { freeze: Some(regex::Regex::new("layers\\.0\\.").unwrap()), ..Default::default() }, "sel-freeze");
    assert!(frozen.trainable().count() < n_all);
    assert!(frozen.trainable().all(|p| p.initializers.iter().all(|r| !r.name.contains("layers.0."))));
    // frozen parameters are listed, untrained
    assert!(frozen.parameters.iter().any(|p| !p.trainable && p.initializers.iter().any(|r| r.name.contains("layers.0."))));
    let (_, only) = build(Selection { train: Some(regex::Regex::new("norm").unwrap()), ..Default::default() }, "sel-train");
    assert!(only.trainable().filter(|p| !p.beta_head).all(|p| p.initializers.iter().any(|r| r.name.contains("norm"))));
    assert!(only.trainable().any(|p| p.beta_head), "the head trains unless --trainable says otherwise");
}

#[test]
fn external_data_round_trip() {
    let dir = common::fixtures::scratch("external");
    let path = dir.join("tiny.onnx");
    let model = common::tiny_lm::model(&["Tanh"]);
    // threshold 0: every sizeable initializer goes to tiny.onnx.data
    save_model(&model, &path, &SaveOptions { external_threshold: 0 }).unwrap();
    assert!(dir.join("tiny.onnx.data").exists());
    assert!(std::fs::metadata(&path).unwrap().len() < 2048, "weights should live in the data file");
    let back = load_model(&path).unwrap();
    let (a, b) = (model.graph.as_ref().unwrap(), back.graph.as_ref().unwrap());
    for (x, y) in a.initializer.iter().zip(&b.initializer) {
        assert_eq!(x.raw_data, y.raw_data, "{}", x.name);
    }
    // ONNX Runtime reads the same file with its external data
    let mut s = SessionConfig::default().session_from_file(&path).unwrap();
    let ids = HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![1, 2, 3]).unwrap());
    let mask = HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![1, 1, 1]).unwrap());
    let out = run(&mut s, &[("input_ids", ids), ("attention_mask", mask)]).unwrap();
    assert_eq!(out[0].1.shape(), &[1, 3, common::tiny_lm::VOCAB as usize]);
}
