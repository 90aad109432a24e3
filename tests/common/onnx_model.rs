//! A one-graph ONNX model at opset 17, for tests that build their own small models.

#![allow(dead_code)]

use betadpo::onnx::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto};

pub fn model(name: &str, node: Vec<NodeProto>, initializer: Vec<TensorProto>, input: Vec<ValueInfoProto>, output: Vec<ValueInfoProto>) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        producer_name: "betadpo-tests".into(),
        graph: Some(GraphProto { name: name.into(), node, initializer, input, output, ..Default::default() }),
        ..Default::default()
    }
}

/// A node of `op` from `inputs` to `outputs`, named after its op and first output (`Add_sum`).
pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    node_with(op, inputs, outputs, vec![])
}

/// [`node`] with attributes.
pub fn node_with(op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    named_node(&format!("{op}_{}", outputs[0]), op, inputs, outputs, attribute)
}

/// A node with a name of the caller's choosing.
pub fn named_node(name: &str, op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}
