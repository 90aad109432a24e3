//! What a gradient rule sees: the forward node, the gradients of its outputs, which inputs need a
//! gradient, and a builder for the nodes it emits. Accessors follow ONNX Runtime's gradient builder:
//! `i(k)` input, `o(k)` output, `go(k)` gradient of an output, `set_gi(k, ..)` gradient of an input.

use std::collections::HashMap;

use crate::graph::{Builder, Names, TensorInfo, TensorInfos};
use crate::onnx::{attr_i, dtype, tensor_to_i64, AttributeProto, DType, NodeAttrs, NodeProto, TensorProto};
use crate::{Error, Result};

pub struct RuleCtx<'a> {
    pub node: &'a NodeProto,
    pub b: Builder<'a>,
    pub opset: i64,
    infos: &'a TensorInfos,
    consts: &'a HashMap<String, TensorProto>,
    grads_out: Vec<Option<String>>,
    active_in: Vec<bool>,
    pub(crate) grads_in: Vec<Vec<String>>,
}

impl<'a> RuleCtx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        node: &'a NodeProto,
        names: &'a mut Names,
        opset: i64,
        infos: &'a TensorInfos,
        consts: &'a HashMap<String, TensorProto>,
        grads_out: Vec<Option<String>>,
        active_in: Vec<bool>,
    ) -> Self {
        let n = node.input.len();
        RuleCtx { node, b: Builder::new(names, "grad/"), opset, infos, consts, grads_out, active_in, grads_in: vec![Vec::new(); n] }
    }

    /// Name of input `k` ("" when an optional input is absent).
    pub fn i(&self, k: usize) -> &'a str {
        self.node.input.get(k).map(String::as_str).unwrap_or("")
    }
    pub fn o(&self, k: usize) -> &'a str {
        self.node.output.get(k).map(String::as_str).unwrap_or("")
    }
    pub fn num_inputs(&self) -> usize {
        self.node.input.len()
    }
    pub fn num_outputs(&self) -> usize {
        self.node.output.len()
    }
    /// Gradient flowing into output `k`, if any does.
    pub fn go(&self, k: usize) -> Option<String> {
        self.grads_out.get(k).cloned().flatten()
    }
    /// Gradient of output 0, which every single-output rule needs.
    pub fn go0(&self) -> Result<String> {
        self.go(0).ok_or_else(|| self.err("no gradient reaches its output"))
    }
    /// Whether input `k` needs a gradient.
    pub fn needs(&self, k: usize) -> bool {
        self.active_in.get(k).copied().unwrap_or(false)
    }
    /// Records `grad` as (a contribution to) the gradient of input `k`.
    pub fn set_gi(&mut self, k: usize, grad: String) {
        self.grads_in[k].push(grad);
    }

    pub fn err(&self, detail: impl Into<String>) -> Error {
        Error::node(&self.node.name, &self.node.op_type, detail)
    }

    pub fn info(&self, name: &str) -> Result<&'a TensorInfo> {
        self.infos.get(name).ok_or_else(|| self.err(format!("no shape known for {name}")))
    }
    pub fn rank(&self, name: &str) -> Result<usize> {
        Ok(self.info(name)?.rank())
    }
    /// Element type of the node's floating-point values (its first output).
    pub fn float_type(&self) -> DType {
        self.infos.get(self.o(0)).map(|i| i.dtype).filter(|t| dtype::is_float(*t)).unwrap_or(dtype::FLOAT)
    }

    pub fn attr_i(&self, name: &str, default: i64) -> i64 {
        self.node.int_or(name, default)
    }
    pub fn attr_f(&self, name: &str, default: f32) -> f32 {
        self.node.float_or(name, default)
    }
    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.node.ints_attr(name)
    }

    /// The values of a constant integer input (initializer or `Constant` node), if it is one.
    pub fn const_ints(&self, name: &str) -> Option<Vec<i64>> {
        if name.is_empty() {
            return None;
        }
        self.consts.get(name).and_then(|t| tensor_to_i64(t).ok())
    }

    /// The value of a constant scalar float input, if it is one.
    pub fn const_float(&self, name: &str) -> Option<f64> {
        let t = self.consts.get(name)?;
        if t.dims.iter().product::<i64>() != 1 {
            return None;
        }
        if dtype::is_float(t.data_type) {
            crate::onnx::tensor_to_f32(t).ok().map(|v| v[0] as f64)
        } else {
            tensor_to_i64(t).ok().map(|v| v[0] as f64)
        }
    }

    /// `name` cast to the node's float type when it has another element type.
    pub fn cast_like_output(&mut self, name: &str) -> String {
        let want = self.float_type();
        match self.infos.get(name) {
            Some(i) if i.dtype != want => self.op("Cast", &[name], vec![attr_i("to", want as i64)]),
            _ => name.to_string(),
        }
    }

    /// A reduction over constant axes, in the form this opset wants (axes as an input for
    /// ReduceSum from opset 13 and for the other reductions from opset 18).
    pub fn reduce(&mut self, op: &str, x: &str, axes: &[i64], keepdims: bool) -> String {
        let k = attr_i("keepdims", keepdims as i64);
        if (op == "ReduceSum" && self.opset >= 13) || self.opset >= 18 {
            let a = self.ints(axes);
            self.op(op, &[x, &a], vec![k])
        } else {
            self.op(op, &[x], vec![crate::onnx::attr_ints("axes", axes), k])
        }
    }

    /// Number of elements of `name` as a float scalar tensor of the node's type: a constant when
    /// the probes show a static shape, else computed at run time.
    pub fn numel(&mut self, name: &str) -> Result<String> {
        let info = self.info(name)?.clone();
        let dims = info.static_dims();
        if dims.iter().all(Option::is_some) {
            let n: i64 = dims.iter().map(|d| d.unwrap()).product();
            return Ok(self.scalar(n as f64));
        }
        let size = self.op("Size", &[name], vec![]);
        let t = self.float_type();
        Ok(self.op("Cast", &[&size], vec![attr_i("to", t as i64)]))
    }

    /// Emits a one-output node; its output name is derived from the forward node's first input.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let hint = format!("{}_{}", self.node.output.first().map(String::as_str).unwrap_or("t"), op.to_lowercase());
        self.b.op(op, inputs, attrs, &hint)
    }
    /// Emits a node writing the gradient of input `k`, named `<input>_grad`, and records it.
    pub fn op_gi(&mut self, k: usize, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) {
        let out = self.b.fresh(&format!("{}_grad", self.i(k)));
        self.b.op_into(op, inputs, &[&out], attrs);
        self.set_gi(k, out);
    }
    pub fn scalar(&mut self, v: f64) -> String {
        let t = self.float_type();
        self.b.scalar(v, t)
    }
    pub fn ints(&mut self, v: &[i64]) -> String {
        self.b.ints(v)
    }

    /// Sums `grad` (shaped like `like`) down to the shape of input `k` after broadcasting — the
    /// reduce-to-shape step of every broadcasting op. Axes come from the probed shapes when they
    /// decide it, else from shapes computed at run time.
    pub fn reduce_to_input(&mut self, grad: &str, like: &str, k: usize) -> Result<String> {
        self.reduce_leading_to_input(grad, like, k, 0)
    }

    /// [`Self::reduce_to_input`] for a gradient whose last `core` axes already have input `k`'s
    /// sizes (a matrix product's operand gradient): only the leading (batch) axes of `like`,
    /// the shape the gradient was broadcast to, are compared and summed.
    pub fn reduce_leading_to_input(&mut self, grad: &str, like: &str, k: usize, core: usize) -> Result<String> {
        let target = self.i(k);
        let t = self.info(target)?.clone();
        let g = self.info(like)?.clone();
        if g.rank() < t.rank() || t.rank() < core {
            return Err(self.err(format!("gradient {like} has lower rank than input {target}")));
        }
        let lead = g.rank() - t.rank();
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        for j in lead..g.rank() - core {
            let same = (0..2).all(|p| t.dims[p][j - lead] == g.dims[p][j]);
            let broadcast = (0..2).all(|p| t.dims[p][j - lead] == 1) && (0..2).any(|p| g.dims[p][j] != 1);
            if same {
                continue;
            } else if broadcast {
                axes.push(j as i64);
            } else {
                return Ok(self.reduce_to_shape_dynamic(grad, target));
            }
        }
        if axes.is_empty() {
            return Ok(grad.to_string());
        }
        let axes_c = self.ints(&axes);
        let summed = self.op("ReduceSum", &[grad, &axes_c], vec![attr_i("keepdims", 1)]);
        if lead == 0 {
            return Ok(summed);
        }
        let lead_c = self.ints(&(0..lead as i64).collect::<Vec<_>>());
        Ok(self.op("Squeeze", &[&summed, &lead_c], vec![]))
    }

    /// Reduce-to-shape entirely from run-time shapes: sum over the axes where the (left-padded)
    /// target shape differs from the gradient's, then reshape to the target's shape.
    pub fn reduce_to_shape_dynamic(&mut self, grad: &str, target: &str) -> String {
        let gs = self.op("Shape", &[grad], vec![]);
        let ts = self.op("Shape", &[target], vec![]);
        let gr = self.op("Shape", &[&gs], vec![]);
        let tr = self.op("Shape", &[&ts], vec![]);
        let pad_n = self.op("Sub", &[&gr, &tr], vec![]);
        let one = crate::onnx::tensor_i64("", &[1], &[1]);
        let pad = self.op("ConstantOfShape", &[&pad_n], vec![crate::onnx::attr_t("value", one)]);
        let padded = self.op("Concat", &[&pad, &ts], vec![attr_i("axis", 0)]);
        let eq = self.op("Equal", &[&padded, &gs], vec![]);
        let ne = self.op("Not", &[&eq], vec![]);
        let nz = self.op("NonZero", &[&ne], vec![]);
        let zero = self.ints(&[0]);
        let axes = self.op("Squeeze", &[&nz, &zero], vec![]);
        let summed = self.op("ReduceSum", &[grad, &axes], vec![attr_i("keepdims", 1), attr_i("noop_with_empty_axes", 1)]);
        self.op("Reshape", &[&summed, &ts], vec![])
    }
}
