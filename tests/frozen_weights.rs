//! Frozen weights stored once: on disk (every graph of the artifacts references one copy, the model's own
//! data file when the weights are unchanged) and in memory (the sessions share one tensor per weight).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use betadpo::dpo::model::params::Selection;
use betadpo::dpo::{build_artifacts, BuildOptions, Manifest};
use betadpo::onnx::proto::ModelProto;
use betadpo::onnx::{TensorProto, EXTERNAL_MIN_BYTES};
use betadpo::run_layout;
use betadpo::runtime::{run, HostTensor, SessionConfig, SharedWeights};
use betadpo::store::read_safetensors;
use ndarray::{ArrayD, IxDyn};
use prost::Message;

use common::fixtures::quickstart_model;

fn build(sel: Selection, tag: &str) -> PathBuf {
    let out = common::fixtures::scratch(tag);
    build_artifacts(&quickstart_model(), &out, &BuildOptions { selection: sel, ..Default::default() }).unwrap();
    out
}

/// A graph file as written, external data unresolved.
fn raw_model(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

fn external(t: &TensorProto) -> Option<(String, u64, u64)> {
    let get = |k: &str| t.external_data.iter().find(|kv| kv.key == k).map(|kv| kv.value.clone());
    Some((get("location")?, get("offset")?.parse().ok()?, get("length")?.parse().ok()?))
}

/// Every sizeable initializer of every graph lives in an external file, each (name -> place) is the same in
/// every graph that holds it, and no two tensors overlap: every byte of frozen data is on disk once.
fn placements(dir: &Path, m: &Manifest) -> BTreeMap<String, (String, u64, u64)> {
    let mut all: BTreeMap<String, (String, u64, u64)> = BTreeMap::new();
    for spec in m.graphs.values() {
        let model = raw_model(&dir.join(&spec.file));
        for t in &model.graph.unwrap().initializer {
            let place = external(t);
            if t.raw_data.len() >= EXTERNAL_MIN_BYTES {
                panic!("{}: initializer {} ({} bytes) is stored inside the graph", spec.file, t.name, t.raw_data.len());
            }
            if let Some(place) = place {
                let seen = all.entry(t.name.clone()).or_insert_with(|| place.clone());
                assert_eq!(*seen, place, "{}: {} is stored in two places", spec.file, t.name);
            }
        }
    }
    let mut by_file: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for (file, at, len) in all.values() {
        by_file.entry(file).or_default().push((*at, *len));
    }
    for (file, mut spans) in by_file {
        spans.sort();
        spans.dedup();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{file}: tensors overlap at {w:?}");
        }
        let size = std::fs::metadata(dir.join(file)).unwrap().len();
        assert!(spans.last().map(|(a, l)| a + l).unwrap_or(0) <= size, "{file} is shorter than its tensors");
    }
    all
}

/// The one data file of a build: the model's own, cloned (a file system that shares blocks), or frozen.data.
fn data_file(places: &BTreeMap<String, (String, u64, u64)>) -> String {
    let files: BTreeSet<&str> = places.values().map(|(f, _, _)| f.as_str()).collect();
    assert_eq!(files.len(), 1, "one data file for every frozen weight: {files:?}");
    files.into_iter().next().unwrap().to_string()
}

#[test]
fn head_only_build_stores_the_models_weights_once() {
    let dir = build(Selection { head_only: true, ..Default::default() }, "frozen-head");
    let m = Manifest::load(&dir).unwrap();
    let places = placements(&dir, &m);
    assert!(places.len() > 10, "a head-only build keeps the model's weights frozen: {places:?}");
    let file = data_file(&places);
    let stored = std::fs::metadata(dir.join(&file)).unwrap();
    assert_eq!(stored.nlink(), 1, "not a hard link: Python's onnx.load refuses those");
    let model = raw_model(&quickstart_model());
    let in_model: BTreeMap<String, (u64, u64)> =
        model.graph.unwrap().initializer.iter().filter_map(|t| external(t).map(|(_, a, l)| (t.name.clone(), (a, l)))).collect();
    match file.as_str() {
        // cloned: the frozen tensors lie at the offsets the model's own graph gives them
        "model-weights.data" => {
            assert_eq!(stored.len(), std::fs::metadata(quickstart_model().with_extension("onnx.data")).unwrap().len());
            for (name, (_, at, len)) in &places {
                assert_eq!(in_model.get(name), Some(&(*at, *len)), "{name}");
            }
        }
        // written: each frozen tensor once, 64-byte aligned
        "frozen.data" => {
            let bytes: u64 = places.values().map(|(_, _, len)| len).sum();
            assert!(stored.len() >= bytes && stored.len() < bytes + 64 * places.len() as u64, "{} bytes for {bytes}", stored.len());
            assert!(places.values().all(|(_, at, _)| at % 64 == 0));
        }
        other => panic!("unexpected data file {other}"),
    }
    // no other data file holds a copy of them (and `placements` found none inside the graphs)
    let data: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".data")).collect();
    assert_eq!(data, [file]);
}

