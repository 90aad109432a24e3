//! Frozen weights stored once: on disk (every graph of the artifacts references one copy, the model's own
//! data file when the weights are unchanged) and in memory (the sessions share one tensor per weight).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use betadpo::dpo::{build_artifacts, params::Selection, BuildOptions, Manifest};
use betadpo::onnx::proto::ModelProto;
use betadpo::onnx::{TensorProto, EXTERNAL_MIN_BYTES};
use betadpo::runtime::{run, HostTensor, SessionConfig, SharedWeights};
use betadpo::store::read_safetensors;
use ndarray::{ArrayD, IxDyn};
use prost::Message;

fn quickstart_model() -> PathBuf {
    common::fixtures::repo().join("graphs/quickstart/model.onnx")
}

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

#[test]
fn head_only_build_references_the_models_own_data_once() {
    let dir = build(Selection { head_only: true, ..Default::default() }, "frozen-head");
    let m = Manifest::load(&dir).unwrap();
    let places = placements(&dir, &m);
    assert!(places.len() > 10, "a head-only build keeps the model's weights frozen: {places:?}");
    let files: BTreeSet<&str> = places.values().map(|(f, _, _)| f.as_str()).collect();
    let source = quickstart_model().with_extension("onnx.data");
    let linked = dir.join("model-weights.data");
    assert!(files.contains("model-weights.data"), "the model's unchanged weights are referenced, not copied: {files:?}");
    let (a, b) = (std::fs::metadata(&source).unwrap(), std::fs::metadata(&linked).unwrap());
    if a.dev() == b.dev() {
        assert_eq!(a.ino(), b.ino(), "same file system: a hard link, no copy");
    }
    // the frozen tensors lie at the offsets the model's own graph gives them
    let model = raw_model(&quickstart_model());
    let mut matched = 0;
    for t in &model.graph.unwrap().initializer {
        if let (Some((_, at, len)), Some((file, at2, len2))) = (external(t), places.get(&t.name)) {
            if file == "model-weights.data" {
                assert_eq!((at, len), (*at2, *len2), "{}", t.name);
                matched += 1;
            }
        }
    }
    assert!(matched > 10);
    // nothing else holds a copy of them
    let total: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total < 2 * b.len() + 200_000, "artifacts hold {total} bytes for {} bytes of weights", b.len());
}

#[test]
fn changed_weights_are_written_once_into_frozen_data() {
    // the GPT-2 fixture embeds its weights in model.onnx: nothing to link, one frozen.data for all graphs
    let embedded = common::fixtures::repo().join("tests/fixtures/models/gpt2/model.onnx");
    let dir = common::fixtures::scratch("frozen-embedded");
    build_artifacts(&embedded, &dir, &BuildOptions { selection: Selection { head_only: true, ..Default::default() }, ..Default::default() }).unwrap();
    let places = placements(&dir, &Manifest::load(&dir).unwrap());
    let files: BTreeSet<&str> = places.values().map(|(f, _, _)| f.as_str()).collect();
    assert_eq!(files, BTreeSet::from(["frozen.data"]), "{}", embedded.display());
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

    let shared = SharedWeights::load(&cfg, &[&infer, &eval]).unwrap();
    let (count, bytes) = shared.size();
    assert!(count > 10 && bytes > 400_000, "shared {count} initializers, {bytes} bytes");
    // a link to the repository's model: moved aside (never written), and a file of zeros put in its place
    let data = dir.join("model-weights.data");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::rename(&data, dir.join("moved-away")).unwrap();
    std::fs::File::create(&data).unwrap().set_len(len).unwrap();
    let mut with = cfg.session_sharing(&infer, &shared).unwrap();
    assert_eq!(run(&mut with, &feeds).unwrap(), expected);
    let zeros = run(&mut cfg.session_from_file(&infer).unwrap(), &feeds).unwrap();
    assert_ne!(zeros, expected, "a session reading the file computes with zeros");
}
