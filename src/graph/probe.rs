//! Shape and dtype discovery by running the graph.
//!
//! Exported graphs rarely carry complete `value_info`, and ONNX shape inference would have to be
//! reimplemented op by op. Instead the graph is run twice through ONNX Runtime on tiny batches of
//! two different sizes, with every tensor exposed as an output. A dimension that is the same in both
//! runs is static; one that differs depends on the batch. Gradient rules use this to decide, for
//! example, which axes a broadcast gradient must be summed over.
//!
//! Large float initializers (and deferred half ones, which have no values yet) are replaced by zeros made at
//! run time (`ConstantOfShape`), so the probe never holds a second copy of the weights; values do not affect
//! shapes on the float path.

use std::collections::{HashMap, HashSet};

use super::Graph;
use crate::onnx::{attr_t, dtype, tensor_f32, tensor_i64, value_info_type, DType, Dim, NodeProto, TensorProto, ValueInfoProto};
use crate::runtime::{run_meta, HostTensor, OptLevel, SessionConfig};
use crate::{Error, Result};

/// What the probes saw of one tensor: its element type and its shape in each probe.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub dims: [Vec<i64>; 2],
}

impl TensorInfo {
    pub fn fixed(dtype: DType, dims: &[i64]) -> Self {
        TensorInfo { dtype, dims: [dims.to_vec(), dims.to_vec()] }
    }
    pub fn rank(&self) -> usize {
        self.dims[0].len()
    }
    /// Per axis: `Some(n)` when the probes agree, `None` when the dimension depends on the batch.
    pub fn static_dims(&self) -> Vec<Option<i64>> {
        self.dims[0].iter().zip(&self.dims[1]).map(|(a, b)| (a == b).then_some(*a)).collect()
    }
    pub fn is_float(&self) -> bool {
        dtype::is_float(self.dtype)
    }
}

pub type TensorInfos = HashMap<String, TensorInfo>;

/// The inputs of the two probe runs, in graph-input order.
pub struct ProbeBatch {
    pub runs: [Vec<(String, HostTensor)>; 2],
}

const ZERO_FILL_MIN_ELEMENTS: i64 = 64;

pub fn probe_shapes(graph: &Graph, batch: &ProbeBatch) -> Result<TensorInfos> {
    let mut infos = TensorInfos::new();
    for t in &graph.initializers {
        infos.insert(t.name.clone(), TensorInfo::fixed(t.data_type, &t.dims));
    }
    for n in &graph.nodes {
        if n.op_type == "Constant" {
            if let Some(t) = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()) {
                infos.insert(n.output[0].clone(), TensorInfo::fixed(t.data_type, &t.dims));
            }
        }
    }
    let views = weight_views(graph, &mut infos);
    let model = probe_model(graph, &views)?;
    let bytes = prost::Message::encode_to_vec(&model);
    let mut session = SessionConfig { optimization: OptLevel::Disable, intra_threads: Some(1), ..Default::default() }.session_from_bytes(&bytes)?;
    let mut seen: [HashMap<String, (DType, Vec<i64>)>; 2] = Default::default();
    for (k, inputs) in batch.runs.iter().enumerate() {
        let refs: Vec<(&str, HostTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        for (name, t, shape) in run_meta(&mut session, &refs).map_err(|e| Error::graph(format!("shape probe run failed: {e}")))? {
            seen[k].insert(name, (t, shape));
        }
        for (name, t) in inputs {
            let dt = t.onnx_dtype();
            seen[k].insert(name.clone(), (dt, t.shape().iter().map(|&d| d as i64).collect()));
        }
    }
    let [a, b] = seen;
    for (name, (t, da)) in a {
        let db = b.get(&name).map(|x| x.1.clone()).unwrap_or_else(|| da.clone());
        infos.entry(name).or_insert(TensorInfo { dtype: t, dims: [da, db] });
    }
    Ok(infos)
}

