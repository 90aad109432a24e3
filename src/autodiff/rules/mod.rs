//! The gradient rule table: one line per op, one small function per rule, grouped by family.
//! A rule reads the forward node through [`RuleCtx`] and emits the nodes computing the gradients
//! of its active inputs; it never edits the graph. Ops missing here fail the build when they sit
//! on the differentiable path; ops listed in `activity::NOT_DIFFERENTIABLE` never carry gradients.

mod elementwise;
mod gather;
mod matmul;
mod norm;
mod reduce;
mod shape;
mod softmax;

use super::RuleCtx;
use crate::Result;

pub type Rule = fn(&mut RuleCtx) -> Result<()>;

#[rustfmt::skip]
pub const RULES: &[(&str, Rule)] = &[
    // elementwise.rs
    ("Add", elementwise::add),
    ("Sub", elementwise::sub),
    ("Sum", elementwise::sum),
    ("Mean", elementwise::mean),
    ("Mul", elementwise::mul),
    ("Div", elementwise::div),
    ("Pow", elementwise::pow),
    ("Sqrt", elementwise::sqrt),
    ("Reciprocal", elementwise::reciprocal),
    ("Neg", elementwise::neg),
    ("Exp", elementwise::exp),
    ("Log", elementwise::log),
    ("Tanh", elementwise::tanh),
    ("Sigmoid", elementwise::sigmoid),
    ("Erf", elementwise::erf),
    ("Relu", elementwise::relu),
    ("Softplus", elementwise::softplus),
    ("Abs", elementwise::abs),
    ("Cos", elementwise::cos),
    ("Sin", elementwise::sin),
    ("Max", elementwise::max),
    ("Min", elementwise::min),
    ("Clip", elementwise::clip),
    ("Where", elementwise::where_),
    ("Cast", elementwise::cast),
    ("Identity", elementwise::identity),
    ("Dropout", elementwise::identity),
    ("Gelu", elementwise::gelu),
    ("LeakyRelu", elementwise::leaky_relu),
    // matmul.rs
    ("MatMul", matmul::matmul),
    ("Gemm", matmul::gemm),
    ("Einsum", matmul::einsum),
    // reduce.rs
    ("ReduceSum", reduce::reduce_sum),
    ("ReduceMean", reduce::reduce_mean),
    ("ReduceMax", reduce::reduce_extreme),
    ("ReduceMin", reduce::reduce_extreme),
    ("ReduceLogSumExp", reduce::reduce_log_sum_exp),
    // softmax.rs
    ("Softmax", softmax::softmax),
    ("LogSoftmax", softmax::log_softmax),
    // norm.rs
    ("LayerNormalization", norm::layer_norm),
    ("RMSNormalization", norm::rms_norm),
    // shape.rs
    ("Transpose", shape::transpose),
    ("Reshape", shape::reshape),
    ("Flatten", shape::reshape),
    ("Squeeze", shape::reshape),
    ("Unsqueeze", shape::reshape),
    ("Expand", shape::expand),
    ("Concat", shape::concat),
    ("Split", shape::split),
    ("Slice", shape::slice),
    ("Tile", shape::tile),
    // gather.rs
    ("Gather", gather::gather),
    ("GatherElements", gather::gather_elements),
    ("GatherND", gather::gather_nd),
    ("ScatterElements", gather::scatter_elements),
];

pub fn rule_for(op: &str) -> Option<Rule> {
    RULES.iter().find(|(name, _)| *name == op).map(|(_, r)| *r)
}
