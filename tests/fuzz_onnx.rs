//! Fuzzing the model loader (issue 11, part 5): seeded byte mutations of real model files and
//! their external data, and structural mutations of decoded models (dropped inputs, swapped ops,
//! wrong attribute types, absurd dims and dtypes, hostile external-data entries). Every case runs
//! what `build-graph` does before ONNX Runtime sees the model, in-process; a few run the whole
//! `build-graph` through the binary. No case may panic, hang, print more than one error line or
//! leave anything behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use betadpo::graph::Graph;
use betadpo::onnx::proto::{self, tensor_proto::DataLocation, StringStringEntryProto};
use betadpo::onnx::{attr, AttrValue, ModelProto, TensorProto};
use common::fixtures::quickstart;
use common::fuzz::{case_count, run, snapshot, Mutator};
use prost::Message;
use rand::Rng;

const SEED: u64 = 0x0b5e_55ed;
const BOUND: Duration = Duration::from_secs(20);

/// What `build-graph` does with a model before it is first run: load (external data included),
/// check, sort, recognise the LM signature.
fn load_and_recognise(path: &Path) -> Result<(), String> {
    let inner = || -> betadpo::Result<()> {
        let mut g = Graph::from_model(betadpo::onnx::load_model(path)?)?;
        g.sort_topologically()?;
        betadpo::dpo::model::recognise(&g, None)?;
        Ok(())
    };
    inner().map_err(|e| e.to_string())
}

/// A directory holding `model.onnx` (rewritten by each case) and, when given, a copy of the
/// external data it refers to.
fn case_dir(name: &str, data: Option<&Path>) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    if let Some(d) = data {
        std::fs::copy(d, dir.join(d.file_name().unwrap())).unwrap();
    }
    dir
}

/// Runs `load_and_recognise` on each input written as `dir/model.onnx` and checks that nothing
/// else in `dir` changed.
fn fuzz_model_bytes(name: &str, dir: PathBuf, cases: usize, make: impl FnMut(usize) -> Vec<u8>) -> common::fuzz::Outcome {
    let model = dir.join("model.onnx");
    let before: Vec<PathBuf> = snapshot(&dir).into_iter().map(|(p, ..)| p).filter(|p| *p != model).collect();
    let outcome = run(name, cases, BOUND, make, move |_, bytes: Vec<u8>| {
        std::fs::write(&model, &bytes).unwrap();
        load_and_recognise(&model)
    });
    let after: Vec<PathBuf> = snapshot(&dir).into_iter().map(|(p, ..)| p).filter(|p| !p.ends_with("model.onnx")).collect();
    assert_eq!(before, after, "{name}: the loader changed its directory");
    outcome
}

#[test]
fn byte_mutations_of_a_real_model() {
    let src = quickstart();
    let seed = std::fs::read(src.join("model.onnx")).unwrap();
    let dir = case_dir("fuzz-onnx-bytes", Some(&src.join("model.onnx.data")));
    let outcome = fuzz_model_bytes("onnx bytes (quickstart llama)", dir, case_count(600), |i| Mutator::new(SEED ^ i as u64).mutate(&seed));
    assert!(outcome.refused > 0, "no mutation was refused: the mutator is not reaching the loader");
}

#[test]
fn byte_mutations_of_a_tiny_model() {
    let seed = common::tiny_lm::model(&["Tanh", "Softplus"]).encode_to_vec();
    let dir = case_dir("fuzz-onnx-tiny", None);
    let outcome = fuzz_model_bytes("onnx bytes (tiny)", dir, case_count(2000), |i| Mutator::new(SEED + i as u64).mutate(&seed));
    assert!(outcome.refused > 0 && outcome.accepted > 0, "{outcome:?}");
}

