//! Integration tests for `betadpo::runtime`: provisioning (into private cache directories, so the process-wide
//! environment variables are never touched), execution-provider parsing and errors, and real sessions on tiny
//! models built in memory.

/// Provisioning tests. (A crate root resolves `mod x;` next to itself, hence the explicit path.)
mod common;

#[path = "runtime/provision.rs"]
mod provision;

use betadpo::onnx::proto::NodeProto;
use betadpo::onnx::{dtype, value_info, Dim};
use betadpo::runtime::{self, input_names, output_names, run, ExecutionProvider, HostTensor, OptLevel, SessionConfig};
use common::onnx_model::node;
use ndarray::ArrayD;
use prost::Message;

// ---------------------------------------------------------------------------------------------- model builders

fn model(nodes: Vec<NodeProto>, inputs: Vec<(&str, i32)>, outputs: Vec<(&str, i32, Vec<Dim>)>) -> Vec<u8> {
    let dims = || vec![Dim::Fixed(2), Dim::Fixed(3)];
    common::onnx_model::model(
        "test",
        nodes,
        vec![],
        inputs.into_iter().map(|(n, t)| value_info(n, t, &dims())).collect(),
        outputs.into_iter().map(|(n, t, d)| value_info(n, t, &d)).collect(),
    )
    .encode_to_vec()
}

/// Outputs of four element types, declared in an order unlike the node order, to check `run` returns them all,
/// in the session's output order.
fn mixed_model() -> Vec<u8> {
    let d23 = vec![Dim::Fixed(2), Dim::Fixed(3)];
    model(
        vec![
            node("Add", &["x", "y"], &["sum"]),
            node("Greater", &["x", "y"], &["gt"]),
            node("Shape", &["x"], &["shape"]),
            node("Identity", &["n"], &["n_out"]),
        ],
        vec![("x", dtype::FLOAT), ("y", dtype::FLOAT), ("n", dtype::INT32)],
        vec![("shape", dtype::INT64, vec![Dim::Fixed(2)]), ("sum", dtype::FLOAT, d23.clone()), ("n_out", dtype::INT32, d23.clone()), ("gt", dtype::BOOL, d23)],
    )
}

fn add_model() -> Vec<u8> {
    let d23 = vec![Dim::Fixed(2), Dim::Fixed(3)];
    model(vec![node("Add", &["x", "y"], &["sum"])], vec![("x", dtype::FLOAT), ("y", dtype::FLOAT)], vec![("sum", dtype::FLOAT, d23)])
}

fn f32_input(values: &[f32]) -> HostTensor {
    HostTensor::f32(&[2, 3], values.to_vec()).unwrap()
}

// ---------------------------------------------------------------------------------------------- sessions and run

#[test]
fn add_model_returns_correct_numbers() {
    let mut session = SessionConfig::default().session_from_bytes(&add_model()).expect("session");
    assert_eq!(input_names(&session), ["x", "y"]);
    assert_eq!(output_names(&session), ["sum"]);
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let y = [0.5, -2.0, 10.0, 0.25, -5.0, 1e3];
    let out = run(&mut session, &[("x", f32_input(&x)), ("y", f32_input(&y))]).expect("run");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "sum");
    let sum = out[0].1.as_f32().expect("float output");
    assert_eq!(sum.shape(), [2, 3]);
    let expected: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_eq!(sum.iter().copied().collect::<Vec<_>>(), expected);
}

#[test]
fn run_returns_all_outputs_in_session_order_with_their_types() {
    let config = SessionConfig { intra_threads: Some(1), optimization: OptLevel::Disable, ..Default::default() };
    let mut session = config.session_from_bytes(&mixed_model()).expect("session");
    let x = [1.0, 5.0, 3.0, 0.0, -1.0, 2.0];
    let y = [2.0, 4.0, 3.0, -1.0, -2.0, 7.0];
    let n = ArrayD::from_shape_vec(vec![2, 3], vec![1i32, 2, 3, 4, 5, 6]).unwrap();
    let out = run(&mut session, &[("x", f32_input(&x)), ("y", f32_input(&y)), ("n", n.clone().into())]).unwrap();
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["shape", "sum", "n_out", "gt"]);
    assert_eq!(out[0].1.as_i64().unwrap().as_slice().unwrap(), [2, 3]);
    assert_eq!(out[1].1.as_f32().unwrap().as_slice().unwrap(), [3.0, 9.0, 6.0, -1.0, -3.0, 9.0]);
    assert_eq!(out[2].1.as_i32().unwrap(), &n);
    assert_eq!(out[3].1.as_bool().unwrap().as_slice().unwrap(), [false, true, false, true, true, false]);
    assert_eq!(out[3].1.dtype_name(), "bool");
}

