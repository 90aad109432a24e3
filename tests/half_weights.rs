//! Half-precision frozen weights never held in float32 as a whole: at build time large half initializers
//! are deferred (no float32 copy), and in the graphs each reader casts the weight for itself
//! (`graph::cast_per_use`). Checked against products computed here in float64 from the bfloat16 values, on
//! ONNX Runtime.

mod common;

use betadpo::graph::{cast_per_use, compute_in_float32, is_deferred, materialize_deferred, store_frozen, Graph, StoredWeights};
use betadpo::onnx::{attr_ints, dtype, value_info, DType, Dim, TensorProto};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use common::onnx_model::{node, node_with};
use ndarray::{ArrayD, IxDyn};

const K: usize = 64; // hidden
const N: usize = 80; // W: [K, N], 5120 elements (deferred)
const V: usize = 70; // E: [V, K], 4480 elements (deferred)

fn bf16_tensor(name: &str, dims: &[usize], f: impl Fn(usize) -> f32) -> (TensorProto, Vec<f64>) {
    let n: usize = dims.iter().product();
    let values: Vec<half::bf16> = (0..n).map(|i| half::bf16::from_f32(f(i))).collect();
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
    let t = TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: dtype::BFLOAT16,
        raw_data: raw.into(),
        ..Default::default()
    };
    (t, values.iter().map(|v| v.to_f64()).collect())
}

/// A half model where `W` is read twice (`y = x·W`, then `z = y·Wᵀ`, as a backward pass reads it) and a
/// tied `E` is gathered: emb = E[ids], the way an embedding reads it.
fn model() -> (Graph, Vec<f64>, Vec<f64>) {
    let (w, wv) = bf16_tensor("W", &[K, N], |i| ((i * 37 % 101) as f32 - 50.0) / 97.0);
    let (e, ev) = bf16_tensor("E", &[V, K], |i| ((i * 53 % 89) as f32 - 44.0) / 61.0);
    let nodes = vec![
        node("Gather", &["E", "ids"], &["emb"]),
        node("MatMul", &["x", "W"], &["y"]),
        node_with("Transpose", &["W"], &["Wt"], vec![attr_ints("perm", &[1, 0])]),
        node("MatMul", &["y", "Wt"], &["z"]),
    ];
    let io = |name: &str, t: DType, dims: &[i64]| value_info(name, t, &dims.iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>());
    let model = common::onnx_model::model(
        "half",
        nodes,
        vec![w, e],
        vec![io("x", dtype::FLOAT, &[2, K as i64]), io("ids", dtype::INT64, &[3])],
        vec![io("emb", dtype::FLOAT, &[3, K as i64]), io("z", dtype::FLOAT, &[2, K as i64])],
    );
    (Graph::from_model(model).unwrap(), wv, ev)
}

const IDS: [i64; 3] = [5, 69, 0];

fn x() -> Vec<f64> {
    (0..2 * K).map(|i| ((i * 29 % 31) as f64 - 15.0) / 16.0).collect()
}

/// emb and z computed in float64 from the bfloat16 values.
fn expected(w: &[f64], e: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let emb: Vec<f64> = IDS.iter().flat_map(|&r| e[r as usize * K..(r as usize + 1) * K].to_vec()).collect();
    let x = x();
    let y: Vec<f64> = (0..2 * N).map(|k| (0..K).map(|j| x[k / N * K + j] * w[j * N + k % N]).sum()).collect();
    let z: Vec<f64> = (0..2 * K).map(|k| (0..N).map(|j| y[k / K * N + j] * w[(k % K) * N + j]).sum()).collect();
    (emb, z)
}

fn outputs(g: &Graph) -> (Vec<f32>, Vec<f32>) {
    let bytes = prost::Message::encode_to_vec(&g.clone().into_model());
    let mut s = SessionConfig::default().session_from_bytes(&bytes).unwrap();
    let x: Vec<f32> = x().iter().map(|&v| v as f32).collect();
    let inputs = [
        ("x", HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, K]), x).unwrap())),
        ("ids", HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[3]), IDS.to_vec()).unwrap())),
    ];
    let out = run(&mut s, &inputs).unwrap();
    let get = |name: &str| match &out.iter().find(|(n, _)| n == name).unwrap().1 {
        HostTensor::F32(a) => a.iter().copied().collect::<Vec<f32>>(),
        other => panic!("{name}: {other:?}"),
    };
    (get("emb"), get("z"))
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}[{i}]: {a} vs {b}");
    }
}