#[test]
fn mutations_of_external_data() {
    let src = quickstart();
    let model = std::fs::read(src.join("model.onnx")).unwrap();
    let data = std::fs::read(src.join("model.onnx.data")).unwrap();
    let dir = case_dir("fuzz-onnx-data", None);
    std::fs::write(dir.join("model.onnx"), &model).unwrap();
    let path = dir.join("model.onnx");
    let data_path = dir.join("model.onnx.data");
    let outcome = run(
        "external data bytes",
        case_count(300),
        BOUND,
        |i| Mutator::new(SEED * 3 + i as u64).mutate(&data),
        move |_, bytes: Vec<u8>| {
            std::fs::write(&data_path, &bytes).unwrap();
            load_and_recognise(&path)
        },
    );
    assert!(outcome.refused > 0 && outcome.accepted > 0, "{outcome:?}");
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

const OPS: &[&str] =
    &["MatMul", "Gemm", "Add", "Tanh", "Softmax", "Transpose", "Reshape", "Gather", "Concat", "Split", "Slice", "Constant", "Where", "Range", "NoSuchOp"];
const ATTRS: &[&str] = &["axis", "perm", "transB", "alpha", "value", "axes", "to", "keepdims"];
const LOCATIONS: &[&str] = &["/etc/passwd", "../x", "", ".", "model.onnx", "missing.bin", "a/../../b", "model.onnx.data", "/dev/zero"];
const NUMBERS: &[&str] = &["0", "1", "abc", "-1", "18446744073709551615", "18446744073709551616", "4096", "99999999999"];

/// One random structural edit of a decoded model.
fn mutate_structure(m: &mut ModelProto, rng: &mut impl Rng) {
    let g = m.graph.get_or_insert_with(Default::default);
    let pick = |rng: &mut dyn rand::RngCore, n: usize| if n == 0 { None } else { Some(rng.random_range(0..n)) };
    let names: Vec<String> = g.node.iter().flat_map(|n| n.output.clone()).chain(g.initializer.iter().map(|t| t.name.clone())).collect();
    match rng.random_range(0..12) {
        0..=4 => {
            let Some(k) = pick(rng, g.node.len()) else { return };
            let n = &mut g.node[k];
            match rng.random_range(0..6) {
                0 => {
                    if let Some(j) = pick(rng, n.input.len()) {
                        n.input.remove(j);
                    }
                }
                1 => n.output.clear(),
                2 => n.op_type = OPS[rng.random_range(0..OPS.len())].into(),
                3 => {
                    let name = ATTRS[rng.random_range(0..ATTRS.len())];
                    let value = match rng.random_range(0..5) {
                        0 => AttrValue::Int(rng.random_range(-5..5)),
                        1 => AttrValue::Float(rng.random()),
                        2 => AttrValue::Ints((0..rng.random_range(0..5)).map(|_| rng.random_range(-3..6)).collect()),
                        3 => AttrValue::Str("x".into()),
                        _ => AttrValue::Tensor(hostile_tensor(rng)),
                    };
                    n.attribute.retain(|a| a.name != name);
                    n.attribute.push(attr(name, value));
                }
                4 => {
                    let input = match pick(rng, names.len()) {
                        Some(j) if rng.random_bool(0.7) => names[j].clone(),
                        _ => "nowhere".into(),
                    };
                    n.input.push(input);
                }
                _ => {
                    // a cycle: the node reads the last node's output
                    if let Some(last) = g.node.last().and_then(|l| l.output.first()).cloned() {
                        if let Some(x) = g.node[k].input.first_mut() {
                            *x = last;
                        }
                    }
                }
            }
        }
        5..=8 => {
            let Some(k) = pick(rng, g.initializer.len()) else { return };
            let t = &mut g.initializer[k];
            match rng.random_range(0..4) {
                0 => *t = TensorProto { name: t.name.clone(), ..hostile_tensor(rng) },
                1 => t.data_type = rng.random_range(0..30),
                2 => {
                    let cut = rng.random_range(0..=t.raw_data.len());
                    t.raw_data.truncate(cut);
                }
                _ => {
                    t.data_location = DataLocation::External as i32;
                    let entry = |k: &str, v: &str| StringStringEntryProto { key: k.into(), value: v.into() };
                    t.external_data = vec![entry("location", LOCATIONS[rng.random_range(0..LOCATIONS.len())])];
                    for key in ["offset", "length"] {
                        if rng.random_bool(0.7) {
                            t.external_data.push(entry(key, NUMBERS[rng.random_range(0..NUMBERS.len())]));
                        }
                    }
                }
            }
        }
        9 => {
            if let Some(k) = pick(rng, g.output.len()) {
                g.output.remove(k);
            }
            if let Some(k) = pick(rng, g.input.len()) {
                g.input[k].name = "renamed".into();
            }
        }
        10 => {
            let k = pick(rng, g.node.len()).unwrap_or(0);
            let copy = g.node.get(k).cloned().unwrap_or_default();
            g.node.insert(0, copy);
        }
        _ => m.opset_import = vec![proto::OperatorSetIdProto { domain: String::new(), version: rng.random_range(-1..30) }],
    }
}

/// A tensor with random dims (negative, zero, huge) and dtype, and data of a random length.
fn hostile_tensor(rng: &mut impl Rng) -> TensorProto {
    const DIMS: &[i64] = &[0, 1, 2, 8, 16, -1, 1 << 20, 1 << 40, i64::MAX];
    let dims: Vec<i64> = (0..rng.random_range(0..4)).map(|_| DIMS[rng.random_range(0..DIMS.len())]).collect();
    let data: Vec<u8> = (0..rng.random_range(0..80)).map(|_| rng.random()).collect();
    TensorProto { dims, data_type: rng.random_range(0..18), raw_data: data.into(), ..Default::default() }
}

#[test]
fn structural_mutations() {
    let tiny = common::tiny_lm::model(&["Tanh", "Softplus"]);
    let real = ModelProto::decode(std::fs::read(quickstart().join("model.onnx")).unwrap().as_slice()).unwrap();
    let dir = case_dir("fuzz-onnx-structure", Some(&quickstart().join("model.onnx.data")));
    let outcome = fuzz_model_bytes("onnx structure", dir, case_count(1500), |i| {
        let mut mutator = Mutator::new(SEED * 7 + i as u64);
        let mut m = if i % 3 == 0 { real.clone() } else { tiny.clone() };
        for _ in 0..mutator.rng().random_range(1..=3) {
            mutate_structure(&mut m, mutator.rng());
        }
        m.encode_to_vec()
    });
    assert!(outcome.refused > 0 && outcome.accepted > 0, "{outcome:?}");
}

/// Mutated models that load go through the whole build in-process (probe, differentiation,
/// packing): an error leaves no output directory, a success a complete one.
#[test]
fn structural_mutations_built() {
    let real = ModelProto::decode(std::fs::read(quickstart().join("model.onnx")).unwrap().as_slice()).unwrap();
    let dir = case_dir("fuzz-onnx-built", Some(&quickstart().join("model.onnx.data")));
    let (model, out) = (dir.join("model.onnx"), dir.join("art"));
    let outcome = run(
        "onnx structure, built",
        case_count(150),
        BOUND,
        |i| {
            let mut mutator = Mutator::new(SEED * 13 + i as u64);
            let mut m = real.clone();
            mutate_structure(&mut m, mutator.rng());
            m.encode_to_vec()
        },
        move |_, bytes: Vec<u8>| {
            std::fs::write(&model, &bytes).unwrap();
            let built = betadpo::dpo::build_artifacts(&model, &out, &Default::default());
            assert_eq!(out.join("manifest.json").exists(), built.is_ok(), "half-written artifacts");
            let _ = std::fs::remove_dir_all(&out);
            built.map(|_| ()).map_err(|e| e.to_string())
        },
    );
    assert!(outcome.refused > 0 && outcome.accepted > 0, "{outcome:?}");
}

/// The whole `build-graph` through the binary, on mutated tiny models: it succeeds, or it prints
/// one error line, exits non-zero and creates no output directory.
#[test]
fn build_graph_end_to_end() {
    let tiny = common::tiny_lm::model(&["Tanh", "Softplus"]);
    let dir = common::fixtures::scratch("fuzz-onnx-e2e");
    let (mut ok, mut refused) = (0, 0);
    for i in 0..case_count(24) {
        let mut mutator = Mutator::new(SEED * 11 + i as u64);
        let bytes = if i % 2 == 0 {
            mutator.mutate(&tiny.encode_to_vec())
        } else {
            let mut m = tiny.clone();
            mutate_structure(&mut m, mutator.rng());
            m.encode_to_vec()
        };
        let model = dir.join(format!("model-{i}.onnx"));
        std::fs::write(&model, &bytes).unwrap();
        let out = dir.join(format!("art-{i}"));
        let (code, _, err) = common::cli::betadpo(&["build-graph", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"]);
        if code == 0 {
            ok += 1;
            assert!(out.join("manifest.json").exists(), "case {i}: success without artifacts");
        } else {
            refused += 1;
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!(lines.len() == 1 && lines[0].starts_with("error: "), "case {i}: {err}");
            common::cli::assert_absent(&out);
        }
    }
    eprintln!("build-graph end to end: {ok} built, {refused} refused");
    assert!(refused > 0, "no case was refused");
}