#[test]
fn changed_weights_are_written_once_into_frozen_data() {
    // the GPT-2 fixture embeds its weights in model.onnx: nothing to link, one frozen.data for all graphs
    let embedded = common::fixtures::repo().join("tests/fixtures/models/gpt2/model.onnx");
    let dir = common::fixtures::scratch("frozen-embedded");
    build_artifacts(&embedded, &dir, &BuildOptions { selection: Selection { head_only: true, ..Default::default() }, ..Default::default() }).unwrap();
    let places = placements(&dir, &Manifest::load(&dir).unwrap());
    assert_eq!(data_file(&places), "frozen.data", "{}", embedded.display());
    let stored: u64 = places.values().map(|(_, _, len)| len).sum();
    let size = std::fs::metadata(dir.join("frozen.data")).unwrap().len();
    assert!(size >= stored && size < stored + 64 * places.len() as u64, "frozen.data has {size} bytes for {stored} bytes of tensors");
}

/// The shared tensors are the ones the sessions compute with: with the weights shared, a session computes
/// the logits of one that loads them itself, bit for bit, even once the data file holds zeros (so ONNX
/// Runtime did not read a copy of its own).
#[test]
fn sessions_sharing_weights_compute_what_the_file_says() {
    let dir = build(Selection { head_only: true, ..Default::default() }, "frozen-shared-session");
    let m = Manifest::load(&dir).unwrap();
    let (infer, eval) = (dir.join(&m.graph("infer").unwrap().file), dir.join(&m.graph("eval").unwrap().file));
    let (params, _) = read_safetensors(&dir.join(&m.parameters_file)).unwrap();
    let ids = HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, 5]), vec![1, 5, 9, 13, 17, 2, 4, 6, 8, 0]).unwrap());
    let mask = HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[2, 5]), vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 0]).unwrap());
    let mut feeds = vec![("input_ids", ids), ("attention_mask", mask)];
    for p in &params {
        feeds.push((p.name.as_str(), HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&p.shape), p.data.clone()).unwrap())));
    }
    let cfg = SessionConfig::default();
    let expected = run(&mut cfg.session_from_file(&infer).unwrap(), &feeds).unwrap();

    let shared = SharedWeights::load(&cfg.ep, &[&infer, &eval]).unwrap();
    let (count, bytes) = shared.size();
    assert!(count > 10 && bytes > 400_000, "shared {count} initializers, {bytes} bytes");
    // the data file (possibly a clone of the repository's model) moved aside, and zeros put in its place
    let data = dir.join(data_file(&placements(&dir, &m)));
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::rename(&data, dir.join("moved-away")).unwrap();
    std::fs::File::create(&data).unwrap().set_len(len).unwrap();
    let mut with = cfg.session_sharing(&infer, &shared).unwrap();
    assert_eq!(run(&mut with, &feeds).unwrap(), expected);
    let zeros = run(&mut cfg.session_from_file(&infer).unwrap(), &feeds).unwrap();
    assert_ne!(zeros, expected, "a session reading the file computes with zeros");
}

/// Rounds the float32 build's frozen weights to the half dtype with numpy (independently of betadpo's
/// conversion) and runs both inference graphs in Python's onnxruntime: the half build must compute what the
/// rounded float32 graph computes, and differ from the unrounded one by a half-precision error.
const HALF_REFERENCE: &str = r#"
import sys, json, struct, numpy as np, onnx, onnxruntime as ort
from onnx import numpy_helper
f32_dir, half_dir, suffix = sys.argv[1:4]
def params(d):
    raw = open(d + "/params.safetensors", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]; head = json.loads(raw[8:8 + n]); out = {}
    for k, v in head.items():
        if k != "__metadata__":
            a, b = v["data_offsets"]; out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], np.float32).reshape(v["shape"])
    return out
def rounded(x):
    if suffix == "float16":
        return x.astype(np.float16).astype(np.float32)
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16          # round to nearest even, as bfloat16
    return u.astype(np.uint32).view(np.float32)