/// The float32 casts of half initializers (read directly or through a `Reshape`), with how many nodes
/// read each.
fn half_casts(g: &Graph) -> Vec<(String, usize)> {
    let half: Vec<&str> = g.initializers.iter().filter(|t| t.data_type == dtype::BFLOAT16).map(|t| t.name.as_str()).collect();
    let reshaped: Vec<&str> = g.nodes.iter().filter(|n| n.op_type == "Reshape" && half.contains(&n.input[0].as_str())).map(|n| n.output[0].as_str()).collect();
    let consumers = g.consumers();
    g.nodes
        .iter()
        .filter(|n| n.op_type == "Cast" && (half.contains(&n.input[0].as_str()) || reshaped.contains(&n.input[0].as_str())))
        .map(|n| (n.output[0].clone(), consumers.get(n.output[0].as_str()).map_or(0, Vec::len)))
        .collect()
}

#[test]
fn large_half_weights_are_deferred_then_cast_per_use() {
    let (mut g, w, e) = model();
    let origin = compute_in_float32(&mut g).unwrap();
    // no float32 copy of either weight
    assert!(g.initializers.iter().all(|t| t.data_type == dtype::FLOAT && is_deferred(t) && t.raw_data.is_empty()), "{:?}", g.initializers);
    let frozen = ["W".to_string(), "E".to_string()].into();
    assert_eq!(store_frozen(&mut g, &frozen, None, &origin, &mut StoredWeights::default()).unwrap(), 2);
    let shared = g.clone();
    let (want_emb, want_z) = expected(&w, &e);
    let (emb, z) = outputs(&shared);
    assert_close(&emb, &want_emb, "emb, shared casts");
    assert_close(&z, &want_z, "z, shared casts");
    assert_eq!(half_casts(&shared).iter().find(|(n, _)| n == "W").map(|c| c.1), Some(2), "W's cast is read forward and again");

    // per use: the gather reads the half rows, each product its own cast, waiting on its other input
    assert_eq!(cast_per_use(&mut g), 3);
    let (emb, z) = outputs(&g);
    assert_close(&emb, &want_emb, "emb, cast per use");
    assert_close(&z, &want_z, "z, cast per use");
    let casts = half_casts(&g);
    assert_eq!(casts.len(), 2, "one cast per product, none for the gather: {casts:?}");
    assert!(casts.iter().all(|(_, readers)| *readers == 1), "{casts:?}");
    let gather = g.nodes.iter().find(|n| n.op_type == "Gather").unwrap();
    assert_eq!(gather.input[0], "E.bfloat16");
    let waits_on = |reader_input: &str| {
        let sizes: Vec<&str> = g.nodes.iter().filter(|n| n.op_type == "Size").map(|n| n.input[0].as_str()).collect();
        sizes.contains(&reader_input)
    };
    assert!(waits_on("x") && waits_on("y"), "the casts wait on x (y = x·W) and on y (z = y·Wᵀ)");
}

#[test]
fn deferred_weights_kept_in_float32_get_their_values() {
    let (mut g, w, e) = model();
    let origin = compute_in_float32(&mut g).unwrap();
    let frozen = ["W".to_string(), "E".to_string()].into();
    // --frozen-dtype float32: nothing stored in half, so both weights need their float32 values
    assert_eq!(store_frozen(&mut g, &frozen, Some(dtype::FLOAT), &origin, &mut StoredWeights::default()).unwrap(), 0);
    let mut store = StoredWeights::default();
    let mut copy = g.clone();
    assert_eq!(materialize_deferred(&mut g, &origin, &mut store).unwrap(), 2);
    assert_eq!(materialize_deferred(&mut copy, &origin, &mut store).unwrap(), 2);
    assert_eq!(g.initializers[0].raw_data.as_ptr(), copy.initializers[0].raw_data.as_ptr(), "one float32 copy for every graph");
    assert!(g.initializers.iter().all(|t| !is_deferred(t) && t.raw_data.len() == 4 * t.dims.iter().product::<i64>() as usize));
    let (want_emb, want_z) = expected(&w, &e);
    let (emb, z) = outputs(&g);
    assert_close(&emb, &want_emb, "emb");
    assert_close(&z, &want_z, "z");
    assert_eq!(cast_per_use(&mut g), 0, "no half weights, nothing to rewrite");
}

