//! The shape probe's stand-ins for large weights: each MatMul that multiplies by a large weight `[k, n]`
//! and each Gather of embedding rows is rewritten, in the probe's copy of the graph, to read a stand-in of
//! one zero column (`[k, 1]`) and one zero row (`[n]`) instead, so the probe never fills (nor transposes) the
//! weights themselves: for a 1B model that was ~5 GB of float32 zeros per run and most of `build-graph`'s time.
//!
//! The rewrite changes no value the probe sees. The probe replaces weights by zeros (`graph::probe`), and
//! `x @ 0[k, n]` equals `(x @ 0[k, 1]) * 0[n]` element for element (NaN and infinity included: both sum
//! `x_i * 0`), as `Gather(0[v, n], ids)` equals `Unsqueeze(Cast(ids), -1) * 0[n]`; every output keeps its
//! name, dtype and shape, so value-dependent ops (Reshape, Expand, Slice) downstream see what they saw.

use std::collections::HashSet;

use super::tensor_info::TensorInfos;
use super::Graph;
use crate::onnx::{attr_i, dtype, tensor_i64, NodeAttrs, NodeProto, TensorProto};

const PREFIX: &str = "probe_stand_in/";

/// Rewrites the readers of `large` (the weights the probe would otherwise fill with zeros) and of their
/// views (`views`: Transpose, Cast or Identity of one weight, whose shapes `infos` holds); drops the views
/// nothing reads any more. Returns the large weights still read (they are filled as before) and how many
/// nodes were rewritten.
pub(super) fn stand_in_for_weights(g: &mut Graph, infos: &TensorInfos, large: &HashSet<String>, views: &HashSet<String>) -> (HashSet<String>, usize) {
    let has_subgraphs = g.nodes.iter().any(|n| n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()));
    if has_subgraphs {
        // a body may read a weight implicitly: keep every weight
        return (large.clone(), 0);
    }
    let mut weightish: HashSet<String> = large.clone();
    let mut view_source: Vec<Option<String>> = vec![None; g.nodes.len()];
    let mut read: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).filter(|o| weightish.contains(o)).collect();
    let mut rewrites: Vec<Option<Vec<NodeProto>>> = vec![None; g.nodes.len()];
    let mut stand_ins: Vec<TensorProto> = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if views.contains(&n.output[0]) && weightish.contains(&n.input[0]) {
            view_source[i] = Some(n.input[0].clone());
            weightish.extend(n.output.iter().cloned());
            continue;
        }
        if !n.input.iter().any(|x| weightish.contains(x)) {
            continue;
        }
        match rewrite(n, i, infos, &weightish, &mut stand_ins) {
            Some(nodes) => rewrites[i] = Some(nodes),
            None => read.extend(n.input.iter().filter(|x| weightish.contains(*x)).cloned()),
        }
    }
    // a view that is read keeps its source read; sources come before their views
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if let Some(src) = view_source[i].as_ref().filter(|_| n.output.iter().any(|o| read.contains(o))) {
            read.insert(src.clone());
        }
    }
    let rewritten = rewrites.iter().flatten().count();
    let old = std::mem::take(&mut g.nodes);
    for ((n, new), view) in old.into_iter().zip(rewrites).zip(&view_source) {
        match new {
            Some(nodes) => g.nodes.extend(nodes),
            None if view.is_some() && !n.output.iter().any(|o| read.contains(o)) => {}
            None => g.nodes.push(n),
        }
    }
    g.initializers.extend(stand_ins);
    read.retain(|w| large.contains(w));
    (read, rewritten)
}

/// The stand-in nodes for `n` (node `i`), or `None` when `n` is not a MatMul (or a Gemm without bias) by a
/// float32 matrix on the right nor a Gather of float32 rows along axis 0.
fn rewrite(n: &NodeProto, i: usize, infos: &TensorInfos, weightish: &HashSet<String>, stand_ins: &mut Vec<TensorProto>) -> Option<Vec<NodeProto>> {
    let matrix = |name: &str| infos.get(name).filter(|t| t.dtype == dtype::FLOAT && t.rank() == 2).map(|t| (t.dims[0][0], t.dims[0][1]));
    let prefix = format!("{PREFIX}{i}/");
    let mut zeros = |name: &str, dims: &[i64]| {
        stand_ins.push(float_zeros(&format!("{prefix}{name}"), dims));
        format!("{prefix}{name}")
    };
    // `x @ w`, or Gemm's `alpha * x @ w'` without a bias: `(x @ 0[k, 1]) * 0[cols]`
    let product = match n.op_type.as_str() {
        "MatMul" => Some(matrix(&n.input[1])),
        "Gemm" if n.input.len() == 2 && n.int_or("transA", 0) == 0 => {
            Some(matrix(&n.input[1]).map(|(r, c)| if n.int_or("transB", 0) == 1 { (c, r) } else { (r, c) }))
        }
        _ => None,
    };
    if let Some(by) = product.filter(|_| weightish.contains(&n.input[1]) && !weightish.contains(&n.input[0])) {
        let (k, cols) = by?;
        let column = zeros("column", &[k, 1]);
        let row = zeros("row", &[cols]);
        let x_column = format!("{prefix}x_column");
        return Some(vec![node(n, "MatMul", vec![n.input[0].clone(), column], &x_column, vec![]), node(n, "Mul", vec![x_column, row], &n.output[0], vec![])]);
    }
    match n.op_type.as_str() {
        "Gather" if weightish.contains(&n.input[0]) && !weightish.contains(&n.input[1]) && n.int_or("axis", 0) == 0 => {
            let (_, cols) = matrix(&n.input[0])?;
            let row = zeros("row", &[cols]);
            let last_axis = format!("{prefix}last_axis");
            stand_ins.push(tensor_i64(&last_axis, &[1], &[-1]));
            let (ids, column) = (format!("{prefix}ids"), format!("{prefix}ids_column"));
            Some(vec![
                node(n, "Cast", vec![n.input[1].clone()], &ids, vec![attr_i("to", dtype::FLOAT as i64)]),
                node(n, "Unsqueeze", vec![ids, last_axis], &column, vec![]),
                node(n, "Mul", vec![column, row], &n.output[0], vec![]),
            ])
        }
        _ => None,
    }
}

