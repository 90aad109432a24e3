//! Every gradient rule against central finite differences through ONNX Runtime, over a
//! broadcasting shape matrix, with dynamic (batch-dependent) dimensions where it matters.

mod common;

use betadpo::onnx::{attr_f, attr_i, attr_ints, attr_s};
use common::gradcheck::{check, Case, In};

fn f(s: &[usize]) -> In {
    In::Float(s.to_vec())
}
fn pos(s: &[usize]) -> In {
    In::FloatRange(s.to_vec(), 0.5, 2.0)
}
fn ints(v: &[i64]) -> In {
    In::Ints(vec![v.len()], v.to_vec())
}

/// Shape pairs for broadcasting binary ops: same, trailing, keepdim-style, two-sided, rank-0.
const BROADCAST: &[(&[usize], &[usize])] =
    &[(&[2, 3], &[2, 3]), (&[2, 3], &[3]), (&[2, 3], &[1, 3]), (&[2, 1, 4], &[3, 1]), (&[4], &[2, 3, 4]), (&[], &[2, 3]), (&[2, 3], &[])];

#[test]
fn binary_elementwise_broadcasting() {
    for op in ["Add", "Sub", "Mul"] {
        for (a, b) in BROADCAST {
            check(&Case::new(op, vec![f(a), f(b)]));
        }
    }
    for (a, b) in BROADCAST {
        check(&Case::new("Div", vec![f(a), pos(b)]));
        check(&Case::new("Pow", vec![pos(a), f(b)]));
    }
}

#[test]
fn binary_with_dynamic_dimensions() {
    // [batch, seq, 4] + [4] and [batch, 1, seq] * [batch, seq, 1] with batch/seq varying between probes
    check(&Case::new("Add", vec![f(&[2, 3, 4]), f(&[4])]).dynamic(vec![vec![3, 5, 4], vec![4]]));
    check(&Case::new("Mul", vec![f(&[2, 1, 3]), f(&[2, 3, 1])]).dynamic(vec![vec![3, 1, 5], vec![3, 5, 1]]));
    // A dimension that is 1 in one probe and not in the other forces the run-time reduction.
    check(&Case::new("Mul", vec![f(&[2, 3]), f(&[1, 3])]).dynamic(vec![vec![2, 3], vec![2, 3]]));
}

#[test]
fn pow_with_constant_exponents() {
    check(&Case::new("Pow", vec![f(&[2, 3]), In::FloatConst(vec![], vec![2.0])]));
    check(&Case::new("Pow", vec![pos(&[2, 3]), In::FloatConst(vec![], vec![0.5])]));
    check(&Case::new("Pow", vec![pos(&[2, 3]), In::FloatConst(vec![], vec![-1.5])]));
}

#[test]
fn unary_elementwise() {
    for shape in [&[2, 3][..], &[4], &[2, 3, 2]] {
        for op in ["Neg", "Exp", "Tanh", "Sigmoid", "Erf", "Softplus", "Cos", "Sin", "Identity", "Abs"] {
            check(&Case::new(op, vec![f(shape)]));
        }
        for op in ["Sqrt", "Reciprocal", "Log"] {
            check(&Case::new(op, vec![pos(shape)]));
        }
        check(&Case::new("Relu", vec![f(shape)]));
        check(&Case::new("LeakyRelu", vec![f(shape)]).attrs(vec![attr_f("alpha", 0.2)]));
        check(&Case::new("Gelu", vec![f(shape)]).opset(20));
        check(&Case::new("Gelu", vec![f(shape)]).opset(20).attrs(vec![attr_s("approximate", "tanh")]));
        check(&Case::new("Dropout", vec![f(shape)]));
        check(&Case::new("Cast", vec![f(shape)]).attrs(vec![attr_i("to", 11)]));
    }
}

#[test]
fn select_ops() {
    check(&Case::new("Max", vec![f(&[2, 3]), f(&[3])]));
    check(&Case::new("Min", vec![f(&[2, 3]), f(&[2, 1]), f(&[])]));
    check(&Case::new("Clip", vec![f(&[3, 4]), In::FloatConst(vec![], vec![-0.5]), In::FloatConst(vec![], vec![0.5])]));
    check(&Case::new("Clip", vec![f(&[3, 4]), In::Absent, In::FloatConst(vec![], vec![0.3])]));
    let cond = In::Bool(vec![2, 3], vec![true, false, true, false, false, true]);
    check(&Case::new("Where", vec![cond.clone(), f(&[2, 3]), f(&[3])]));
    check(&Case::new("Where", vec![In::Bool(vec![3], vec![true, false, true]), f(&[2, 3]), f(&[])]));
}