half = onnx.load(half_dir + "/infer.onnx")
stored = {t.name[: -len(suffix) - 1] for t in half.graph.initializer if t.name.endswith("." + suffix)}
ref = onnx.load(f32_dir + "/infer.onnx")
for t in ref.graph.initializer:
    if t.name in stored:
        t.CopyFrom(numpy_helper.from_array(rounded(numpy_helper.to_array(t)), t.name))
ids = np.array([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 0]], np.int64); mask = (ids != 0).astype(np.int64); mask[0, :] = 1
feeds = {"input_ids": ids, "attention_mask": mask}
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
def logits(model_or_path, p):
    s = ort.InferenceSession(model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString(), so)
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {**feeds, **{k: v for k, v in p.items() if k in names}})[0]
h = logits(half_dir + "/infer.onnx", params(half_dir))
r = logits(ref, params(f32_dir))
f = logits(f32_dir + "/infer.onnx", params(f32_dir))
print(json.dumps({"stored": len(stored), "vs_rounded": float(np.abs(h - r).max()), "vs_float32": float(np.abs(h - f).max()), "scale": float(np.abs(f).max())}))
"#;

#[test]
fn half_precision_frozen_weights_compute_like_rounded_float32() {
    if !common::fixtures::python_imports("onnx, onnxruntime, numpy", "the half-precision reference") {
        return;
    }
    let head = Selection { head_only: true, ..Default::default() };
    let f32_dir = build(head.clone(), "frozen-f32");
    let f32_places = placements(&f32_dir, &Manifest::load(&f32_dir).unwrap());
    for (dtype, suffix) in [(betadpo::onnx::dtype::BFLOAT16, "bfloat16"), (betadpo::onnx::dtype::FLOAT16, "float16")] {
        let dir = common::fixtures::scratch(&format!("frozen-{suffix}"));
        let opts = BuildOptions { selection: head.clone(), frozen_dtype: Some(dtype), ..Default::default() };
        build_artifacts(&quickstart_model(), &dir, &opts).unwrap();
        // on disk: every frozen float32 weight of the float32 build is here at half its bytes
        let places = placements(&dir, &Manifest::load(&dir).unwrap());
        let mut halved = 0;
        for (name, (_, _, len)) in &f32_places {
            if let Some((_, _, half_len)) = places.get(&format!("{name}.{suffix}")) {
                assert_eq!(2 * half_len, *len, "{name}");
                halved += 1;
            }
        }
        assert!(halved > 10, "{suffix}: {halved} weights stored at half precision");
        let out =
            std::process::Command::new("python3").args(["-c", HALF_REFERENCE, f32_dir.to_str().unwrap(), dir.to_str().unwrap(), suffix]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("{suffix}: {r}");
        let (vs_rounded, vs_f32, scale) = (r["vs_rounded"].as_f64().unwrap(), r["vs_float32"].as_f64().unwrap(), r["scale"].as_f64().unwrap());
        let infer = raw_model(&dir.join("infer.onnx")).graph.unwrap();
        let half_count = infer.initializer.iter().filter(|t| t.name.ends_with(&format!(".{suffix}")) && t.data_type == dtype).count();
        assert_eq!(r["stored"].as_u64().unwrap(), half_count as u64);
        // float32 compute on the same rounded weights: only summation order may differ
        assert!(vs_rounded <= 1e-5 * scale.max(1.0), "{suffix}: {r}");
        // the weights really are half precision: off the float32 logits by a half-precision error
        let eps = if suffix == "float16" { 2f64.powi(-11) } else { 2f64.powi(-8) };
        assert!(vs_f32 > 0.0 && vs_f32 < 64.0 * eps * scale, "{suffix}: {r}");
    }
}

/// The first step's metrics of `train --max-steps 1` on a quickstart head-only build.
fn first_step(tag: &str, frozen_dtype: Option<betadpo::onnx::DType>) -> serde_json::Value {
    let dir = common::fixtures::scratch(tag);
    let art = dir.join("art");
    let opts = BuildOptions { selection: Selection { head_only: true, ..Default::default() }, frozen_dtype, ..Default::default() };
    build_artifacts(&quickstart_model(), &art, &opts).unwrap();
    let qs = common::fixtures::quickstart();
    let run = dir.join("run");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let args = ["train", "--artifacts", &path(&art), "--data", &path(&qs.join("train.jsonl")), "--tokenizer", &path(&qs.join("tokenizer.json"))];
    let more = ["--out", &path(&run), "--max-steps", "1", "--batch-size", "4", "--lr", "1e-3", "--quiet"];
    let (code, _, err) = common::cli::betadpo(&[&args[..], &more[..]].concat());
    assert_eq!(code, 0, "{tag}: {err}");
    let metrics = std::fs::read_to_string(run.join(run_layout::METRICS_FILE)).unwrap();
    serde_json::from_str(metrics.lines().find(|l| l.contains("\"loss\"")).unwrap()).unwrap()
}

/// A half-precision build trains through the shared half weights, computing in float32: the policy's
/// log-probs of the first batch are the float32 build's up to the weights' rounding.
#[test]
fn half_precision_build_trains() {
    let (f32, bf16) = (first_step("frozen-train-f32", None), first_step("frozen-train-bf16", Some(betadpo::onnx::dtype::BFLOAT16)));
    for key in ["logps/chosen", "logps/rejected"] {
        let (a, b) = (f32[key].as_f64().unwrap(), bf16[key].as_f64().unwrap());
        assert!(a != b && (a - b).abs() < 0.02 * a.abs(), "{key}: float32 {a}, bfloat16 {b}");
    }
    assert!((bf16["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "policy = reference at the first step: {bf16}");
}

/// `graph::compute_in_float32` on a hand-built bfloat16 graph (a half export's pattern: half input,
/// weight, constant and casts) computes in float32 what the half graph means, checked against plain loops
/// over the decoded weights; then `store_frozen` gives the weight its own bfloat16 bytes back.
#[test]
fn a_bfloat16_graph_computes_in_float32() {
    use betadpo::graph::{compute_in_float32, store_frozen, stored_name, Graph, StoredWeights};
    use betadpo::onnx::{attr_i, attr_t, dtype, value_info, Dim};
    let bf16 = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect() };
    let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.3).collect();
    let half_w = TensorProto { name: "w".into(), dims: vec![3, 4], data_type: dtype::BFLOAT16, raw_data: bf16(&w).into(), ..Default::default() };
    let half_c = TensorProto { dims: vec![1], data_type: dtype::BFLOAT16, raw_data: bf16(&[0.5]).into(), ..Default::default() };
    let nodes = vec![
        common::onnx_model::node("MatMul", &["x", "w"], &["y"]),
        common::onnx_model::node_with("Constant", &[], &["c"], vec![attr_t("value", half_c)]),
        common::onnx_model::node("Mul", &["y", "c"], &["z"]),
        common::onnx_model::node_with("Cast", &["z"], &["out"], vec![attr_i("to", dtype::BFLOAT16 as i64)]),
    ];
    let model = common::onnx_model::model(
        "half",
        nodes,
        vec![half_w],
        vec![value_info("x", dtype::BFLOAT16, &[Dim::Fixed(2), Dim::Fixed(3)])],
        vec![value_info("out", dtype::BFLOAT16, &[Dim::Fixed(2), Dim::Fixed(4)])],
    );
    let mut g = Graph::from_model(model).unwrap();
    let original = g.initializers[0].raw_data.clone();
    let origin = compute_in_float32(&mut g).unwrap();
    assert!(g.initializers.iter().all(|t| t.data_type == dtype::FLOAT));
    let bytes = prost::Message::encode_to_vec(&g.clone().into_model());
    let mut s = SessionConfig::default().session_from_bytes(&bytes).unwrap();
    let x: Vec<f32> = vec![1.0, -0.5, 0.25, 2.0, 0.75, -1.5]; // exact in bfloat16
    let out = run(&mut s, &[("x", HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3]), x.clone()).unwrap()))]).unwrap();
    let decoded: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    let expected: Vec<f32> = (0..8).map(|k| (0..3).map(|j| x[k / 4 * 3 + j] * decoded[j * 4 + k % 4]).sum::<f32>() * 0.5).collect();
    let HostTensor::F32(got) = &out[0].1 else { panic!("{out:?}") };
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{got:?} vs {expected:?}");
    }
    // stored back in the model's dtype: the model's own bytes, read through a Cast named like the weight
    let n = store_frozen(&mut g, &["w".to_string()].into(), None, &origin, &mut StoredWeights::default()).unwrap();
    assert_eq!(n, 1);
    let t = g.initializer(&stored_name("w", dtype::BFLOAT16)).unwrap();
    assert_eq!((t.data_type, t.raw_data.as_ptr()), (dtype::BFLOAT16, original.as_ptr()));
    assert!(g.nodes.iter().any(|n| n.op_type == "Cast" && n.output == ["w"]));
}