fn float_zeros(name: &str, dims: &[i64]) -> TensorProto {
    let numel = dims.iter().product::<i64>().max(0) as usize;
    TensorProto { name: name.into(), data_type: dtype::FLOAT, dims: dims.to_vec(), raw_data: vec![0u8; 4 * numel].into(), ..Default::default() }
}

fn node(of: &NodeProto, op: &str, input: Vec<String>, output: &str, attribute: Vec<crate::onnx::AttributeProto>) -> NodeProto {
    NodeProto { name: format!("{PREFIX}{}/{output}", of.name), op_type: op.into(), input, output: vec![output.into()], attribute, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::TensorInfo;
    use crate::onnx::{attr_ints, value_info, Dim, ValueInfoProto};
    use crate::runtime::{run, HostTensor, SessionConfig};
    use ndarray::{ArrayD, IxDyn};

    fn op(op: &str, input: &[&str], output: &str, attribute: Vec<crate::onnx::AttributeProto>) -> NodeProto {
        NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: input.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        }
    }

    /// An imported model's pattern on zero weights: embedding rows, a `[out, in]` projection read through a
    /// Transpose, a Reshape whose shape is computed from a projected value, and one weight (`scale`) read by
    /// a Mul, which is not rewritten.
    fn graph() -> Graph {
        let shape_of = |t: &str, out: &str| op("Shape", &[t], out, vec![]);
        let nodes = vec![
            op("Gather", &["embed", "ids"], "h", vec![]),
            op("Transpose", &["proj"], "proj_t", vec![attr_ints("perm", &[1, 0])]),
            op("MatMul", &["h", "proj_t"], "y", vec![]),
            op("Mul", &["y", "scale"], "z", vec![]),
            shape_of("z", "z_shape"),
            op("ReduceSum", &["z"], "total", vec![attr_i("keepdims", 0)]),
            op("Cast", &["total"], "total_i", vec![attr_i("to", dtype::INT64 as i64)]),
            op("Add", &["z_shape", "total_i"], "shape", vec![]),
            op("Reshape", &["z", "shape"], "out", vec![]),
        ];
        Graph {
            nodes,
            initializers: vec![float_zeros("embed", &[50, 8]), float_zeros("proj", &[12, 8]), float_zeros("scale", &[12])],
            inputs: vec![value_info("ids", dtype::INT64, &[Dim::Sym("b".into()), Dim::Sym("t".into())])],
            outputs: ["out", "h", "y"].map(|name| ValueInfoProto { name: name.into(), ..Default::default() }).into(),
            opsets: vec![crate::onnx::OperatorSetIdProto { domain: String::new(), version: 18 }],
            ir_version: 8,
            ..Default::default()
        }
    }

    fn outputs(g: Graph) -> Vec<(String, HostTensor)> {
        let bytes = prost::Message::encode_to_vec(&g.into_model());
        let mut s = SessionConfig::default().session_from_bytes(&bytes).unwrap();
        let ids = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |ix| (ix[0] * 3 + ix[1]) as i64);
        run(&mut s, &[("ids", HostTensor::I64(ids))]).unwrap()
    }

    /// ONNX Runtime computes the same outputs (names, shapes and values, through a value-dependent Reshape)
    /// from the rewritten graph as from the original, which reads neither the embedding nor the projection.
    #[test]
    fn the_rewritten_graph_computes_what_the_original_computes_without_the_weights() {
        let g = graph();
        let mut infos = TensorInfos::new();
        for t in &g.initializers {
            infos.insert(t.name.clone(), TensorInfo::fixed(t.data_type, &t.dims));
        }
        infos.insert("proj_t".into(), TensorInfo::fixed(dtype::FLOAT, &[8, 12]));
        let large: HashSet<String> = ["embed", "proj", "scale"].map(String::from).into();
        let mut rewritten = g.clone();
        let (read, count) = stand_in_for_weights(&mut rewritten, &infos, &large, &["proj_t".to_string()].into());
        assert_eq!(count, 2);
        assert_eq!(read, ["scale".to_string()].into());
        assert!(!rewritten.nodes.iter().any(|n| n.op_type == "Transpose"));
        assert!(rewritten.nodes.iter().all(|n| !n.input.iter().any(|x| x == "embed" || x == "proj")));
        let (want, got) = (outputs(g), outputs(rewritten));
        assert_eq!(want.len(), 3);
        for ((wn, wt), (gn, gt)) in want.iter().zip(&got) {
            assert_eq!((wn, wt.shape()), (gn, gt.shape()));
            assert_eq!(wt.as_f32().unwrap(), gt.as_f32().unwrap(), "{wn}");
        }
    }
}
