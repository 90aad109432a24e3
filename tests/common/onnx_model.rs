//! A one-graph ONNX model at opset 17, for tests that build their own small models.

#![allow(dead_code)]

use betadpo::onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto};

pub fn model(name: &str, node: Vec<NodeProto>, initializer: Vec<TensorProto>, input: Vec<ValueInfoProto>, output: Vec<ValueInfoProto>) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        producer_name: "betadpo-tests".into(),
        graph: Some(GraphProto { name: name.into(), node, initializer, input, output, ..Default::default() }),
        ..Default::default()
    }
}
