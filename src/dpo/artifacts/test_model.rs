//! A tiny causal-LM-shaped model with inline weights (embedding → Tanh → lm_head), and a runner for
//! the graphs the phases make of it, for the phases' own tests.

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};

use crate::graph::Graph;
use crate::onnx::{dtype, tensor_f32, value_info, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use crate::runtime::{run, HostTensor, SessionConfig};

pub const VOCAB: i64 = 11;
pub const HIDDEN: i64 = 6;

pub fn values(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| 0.5 * ((i as f32 + 1.0) * k).sin()).collect()
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        name: format!("{op}_{output}"),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// Writes the model into a fresh temporary directory (kept alive by the returned guard).
pub fn write() -> (tempfile::TempDir, PathBuf) {
    let bs = [Dim::Sym("batch".into()), Dim::Sym("sequence".into())];
    let g = GraphProto {
        name: "tiny".into(),
        node: vec![node("Gather", &["emb.weight", "input_ids"], "h0"), node("Tanh", &["h0"], "h1"), node("MatMul", &["h1", "lm_head.weight"], "logits")],
        initializer: vec![
            tensor_f32("emb.weight", &[VOCAB, HIDDEN], &values((VOCAB * HIDDEN) as usize, 0.37)),
            tensor_f32("lm_head.weight", &[HIDDEN, VOCAB], &values((VOCAB * HIDDEN) as usize, 0.71)),
        ],
        input: vec![value_info("input_ids", dtype::INT64, &bs), value_info("attention_mask", dtype::INT64, &bs)],
        output: vec![value_info("logits", dtype::FLOAT, &[bs[0].clone(), bs[1].clone(), Dim::Fixed(VOCAB)])],
        ..Default::default()
    };
    let m = ModelProto { ir_version: 8, opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }], graph: Some(g), ..Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, prost::Message::encode_to_vec(&m)).unwrap();
    (dir, path)
}

/// A padded batch of 2 pairs x 5 tokens: answers from token 3, the last rejected row padded by one.
pub fn padded_batch() -> Vec<(String, HostTensor)> {
    let (rows, t) = (4, 5);
    let ids = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| ((ix[0] * 5 + ix[1] * 3 + 2) as i64) % VOCAB);
    let pad = |r: usize, c: usize| r == rows - 1 && c == t - 1;
    let mask = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| i64::from(!pad(ix[0], ix[1])));
    let completion = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| if ix[1] >= 3 && !pad(ix[0], ix[1]) { 1.0f32 } else { 0.0 });
    let ref_logps = ArrayD::from_shape_vec(IxDyn(&[rows]), vec![-4.0f32, -5.0, -3.5, -4.5]).unwrap();
    vec![
        ("input_ids".into(), HostTensor::I64(ids)),
        ("attention_mask".into(), HostTensor::I64(mask)),
        (crate::dpo::objective::COMPLETION_MASK.into(), HostTensor::F32(completion)),
        (crate::dpo::objective::REF_LOGPS.into(), HostTensor::F32(ref_logps)),
    ]
}

/// Runs `graph` (weights inline) on `feeds` with ONNX Runtime; returns every output by name.
pub fn run_graph(graph: &Graph, feeds: &[(String, HostTensor)]) -> Vec<(String, HostTensor)> {
    let bytes = prost::Message::encode_to_vec(&graph.clone().into_model());
    let mut session = SessionConfig::default().session_from_bytes(&bytes).unwrap();
    let refs: Vec<(&str, HostTensor)> = feeds.iter().filter(|(n, _)| graph.has_input(n)).map(|(n, t)| (n.as_str(), t.clone())).collect();
    run(&mut session, &refs).unwrap()
}

pub fn output<'a>(outs: &'a [(String, HostTensor)], name: &str) -> &'a ArrayD<f32> {
    outs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1.as_f32().unwrap()
}

/// The tiny model through phases 1–7 (padded layout, the default objective).
pub struct Prepared {
    pub _dir: tempfile::TempDir,
    pub model: super::load::LoadedModel,
    pub laid: super::layout::LaidOut,
    pub appended: super::append_objective::Appended,
    pub infos: crate::graph::TensorInfos,
    pub params: Vec<crate::dpo::model::params::Param>,
}

pub fn prepared(cfg: &crate::dpo::ObjectiveConfig) -> Prepared {
    let (dir, path) = write();
    prepared_from(dir, &path, cfg, &Default::default()).unwrap()
}

/// `model` through phases 1–7, padded, with `selection`.
pub fn prepared_from(
    dir: tempfile::TempDir,
    model: &std::path::Path,
    cfg: &crate::dpo::ObjectiveConfig,
    selection: &crate::dpo::model::params::Selection,
) -> crate::Result<Prepared> {
    let model = super::load::load(model, None)?;
    let mut laid = super::layout::choose(&model.base, &model.sig, crate::dpo::packing::LayoutChoice::Padded)?;
    let appended = super::append_objective::append(&mut laid, &model.sig, cfg, None)?;
    let infos = super::probe::probe(&laid.graph, laid.layout, &model.sig, model.vocab, &appended.batch_inputs, cfg)?;
    let params = super::parameters::select(&mut laid.graph, &appended.obj, &infos, selection, None, None)?;
    Ok(Prepared { _dir: dir, model, laid, appended, infos, params })
}

/// The trainable parameters' initial values as graph feeds.
pub fn parameter_feeds(p: &Prepared) -> Vec<(String, HostTensor)> {
    let initial = super::store_weights::initial_values(&p.model.base, &p.appended.obj, &p.params, &p.model.half_origin).unwrap();
    initial
        .iter()
        .map(|t| {
            let v: Vec<f32> = crate::onnx::le::elements(&t.bytes).collect();
            (t.name.to_string(), HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&t.shape), v).unwrap()))
        })
        .collect()
}