#[test]
fn matmul_shapes() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3], &[3, 4]),
        (&[2, 5, 3], &[3, 4]),
        (&[2, 2, 5, 3], &[2, 2, 3, 4]),
        (&[2, 1, 5, 3], &[3, 3, 4]),
        (&[3], &[3, 4]),
        (&[2, 5, 3], &[3]),
        (&[3], &[2, 3, 4]),
        (&[3], &[3]),
    ];
    for (a, b) in cases {
        check(&Case::new("MatMul", vec![f(a), f(b)]));
    }
    check(&Case::new("MatMul", vec![f(&[2, 5, 3]), f(&[3, 4])]).dynamic(vec![vec![3, 7, 3], vec![3, 4]]));
}

#[test]
fn gemm_attributes() {
    for ta in [0, 1] {
        for tb in [0, 1] {
            let a = if ta == 0 { [4, 3] } else { [3, 4] };
            let b = if tb == 0 { [3, 5] } else { [5, 3] };
            for c in [&[5][..], &[4, 5], &[1, 5]] {
                let attrs = vec![attr_i("transA", ta), attr_i("transB", tb), attr_f("alpha", 0.7), attr_f("beta", 1.3)];
                check(&Case::new("Gemm", vec![f(&a), f(&b), f(c)]).attrs(attrs));
            }
        }
    }
    check(&Case::new("Gemm", vec![f(&[4, 3]), f(&[3, 5])]));
}

#[test]
fn einsum_equations() {
    check(&Case::new("Einsum", vec![f(&[2, 3, 4]), f(&[2, 4, 5])]).attrs(vec![attr_s("equation", "bij,bjk->bik")]));
    check(&Case::new("Einsum", vec![f(&[2, 3]), f(&[3])]).attrs(vec![attr_s("equation", "ij,j->i")]));
    check(&Case::new("Einsum", vec![f(&[2, 3]), f(&[4])]).attrs(vec![attr_s("equation", "ij,k->ik")]));
}

#[test]
fn reductions() {
    for op in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceLogSumExp"] {
        for keep in [0, 1] {
            check(&Case::new(op, vec![f(&[2, 3, 4]), ints(&[1])]).attrs(vec![attr_i("keepdims", keep)]));
            check(&Case::new(op, vec![f(&[2, 3, 4]), ints(&[-1, 0])]).attrs(vec![attr_i("keepdims", keep)]));
            check(&Case::new(op, vec![f(&[2, 3])]).attrs(vec![attr_i("keepdims", keep)]));
        }
    }
    // opset 13 ReduceMean takes its axes as an attribute
    check(&Case::new("ReduceMean", vec![f(&[2, 3, 4])]).opset(13).attrs(vec![attr_ints("axes", &[-1]), attr_i("keepdims", 0)]));
    check(&Case::new("ReduceMean", vec![f(&[2, 3, 4]), ints(&[-1])]).dynamic(vec![vec![3, 5, 4]]));
}

#[test]
fn softmax_family() {
    for axis in [-1, 0, 1] {
        check(&Case::new("Softmax", vec![f(&[3, 4])]).attrs(vec![attr_i("axis", axis)]));
        check(&Case::new("LogSoftmax", vec![f(&[3, 4])]).attrs(vec![attr_i("axis", axis)]));
    }
    check(&Case::new("Softmax", vec![f(&[2, 3, 4])]));
}

#[test]
fn normalisations() {
    for axis in [-1, 1] {
        check(&Case::new("LayerNormalization", vec![f(&[2, 3, 4]), f(&[4]), f(&[4])]).attrs(vec![attr_i("axis", -1)]));
        let scale: &[usize] = if axis == -1 { &[4] } else { &[3, 4] };
        check(&Case::new("LayerNormalization", vec![f(&[2, 3, 4]), f(scale), f(scale)]).attrs(vec![attr_i("axis", axis), attr_f("epsilon", 1e-3)]));
    }
    check(&Case::new("LayerNormalization", vec![f(&[2, 3, 4]), f(&[4])]));
    check(&Case::new("RMSNormalization", vec![f(&[2, 3, 4]), f(&[4])]).opset(23));
}