#[test]
fn unsupported_output_type_names_the_output() {
    let mut cast = node("Cast", &["x"], &["as_half"]);
    cast.attribute.push(betadpo::onnx::attr_i("to", dtype::FLOAT16 as i64));
    let bytes = model(vec![cast], vec![("x", dtype::FLOAT)], vec![("as_half", dtype::FLOAT16, vec![Dim::Fixed(2), Dim::Fixed(3)])]);
    let mut session = SessionConfig::default().session_from_bytes(&bytes).unwrap();
    let err = run(&mut session, &[("x", f32_input(&[0.0; 6]))]).unwrap_err().to_string();
    assert!(err.contains("as_half") && err.contains("Float16"), "{err}");
}

#[test]
fn session_from_file_works_and_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("add.onnx");
    std::fs::write(&path, add_model()).unwrap();
    let mut session = SessionConfig::default().session_from_file(&path).expect("session from file");
    let out = run(&mut session, &[("x", f32_input(&[1.0; 6])), ("y", f32_input(&[2.0; 6]))]).unwrap();
    assert_eq!(out[0].1.as_f32().unwrap().sum(), 18.0);

    let missing = dir.path().join("missing.onnx");
    let err = SessionConfig::default().session_from_file(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.onnx"), "{err}");
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"not a model").unwrap();
    let err = SessionConfig::default().session_from_file(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.onnx"), "{err}");
}

#[test]
fn loaded_library_is_1_32() {
    runtime::environment().expect("environment");
    let lib = runtime::loaded_library().expect("loaded");
    assert!(lib.version.starts_with("1.32."), "{lib:?}");
}

// ---------------------------------------------------------------------------------------------- execution providers

#[test]
fn gpu_providers_fail_clearly_instead_of_falling_back() {
    // Load the CPU build first (a GPU request as the very first init would provision the large GPU wheel).
    runtime::environment().expect("environment");
    for (ep, name) in [(ExecutionProvider::Cuda { device: 0 }, "CUDA"), (ExecutionProvider::TensorRt { device: 0 }, "TensorRT")] {
        match SessionConfig::with_ep(ep).session_from_bytes(&add_model()) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("{name} execution provider requested but not available")), "{msg}");
            }
            // Only acceptable when someone pointed ORT_DYLIB_PATH at a GPU build on a GPU machine.
            Ok(_) => assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "{name} session created on a CPU build"),
        }
    }
}

#[test]
fn execution_provider_parsing() {
    let parse = |s: &str| s.parse::<ExecutionProvider>();
    assert_eq!(parse("cpu").unwrap(), ExecutionProvider::Cpu);
    assert_eq!(parse("CUDA").unwrap(), ExecutionProvider::Cuda { device: 0 });
    assert_eq!(parse("cuda:3").unwrap(), ExecutionProvider::Cuda { device: 3 });
    assert_eq!(parse("tensorrt").unwrap(), ExecutionProvider::TensorRt { device: 0 });
    assert_eq!(parse("tensorrt:1").unwrap(), ExecutionProvider::TensorRt { device: 1 });
    for ep in [ExecutionProvider::Cpu, ExecutionProvider::Cuda { device: 2 }, ExecutionProvider::TensorRt { device: 0 }] {
        assert_eq!(parse(&ep.to_string()).unwrap(), ep, "Display must round-trip");
    }
    let err = parse("tpu").unwrap_err().to_string();
    assert!(err.contains("tpu") && err.contains("cpu, cuda") && err.contains("tensorrt"), "{err}");
    assert!(parse("cuda:x").unwrap_err().to_string().contains("device"));
    assert!(parse("cpu:0").is_err());
    assert_eq!("extended".parse::<OptLevel>().unwrap(), OptLevel::Extended);
    assert!("fast".parse::<OptLevel>().unwrap_err().to_string().contains("disable, basic, extended, all"));
}

// ---------------------------------------------------------------------------------------------- node placement

#[test]
fn node_placement_is_recorded_on_request() {
    use betadpo::runtime::placement::{node_placement, Assigned};
    // Without graph optimizations: they would fold the Shape node (its input's shape is fixed) away.
    let config = SessionConfig { record_placement: true, optimization: OptLevel::Disable, ..Default::default() };
    let session = config.session_from_bytes(&mixed_model()).expect("session");
    let mut placement = node_placement(&session).expect("placement");
    assert_eq!(placement.len(), 1, "{placement:?}");
    placement[0].nodes.sort();
    let expected: Vec<(String, String)> = [("Add", "Add_sum"), ("Greater", "Greater_gt"), ("Identity", "Identity_n_out"), ("Shape", "Shape_shape")]
        .iter()
        .map(|(o, n)| (o.to_string(), n.to_string()))
        .collect();
    assert_eq!(placement[0], Assigned { provider: "CPUExecutionProvider".into(), nodes: expected });
    // Without the request nothing is recorded.
    let plain = SessionConfig::default().session_from_bytes(&mixed_model()).expect("session");
    match node_placement(&plain) {
        Ok(p) => assert!(p.iter().all(|a| a.nodes.is_empty()), "{p:?}"),
        Err(e) => assert!(e.to_string().contains("node placement"), "{e}"),
    }
}
