//! Data dependencies that cost nothing, for phases that decide when ONNX Runtime may run a node:
//! `Reshape(x, Concat(Shape(x), e))` is `x` itself (Reshape aliases its input), readable only once
//! the empty int64 tensor `e` exists, and `e` is an empty slice of the tensors it waits for. No
//! optimizer can fold it: it reads run-time tensors' data.

use std::collections::HashSet;

use super::Builder;
use crate::onnx::{attr_i, dtype, NodeProto};

/// The tensors of `backward` (in order) that depend on `seed`.
pub fn gradient_tensors(backward: &[NodeProto], seed: &str) -> HashSet<String> {
    let mut g: HashSet<String> = HashSet::from([seed.to_string()]);
    for n in backward {
        if n.input.iter().any(|x| g.contains(x)) {
            g.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    g
}

/// An empty int64 tensor that exists only once every one of `tensors` does; `None` for none.
/// Node and tensor names start with `mark`.
pub fn exists_after(b: &mut Builder, tensors: &[&str], mark: &str) -> Option<String> {
    let flat = b.ints(&[-1]);
    let (zero, zero2) = (b.ints(&[0]), b.ints(&[0]));
    let empties: Vec<String> = tensors
        .iter()
        .map(|t| {
            let v = b.op("Reshape", &[t, &flat], vec![], &format!("{mark}{t}_flat"));
            let e = b.op("Slice", &[&v, &zero, &zero2], vec![], &format!("{mark}{t}_none"));
            b.op("Cast", &[&e], vec![attr_i("to", dtype::INT64 as i64)], &format!("{mark}{t}_reached"))
        })
        .collect();
    match empties.len() {
        0 => None,
        1 => empties.into_iter().next(),
        _ => {
            let refs: Vec<&str> = empties.iter().map(String::as_str).collect();
            Some(b.op("Concat", &refs, vec![attr_i("axis", 0)], &format!("{mark}reached")))
        }
    }
}

/// `x` unchanged, but readable only once `dep` exists.
pub fn gate(b: &mut Builder, x: &str, dep: Option<&str>, mark: &str) -> String {
    let Some(dep) = dep else { return x.to_string() };
    let shape = b.op("Shape", &[x], vec![], &format!("{mark}{x}_shape"));
    let same = b.op("Concat", &[&shape, dep], vec![attr_i("axis", 0)], &format!("{mark}{x}_shape_after"));
    b.op("Reshape", &[x, &same], vec![], &format!("{mark}{x}_after"))
}