#[test]
fn shape_ops() {
    check(&Case::new("Transpose", vec![f(&[2, 3, 4])]).attrs(vec![attr_ints("perm", &[2, 0, 1])]));
    check(&Case::new("Transpose", vec![f(&[2, 3])]));
    check(&Case::new("Reshape", vec![f(&[2, 3, 4]), ints(&[6, -1])]));
    check(&Case::new("Flatten", vec![f(&[2, 3, 4])]).attrs(vec![attr_i("axis", 2)]));
    check(&Case::new("Squeeze", vec![f(&[2, 1, 4]), ints(&[1])]));
    check(&Case::new("Unsqueeze", vec![f(&[2, 4]), ints(&[0, -1])]));
    check(&Case::new("Expand", vec![f(&[3, 1]), ints(&[2, 3, 4])]));
    check(&Case::new("Concat", vec![f(&[2, 3]), f(&[2, 1]), f(&[2, 2])]).attrs(vec![attr_i("axis", -1)]));
    check(&Case::new("Concat", vec![f(&[2, 3]), f(&[1, 3])]).attrs(vec![attr_i("axis", 0)]).dynamic(vec![vec![3, 3], vec![1, 3]]));
    check(&Case::new("Split", vec![f(&[2, 6]), ints(&[2, 4])]).attrs(vec![attr_i("axis", 1)]).outputs(2));
    check(&Case::new("Split", vec![f(&[6, 2])]).attrs(vec![attr_i("axis", 0), attr_i("num_outputs", 3)]).outputs(3));
    check(&Case::new("Tile", vec![f(&[2, 3]), ints(&[2, 1])]));
}

#[test]
fn slices() {
    // static unit-step slices become Pad
    check(&Case::new("Slice", vec![f(&[4, 6]), ints(&[1]), ints(&[3]), ints(&[1])]));
    check(&Case::new("Slice", vec![f(&[4, 6]), ints(&[0, -4]), ints(&[2, i64::MAX]), ints(&[0, 1])]));
    // steps and dynamic dims go through the index-grid scatter
    check(&Case::new("Slice", vec![f(&[4, 6]), ints(&[5]), ints(&[0]), ints(&[1]), ints(&[-2])]));
    check(&Case::new("Slice", vec![f(&[4, 6]), ints(&[1]), ints(&[i64::MAX]), ints(&[0])]).dynamic(vec![vec![5, 6]]));
    // run-time bounds on constant axes become a Pad with run-time pads: negative, clamped, empty
    let fed = |v: &[i64]| In::IntsFed(vec![v.len()], v.to_vec());
    check(&Case::new("Slice", vec![f(&[4, 6]), fed(&[1]), fed(&[3]), ints(&[1])]));
    check(&Case::new("Slice", vec![f(&[2, 4, 6]), fed(&[0, -4]), fed(&[2, i64::MAX]), ints(&[-1, 1])]).dynamic(vec![vec![3, 5, 7]]));
    check(&Case::new("Slice", vec![f(&[4, 6]), fed(&[-9]), fed(&[2]), ints(&[1]), ints(&[1])]));
    check(&Case::new("Slice", vec![f(&[4, 6]), fed(&[3]), fed(&[1]), ints(&[0])]));
}

#[test]
fn gathers() {
    // embedding lookup with a repeated index: contributions must add up
    let idx = In::Ints(vec![2, 3], vec![0, 4, 4, 1, 0, 2]);
    check(&Case::new("Gather", vec![f(&[5, 3]), idx.clone()]));
    check(&Case::new("Gather", vec![f(&[2, 5, 3]), idx]).attrs(vec![attr_i("axis", 1)]));
    check(&Case::new("Gather", vec![f(&[2, 5, 3]), In::Ints(vec![], vec![-1])]).attrs(vec![attr_i("axis", 1)]));
    check(&Case::new("GatherElements", vec![f(&[2, 4]), In::Ints(vec![2, 3], vec![0, 3, 3, 1, 1, 2])]).attrs(vec![attr_i("axis", 1)]));
    check(&Case::new("GatherND", vec![f(&[3, 4, 2]), In::Ints(vec![3, 2], vec![0, 1, 2, 3, 0, 1])]));
    // a segment sum (per-sequence log-probs): repeated targets add up, in the data and the updates
    let add = || vec![attr_i("axis", 0), attr_s("reduction", "add")];
    check(&Case::new("ScatterElements", vec![f(&[4]), In::Ints(vec![6], vec![0, 0, 3, 1, 3, 3]), f(&[6])]).attrs(add()));
    check(&Case::new("ScatterElements", vec![f(&[3, 2]), In::Ints(vec![2, 2], vec![2, 0, 2, 1]), f(&[2, 2])]).attrs(add()));
}
