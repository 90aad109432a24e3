//! Structural checks on a model read from disk, before anything indexes its nodes: each node of a
//! known op has as many inputs and outputs as the ONNX spec allows, and well-known attributes have
//! their spec'd type. A crafted or corrupted model then fails with the node and op named, instead
//! of an index out of bounds deep inside recognition, packing or differentiation.

use crate::onnx::proto::attribute_proto::AttributeType;
use crate::onnx::NodeProto;
use crate::{Error, Result};

const MANY: usize = usize::MAX;

/// Inputs (min, max) of the default-domain ops this crate reads or differentiates (ONNX opset 13+).
#[rustfmt::skip]
const INPUT_ARITY: &[(&[&str], usize, usize)] = &[
    (&["Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
       "And", "Or", "Xor", "Reshape", "Expand", "Tile", "Gather", "GatherElements", "GatherND", "CumSum",
       "RMSNormalization"], 2, 2),
    (&["Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Relu", "Softplus", "Abs", "Cos", "Sin",
       "Cast", "Identity", "Gelu", "LeakyRelu", "Not", "Shape", "Size", "Softmax", "LogSoftmax", "Transpose",
       "Flatten", "NonZero", "ConstantOfShape", "IsNaN", "IsInf"], 1, 1),
    (&["Sum", "Mean", "Max", "Min", "Concat", "Einsum"], 1, MANY),
    (&["Squeeze", "Unsqueeze", "Split", "Trilu", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
       "ReduceLogSumExp", "ReduceProd", "ReduceL2"], 1, 2),
    (&["Clip", "Dropout"], 1, 3),
    (&["Gemm", "LayerNormalization"], 2, 3),
    (&["Where", "Range", "ScatterElements", "ScatterND"], 3, 3),
    (&["Slice"], 3, 5),
    (&["Constant"], 0, 0),
];

/// The type every default-domain op gives these attributes.
const ATTRIBUTE_TYPES: &[(&str, AttributeType)] = &[
    ("axis", AttributeType::Int),
    ("keepdims", AttributeType::Int),
    ("noop_with_empty_axes", AttributeType::Int),
    ("to", AttributeType::Int),
    ("transA", AttributeType::Int),
    ("transB", AttributeType::Int),
    ("batch_dims", AttributeType::Int),
    ("axes", AttributeType::Ints),
    ("perm", AttributeType::Ints),
    ("alpha", AttributeType::Float),
    ("beta", AttributeType::Float),
    ("epsilon", AttributeType::Float),
    ("equation", AttributeType::String),
    ("reduction", AttributeType::String),
    ("value", AttributeType::Tensor),
];

/// Checks every node's arity and attribute types (see the module documentation).
pub fn check_nodes(nodes: &[NodeProto]) -> Result<()> {
    for n in nodes {
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            continue;
        }
        let err = |detail: String| Error::node(&n.name, &n.op_type, detail);
        if n.output.is_empty() || n.output[0].is_empty() {
            return Err(err("it has no output".into()));
        }
        if let Some(&(_, min, max)) = INPUT_ARITY.iter().find(|(ops, ..)| ops.contains(&n.op_type.as_str())) {
            let k = n.input.len();
            if k < min || k > max {
                let allowed = match (min, max) {
                    (a, b) if a == b => format!("{a}"),
                    (a, MANY) => format!("at least {a}"),
                    (a, b) => format!("{a} to {b}"),
                };
                return Err(err(format!("it has {k} input(s); {} takes {allowed}", n.op_type)));
            }
        }
        for a in &n.attribute {
            let Some(&(_, want)) = ATTRIBUTE_TYPES.iter().find(|(name, _)| *name == a.name) else { continue };
            // type 0 (UNDEFINED) predates the field being filled in; its value fields are read as is
            if a.r#type != 0 && a.r#type != want as i32 {
                let got = AttributeType::try_from(a.r#type).map(|t| t.as_str_name()).unwrap_or("unknown");
                return Err(err(format!("attribute {} has type {got}, the spec says {}", a.name, want.as_str_name())));
            }
        }
        if n.op_type == "Constant" && n.attribute.is_empty() {
            return Err(err("a Constant without a value".into()));
        }
    }
    Ok(())
}
