//! A hand-built causal-LM-shaped ONNX model (embedding → activation ops → lm_head), for tests
//! that need a model without fixtures, and for bad-input cases (unsupported ops).

#![allow(dead_code)]

use betadpo::onnx::{dtype, proto, tensor_f32, value_info, Dim};

use super::onnx_model::named_node;

pub const VOCAB: i64 = 16;
pub const HIDDEN: i64 = 8;

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// `ops` are unary ops applied in sequence to the embedded tokens before the lm_head.
pub fn model(ops: &[&str]) -> proto::ModelProto {
    let emb = tensor_f32("emb.weight", &[VOCAB, HIDDEN], &pseudo_random((VOCAB * HIDDEN) as usize, 1));
    let head = tensor_f32("lm_head.weight", &[HIDDEN, VOCAB], &pseudo_random((VOCAB * HIDDEN) as usize, 2));
    let mut nodes = vec![named_node("embed", "Gather", &["emb.weight", "input_ids"], &["h0"], vec![])];
    for (i, op) in ops.iter().enumerate() {
        nodes.push(named_node(&format!("act{i}"), op, &[&format!("h{i}")], &[&format!("h{}", i + 1)], vec![]));
    }
    nodes.push(named_node("lm_head", "MatMul", &[&format!("h{}", ops.len()), "lm_head.weight"], &["logits"], vec![]));
    let bs = [Dim::Sym("batch".into()), Dim::Sym("sequence".into())];
    super::onnx_model::model(
        "tiny_lm",
        nodes,
        vec![emb, head],
        vec![value_info("input_ids", dtype::INT64, &bs), value_info("attention_mask", dtype::INT64, &bs)],
        vec![value_info("logits", dtype::FLOAT, &[bs[0].clone(), bs[1].clone(), Dim::Fixed(VOCAB)])],
    )
}

pub fn write(path: &std::path::Path, m: &proto::ModelProto) {
    std::fs::write(path, prost::Message::encode_to_vec(m)).unwrap();
}