/// Tensors computed from one weight alone by a Transpose, Cast or Identity (a model written from
/// Hugging Face weights reads every `[out, in]` weight through a Transpose): their shapes follow from the
/// weight's, and are recorded here instead of being probe outputs, which would hold a float32 copy of every
/// weight until the run ends.
fn weight_views(graph: &Graph, infos: &mut TensorInfos) -> HashSet<String> {
    use crate::onnx::NodeAttrs;
    let mut views = HashSet::new();
    let weights: HashSet<&str> = graph
        .initializers
        .iter()
        .filter(|t| dtype::is_float(t.data_type) && t.dims.iter().product::<i64>() >= ZERO_FILL_MIN_ELEMENTS)
        .map(|t| t.name.as_str())
        .collect();
    for n in &graph.nodes {
        let Some(x) = n.input.first().filter(|x| n.input.len() == 1 && (weights.contains(x.as_str()) || views.contains(x.as_str()))) else { continue };
        let Some(info) = infos.get(x) else { continue };
        let dims = &info.dims[0];
        let (dt, out) = match n.op_type.as_str() {
            "Identity" => (info.dtype, dims.clone()),
            "Cast" => (n.int_or("to", info.dtype as i64) as DType, dims.clone()),
            "Transpose" => {
                let perm = n.ints_attr("perm").unwrap_or_else(|| (0..dims.len() as i64).rev().collect());
                match perm.iter().map(|&p| dims.get(p as usize).copied()).collect::<Option<Vec<i64>>>() {
                    Some(d) if perm.len() == dims.len() => (info.dtype, d),
                    _ => continue,
                }
            }
            _ => continue,
        };
        infos.insert(n.output[0].clone(), TensorInfo::fixed(dt, &out));
        views.insert(n.output[0].clone());
    }
    views
}

fn probe_model(graph: &Graph, views: &HashSet<String>) -> Result<crate::onnx::ModelProto> {
    let mut g = graph.clone();
    let graph_inputs: HashSet<String> = g.inputs.iter().map(|i| i.name.clone()).collect();
    let mut fills: Vec<NodeProto> = Vec::new();
    g.initializers.retain(|t| {
        let numel: i64 = t.dims.iter().product();
        let small = !dtype::is_float(t.data_type) || numel < ZERO_FILL_MIN_ELEMENTS || graph_inputs.contains(&t.name);
        if small && !super::precision::is_deferred(t) {
            return true;
        }
        fills.extend(zero_fill(t));
        false
    });
    fills.append(&mut g.nodes);
    g.nodes = fills;
    let declared: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut extra: Vec<ValueInfoProto> = Vec::new();
    let mut added = HashSet::new();
    for n in &graph.nodes {
        for o in &n.output {
            if !o.is_empty() && !declared.contains(o) && !views.contains(o) && added.insert(o.clone()) {
                extra.push(ValueInfoProto { name: o.clone(), ..Default::default() });
            }
        }
    }
    g.outputs.extend(extra);
    // Declared shapes on intermediate values could contradict the probe sizes; drop them.
    g.value_info.clear();
    for o in g.outputs.iter_mut() {
        if let Some((t, Some(shape))) = value_info_type(o) {
            let sym: Vec<Dim> = shape.iter().enumerate().map(|(i, _)| Dim::Sym(format!("probe_{i}"))).collect();
            *o = crate::onnx::value_info(&o.name, t, &sym);
        }
    }
    Ok(g.into_model())
}

fn zero_fill(t: &TensorProto) -> [NodeProto; 2] {
    let shape = tensor_i64("", &[t.dims.len() as i64], &t.dims);
    let shape_node = NodeProto {
        name: format!("probe_shape/{}", t.name),
        op_type: "Constant".into(),
        output: vec![format!("probe_shape/{}", t.name)],
        attribute: vec![attr_t("value", shape)],
        ..Default::default()
    };
    let mut zero = tensor_f32("", &[1], &[0.0]);
    if t.data_type != dtype::FLOAT {
        zero = crate::onnx::zero_value(t.data_type);
    }
    let fill = NodeProto {
        name: format!("probe_fill/{}", t.name),
        op_type: "ConstantOfShape".into(),
        input: vec![format!("probe_shape/{}", t.name)],
        output: vec![t.name.clone()],
        attribute: vec![attr_t("value", zero)],
        ..Default::default()
    };
    [shape_node, fill]
}
