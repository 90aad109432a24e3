//! Shape and dtype discovery by running the graph.
//!
//! Exported graphs rarely carry complete `value_info`, and ONNX shape inference would have to be
//! reimplemented op by op. Instead the graph is run twice through ONNX Runtime on tiny batches of
//! two different sizes, with every tensor exposed as an output. A dimension that is the same in both
//! runs is static; one that differs depends on the batch. Gradient rules use this to decide, for
//! example, which axes a broadcast gradient must be summed over.
//!
//! Large float initializers (and deferred half ones, which have no values yet) are replaced by zeros: the
//! products and embedding lookups that read them read a stand-in of one zero row and column instead
//! (`probe_stand_ins`, which computes the same values), and the other readers zeros made at run time
//! (`ConstantOfShape`), so the probe never holds a copy of the weights; values do not affect shapes on the
//! float path.

use std::collections::{HashMap, HashSet};

use super::tensor_info::{TensorInfo, TensorInfos};
use super::Graph;
use crate::onnx::{attr_t, dtype, tensor_f32, tensor_i64, value_info_type, DType, Dim, NodeProto, TensorProto, ValueInfoProto};
use crate::runtime::{run_meta, HostTensor, OptLevel, SessionConfig};
use crate::{Error, Result};

/// The inputs of the two probe runs, in graph-input order.
pub struct ProbeBatch {
    pub runs: [Vec<(String, HostTensor)>; 2],
}

const ZERO_FILL_MIN_ELEMENTS: i64 = 64;
const FILL_PREFIX: &str = "probe_fill/";

/// How the probe stands in for large weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeWeights {
    /// Rewrite the products and embedding lookups that read them (`probe_stand_ins`), zero-fill the rest.
    StandIns,
    /// Zero-fill every one at its full shape (the reference the stand-ins are tested against).
    FullFills,
}

pub fn probe_shapes(graph: &Graph, batch: &ProbeBatch) -> Result<TensorInfos> {
    probe_shapes_with(graph, batch, ProbeWeights::StandIns)
}

pub fn probe_shapes_with(graph: &Graph, batch: &ProbeBatch, weights: ProbeWeights) -> Result<TensorInfos> {
    let mut infos = initial_infos(graph);
    let views = weight_views(graph, &mut infos);
    let model = probe_model(graph, &infos, &views, weights)?;
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

/// The shapes of the initializers and Constant nodes.
fn initial_infos(graph: &Graph) -> TensorInfos {
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
    infos
}

/// The weights the probe of `graph` fills with zeros at their full shape (the others it stands in for).
pub fn filled_weights(graph: &Graph, weights: ProbeWeights) -> Result<Vec<String>> {
    let mut infos = initial_infos(graph);
    let views = weight_views(graph, &mut infos);
    let model = probe_model(graph, &infos, &views, weights)?;
    let fills = model.graph.iter().flat_map(|g| &g.node).filter(|n| n.name.starts_with(FILL_PREFIX));
    Ok(fills.map(|n| n.output[0].clone()).collect())
}

/// Tensors computed from one weight alone by a Transpose, Cast, Identity or a Split into constant sizes (a
/// model written from Hugging Face weights reads every `[out, in]` weight through a Transpose; the chunked
/// objective splits the lm_head by vocabulary): their shapes follow from the weight's, and are recorded
/// here instead of being probe outputs, which would hold a float32 copy of every weight until the run ends.
fn weight_views(graph: &Graph, infos: &mut TensorInfos) -> HashSet<String> {
    let mut views = HashSet::new();
    let weights: HashSet<&str> = graph
        .initializers
        .iter()
        .filter(|t| dtype::is_float(t.data_type) && t.dims.iter().product::<i64>() >= ZERO_FILL_MIN_ELEMENTS)
        .map(|t| t.name.as_str())
        .collect();
    let constants = super::constant_tensors(&graph.nodes, &graph.initializers);
    for n in &graph.nodes {
        let Some(x) = n.input.first().filter(|x| weights.contains(x.as_str()) || views.contains(x.as_str())) else { continue };
        let Some(info) = infos.get(x) else { continue };
        let Some((dt, shapes)) = view_shapes(n, info, &constants) else { continue };
        for (o, dims) in n.output.iter().zip(shapes) {
            infos.insert(o.clone(), TensorInfo::fixed(dt, &dims));
            views.insert(o.clone());
        }
    }
    views
}

/// The dtype and output shapes of `n` when it is a view of the weight `info` describes.
fn view_shapes(n: &NodeProto, info: &TensorInfo, constants: &HashMap<String, TensorProto>) -> Option<(DType, Vec<Vec<i64>>)> {
    use crate::onnx::NodeAttrs;
    let dims = &info.dims[0];
    let single = n.input.len() == 1;
    match n.op_type.as_str() {
        "Identity" if single => Some((info.dtype, vec![dims.clone()])),
        "Cast" if single => Some((n.int_or("to", info.dtype as i64) as DType, vec![dims.clone()])),
        "Transpose" if single => {
            let perm = n.ints_attr("perm").unwrap_or_else(|| (0..dims.len() as i64).rev().collect());
            let out = perm.iter().map(|&p| dims.get(usize::try_from(p).ok()?).copied()).collect::<Option<Vec<i64>>>()?;
            (perm.len() == dims.len()).then_some((info.dtype, vec![out]))
        }
        "Split" => {
            let axis = usize::try_from(n.int_or("axis", 0).rem_euclid(dims.len().max(1) as i64)).ok()?;
            let sizes = match n.input.get(1).filter(|s| !s.is_empty()) {
                Some(s) => crate::onnx::tensor_to_i64(constants.get(s)?).ok()?,
                None => n.ints_attr("split")?,
            };
            let whole = sizes.len() == n.output.len() && sizes.iter().all(|&k| k >= 0) && sizes.iter().sum::<i64>() == *dims.get(axis)?;
            let shape = |k: i64| dims.iter().enumerate().map(|(i, &d)| if i == axis { k } else { d }).collect();
            whole.then(|| (info.dtype, sizes.into_iter().map(shape).collect()))
        }
        _ => None,
    }
}

fn probe_model(graph: &Graph, infos: &TensorInfos, views: &HashSet<String>, weights: ProbeWeights) -> Result<crate::onnx::ModelProto> {
    let mut g = graph.clone();
    let graph_inputs: HashSet<String> = g.inputs.iter().map(|i| i.name.clone()).collect();
    let large: HashSet<String> = g
        .initializers
        .iter()
        .filter(|t| {
            let numel: i64 = t.dims.iter().product();
            let small = !dtype::is_float(t.data_type) || numel < ZERO_FILL_MIN_ELEMENTS || graph_inputs.contains(&t.name);
            !small || super::precision::is_deferred(t)
        })
        .map(|t| t.name.clone())
        .collect();
    let read = match weights {
        ProbeWeights::StandIns => super::probe_stand_ins::stand_in_for_weights(&mut g, infos, &large, views).0,
        ProbeWeights::FullFills => large.clone(),
    };
    let mut fills: Vec<NodeProto> = Vec::new();
    g.initializers.retain(|t| {
        if !large.contains(&t.name) {
            return true;
        }
        if read.contains(&t.name) {
            fills.extend(zero_fill(t));
        }
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
        name: format!("{FILL_PREFIX}{}", t.name),
        op_type: "ConstantOfShape".into(),
        input: vec![format!("probe_shape/{}", t.name)],
        output: vec![t.name.clone()],
        attribute: vec![attr_t("value", zero)],
        ..Default::default()
    };
    [shape_node, fill]
}