/// A frozen half head cut into vocabulary slices (`Split`, as the sliced log-probs read it), each slice read by
/// a product and, as recomputation gates read it, by a `Shape`.
#[test]
fn slices_of_a_half_weight_cast_only_their_part() {
    let (e, ev) = bf16_tensor("E", &[V, K], |i| ((i * 53 % 89) as f32 - 44.0) / 61.0);
    let sizes = betadpo::onnx::tensor_i64("sizes", &[3], &[30, 30, 10]);
    let nodes = vec![
        node_with("Split", &["E", "sizes"], &["E0", "E1", "E2"], vec![betadpo::onnx::attr_i("axis", 0)]),
        node_with("Gemm", &["x", "E0"], &["z0"], vec![betadpo::onnx::attr_i("transB", 1)]),
        node_with("Gemm", &["x", "E1"], &["z1"], vec![betadpo::onnx::attr_i("transB", 1)]),
        node_with("Gemm", &["x", "E2"], &["z2"], vec![betadpo::onnx::attr_i("transB", 1)]),
        node_with("Concat", &["z0", "z1", "z2"], &["z"], vec![betadpo::onnx::attr_i("axis", 1)]),
        node("Shape", &["E1"], &["s1"]),
    ];
    let io = |name: &str, t: DType, dims: &[i64]| value_info(name, t, &dims.iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>());
    let model = common::onnx_model::model(
        "half_slices",
        nodes,
        vec![e, sizes],
        vec![io("x", dtype::FLOAT, &[2, K as i64])],
        vec![io("z", dtype::FLOAT, &[2, V as i64]), io("s1", dtype::INT64, &[2])],
    );
    let mut g = Graph::from_model(model).unwrap();
    let origin = compute_in_float32(&mut g).unwrap();
    assert_eq!(store_frozen(&mut g, &["E".to_string()].into(), None, &origin, &mut StoredWeights::default()).unwrap(), 1);
    assert_eq!(cast_per_use(&mut g), 4, "three products and the shape");

    let x = x();
    let want: Vec<f64> = (0..2 * V).map(|k| (0..K).map(|j| x[k / V * K + j] * ev[(k % V) * K + j]).sum()).collect();
    let bytes = prost::Message::encode_to_vec(&g.clone().into_model());
    let mut s = SessionConfig::default().session_from_bytes(&bytes).unwrap();
    let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let out = run(&mut s, &[("x", HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, K]), xs).unwrap()))]).unwrap();
    match (&out[0].1, &out[1].1) {
        (HostTensor::F32(z), HostTensor::I64(s1)) => {
            assert_close(&z.iter().copied().collect::<Vec<_>>(), &want, "z");
            assert_eq!(s1.iter().copied().collect::<Vec<_>>(), vec![30, K as i64]);
        }
        other => panic!("{other:?}"),
    }
    // no float32 copy of the whole head: each cast reads one slice of the half weight
    assert!(!g.nodes.iter().any(|n| n.op_type == "Split"), "the Split of the whole cast is gone");
    let casts: Vec<_> = g.nodes.iter().filter(|n| n.op_type == "Cast").collect();
    assert_eq!(casts.len(), 3);
    let producer = |t: &str| g.nodes.iter().find(|n| n.output.iter().any(|o| o == t)).map(|n| n.op_type.clone());
    assert!(casts.iter().all(|c| producer(&c.input[0]).as_deref() == Some("Slice")), "{casts:?}");
}
