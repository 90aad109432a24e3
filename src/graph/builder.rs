//! Emitting nodes. A [`Builder`] owns the nodes it creates until the caller takes them, so code that
//! describes a subgraph (a gradient rule, the DPO loss) never touches the graph it will join.

use super::Names;
use crate::onnx::{attr_t, dtype, tensor_f32, tensor_i64, AttributeProto, DType, NodeProto, TensorProto};

pub struct Builder<'a> {
    pub names: &'a mut Names,
    pub nodes: Vec<NodeProto>,
    /// Prefix of node names, e.g. `grad/` or `dpo/`, so emitted nodes read well in a viewer.
    prefix: String,
}

impl<'a> Builder<'a> {
    pub fn new(names: &'a mut Names, prefix: &str) -> Self {
        Builder { names, nodes: Vec::new(), prefix: prefix.to_string() }
    }

    pub fn take(&mut self) -> Vec<NodeProto> {
        std::mem::take(&mut self.nodes)
    }

    /// Emits `op` writing to explicitly named outputs.
    pub fn op_into(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) {
        let name = self.names.fresh(&format!("{}{}", self.prefix, outputs.first().copied().unwrap_or(op)));
        self.nodes.push(NodeProto {
            name,
            op_type: op.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// Emits `op` with one fresh output named after `hint`, and returns that name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, hint: &str) -> String {
        let out = self.names.fresh(hint);
        self.op_into(op, inputs, &[&out], attrs);
        out
    }

    /// Emits `op` with `n` fresh outputs.
    pub fn op_n(&mut self, op: &str, inputs: &[&str], n: usize, attrs: Vec<AttributeProto>, hint: &str) -> Vec<String> {
        let outs: Vec<String> = (0..n).map(|i| self.names.fresh(&format!("{hint}_{i}"))).collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.op_into(op, inputs, &refs, attrs);
        outs
    }

    pub fn constant(&mut self, value: TensorProto, hint: &str) -> String {
        self.op("Constant", &[], vec![attr_t("value", value)], hint)
    }

    /// A 1-D int64 constant (axes, shapes, starts/ends).
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.constant(tensor_i64("", &[values.len() as i64], values), "const_ints")
    }

    /// A scalar int64 constant.
    pub fn int(&mut self, value: i64) -> String {
        self.constant(tensor_i64("", &[], &[value]), "const_int")
    }

    /// A scalar constant of float type `t` (the dtype of the tensors it will combine with).
    pub fn scalar(&mut self, value: f64, t: DType) -> String {
        let tensor = match t {
            dtype::DOUBLE => TensorProto { data_type: dtype::DOUBLE, raw_data: value.to_le_bytes().to_vec().into(), ..Default::default() },
            dtype::FLOAT16 => {
                TensorProto { data_type: dtype::FLOAT16, raw_data: half::f16::from_f64(value).to_le_bytes().to_vec().into(), ..Default::default() }
            }
            dtype::BFLOAT16 => {
                TensorProto { data_type: dtype::BFLOAT16, raw_data: half::bf16::from_f64(value).to_le_bytes().to_vec().into(), ..Default::default() }
            }
            _ => tensor_f32("", &[], &[value as f32]),
        };
        self.constant(tensor, "const_scalar")
    }

    /// The run-time size of `x` along `axis`, as a 1-D tensor of one element (for shapes).
    pub fn dim(&mut self, x: &str, axis: i64, hint: &str) -> String {
        let shape = self.op("Shape", &[x], vec![], &format!("{hint}_shape"));
        let (start, end) = (self.ints(&[axis]), self.ints(&[axis + 1]));
        self.op("Slice", &[&shape, &start, &end], vec![], hint)
    }

    /// The run-time size of `x` along `axis`, as a scalar (for `Range`).
    pub fn dim_scalar(&mut self, x: &str, axis: i64, hint: &str) -> String {
        let shape = self.op("Shape", &[x], vec![], &format!("{hint}_shape"));
        let at = self.int(axis);
        self.op("Gather", &[&shape, &at], vec![crate::onnx::attr_i("axis", 0)], hint)
    }

    pub fn fresh(&mut self, hint: &str) -> String {
        self.names.fresh(hint)
    }
}
