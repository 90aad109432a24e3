//! Removing a model's KV cache, the first phase of a build: training reads whole sequences, so a
//! cache is always empty. Hugging Face Optimum exports decoders for generation with one:
//!
//! - `text-generation-with-past`: inputs `past_key_values.N.key/value` `[batch, kv_heads, past,
//!   head_dim]`, outputs `present.N.key/value` (the past with this call's keys and values appended);
//! - the merged decoder (`decoder_model_merged.onnx`): one `If` on the input `use_cache_branch`
//!   choosing between the graph with a past and the graph without one.
//!
//! The `If` is replaced by its branch without a cache (`else_branch`: `use_cache_branch` false),
//! inlined into the main graph, and `use_cache_branch` is removed. The `present.*` outputs are dropped
//! with whatever only they needed. A past the model still reads becomes an empty tensor made in the
//! graph from `input_ids`' batch size (the batch stays dynamic); where it is concatenated with the new
//! keys along its empty axis, the concatenation is the new keys alone and the empty tensor goes.

use std::collections::{HashMap, HashSet};

use crate::graph::{Builder, Graph, Names};
use crate::onnx::{attr_i, attr_t, dtype, value_info_type, zero_value, Dim, GraphProto, NodeAttrs, NodeProto};
use crate::{Error, Result};

const PAST_PREFIX: &str = "past_key_values.";
const PRESENT_PREFIX: &str = "present.";
const USE_CACHE_BRANCH: &str = "use_cache_branch";
/// The past's sequence axis in `[batch, kv_heads, past, head_dim]`.
const PAST_AXIS: i64 = 2;

/// What [`remove_kv_cache`] changed, for the build's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheRemoval {
    /// `If` nodes on `use_cache_branch` replaced by their branch without a cache.
    pub branches_inlined: usize,
    pub presents_dropped: usize,
    /// Past inputs nothing reads any more (all of them in a merged decoder).
    pub pasts_removed: usize,
    /// Past inputs now computed as empty tensors.
    pub pasts_bound_empty: usize,
}

impl CacheRemoval {
    pub fn is_empty(&self) -> bool {
        *self == CacheRemoval::default()
    }
}

impl std::fmt::Display for CacheRemoval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.branches_inlined > 0 {
            parts.push("the merged decoder's branch without a cache inlined".to_string());
        }
        if self.presents_dropped > 0 {
            parts.push(format!("{} present outputs dropped", self.presents_dropped));
        }
        if self.pasts_removed > 0 {
            parts.push(format!("{} unused past inputs removed", self.pasts_removed));
        }
        if self.pasts_bound_empty > 0 {
            parts.push(format!("{} past inputs bound to empty tensors", self.pasts_bound_empty));
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// Rewrites `graph` so that it takes no cache and returns none (see the module doc); a graph without
/// one is left as it is.
pub fn remove_kv_cache(graph: &mut Graph) -> Result<CacheRemoval> {
    let mut done = CacheRemoval { branches_inlined: inline_branches_without_cache(graph)?, ..Default::default() };
    let outputs = graph.outputs.len();
    graph.outputs.retain(|o| !o.name.starts_with(PRESENT_PREFIX));
    done.presents_dropped = outputs - graph.outputs.len();
    if done.is_empty() && !graph.inputs.iter().any(|i| i.name.starts_with(PAST_PREFIX)) {
        return Ok(done);
    }
    graph.prune();
    let read: HashSet<String> = graph.consumers().keys().map(|s| s.to_string()).collect();
    let pasts = graph.inputs.len();
    graph.inputs.retain(|i| !i.name.starts_with(PAST_PREFIX) || read.contains(&i.name));
    done.pasts_removed = pasts - graph.inputs.len();
    let empty = bind_empty_pasts(graph)?;
    done.pasts_bound_empty = empty.len();
    drop_empty_concatenations(graph, &empty);
    graph.prune();
    graph.names = Names::from_graph(graph);
    Ok(done)
}

/// Replaces every `If` on `use_cache_branch` by its `else_branch` and removes that input.
fn inline_branches_without_cache(graph: &mut Graph) -> Result<usize> {
    if !graph.has_input(USE_CACHE_BRANCH) {
        return Ok(0);
    }
    let mut inlined = 0;
    let mut i = 0;
    while i < graph.nodes.len() {
        let node = &graph.nodes[i];
        if !node.input.iter().any(|x| x == USE_CACHE_BRANCH) {
            i += 1;
            continue;
        }
        if node.op_type != "If" || node.input[0] != USE_CACHE_BRANCH {
            return Err(Error::node(
                &node.name,
                &node.op_type,
                format!("reads {USE_CACHE_BRANCH}; only an If on it can be resolved (to its branch without a cache)"),
            ));
        }
        let branch = node
            .get_attr("else_branch")
            .and_then(|a| a.g.clone())
            .ok_or_else(|| Error::node(&node.name, &node.op_type, "has no else_branch (the branch without a cache)"))?;
        let if_node = graph.nodes.remove(i);
        let nodes = inline(graph, &if_node, branch)?;
        let added = nodes.len();
        graph.nodes.splice(i..i, nodes);
        i += added;
        inlined += 1;
    }
    graph.inputs.retain(|x| x.name != USE_CACHE_BRANCH);
    Ok(inlined)
}

/// The nodes of `branch` as main-graph nodes computing `if_node`'s outputs: the branch's outputs
/// take the `If`'s output names, its initializers join the graph's, and any other name it defines
/// that the graph already uses gets a fresh one. Names it reads from the outer scope stay as they are.
fn inline(graph: &mut Graph, if_node: &NodeProto, branch: GraphProto) -> Result<Vec<NodeProto>> {
    if branch.output.len() != if_node.output.len() {
        return Err(Error::node(&if_node.name, "If", format!("has {} outputs but its else_branch {}", if_node.output.len(), branch.output.len())));
    }
    let defined: HashSet<&str> =
        branch.node.iter().flat_map(|n| n.output.iter()).chain(branch.initializer.iter().map(|t| &t.name)).map(String::as_str).collect();
    let mut rename: HashMap<String, String> = HashMap::new();
    let mut passthrough = Vec::new();
    for (out, target) in branch.output.iter().zip(&if_node.output) {
        if target.is_empty() {
            continue;
        }
        if defined.contains(out.name.as_str()) {
            rename.insert(out.name.clone(), target.clone());
        } else {
            // the branch returns an outer-scope tensor unchanged
            passthrough.push((out.name.clone(), target.clone()));
        }
    }
    for name in &defined {
        if !rename.contains_key(*name) && graph.names.contains(name) {
            rename.insert(name.to_string(), graph.names.fresh(name));
        }
    }
    let renamed = |x: &String| rename.get(x).cloned().unwrap_or_else(|| x.clone());
    let mut nodes = branch.node;
    for n in &mut nodes {
        for x in n.input.iter_mut().chain(n.output.iter_mut()) {
            *x = renamed(x);
        }
        rename_outer_references(&mut n.attribute, &rename);
        n.name = graph.names.fresh(if n.name.is_empty() { &n.op_type } else { &n.name });
        for o in &n.output {
            graph.names.reserve(o);
        }
    }
    for mut t in branch.initializer {
        t.name = renamed(&t.name);
        graph.names.reserve(&t.name);
        graph.initializers.push(t);
    }
    for mut v in branch.value_info {
        v.name = renamed(&v.name);
        graph.value_info.push(v);
    }
    let mut b = Builder::new(&mut graph.names, "no_cache/");
    for (from, to) in &passthrough {
        b.op_into("Identity", &[from], &[to], vec![]);
    }
    nodes.extend(b.take());
    Ok(nodes)
}

/// A subgraph inside the inlined branch may read the branch's tensors by name: follow the renames.
fn rename_outer_references(attributes: &mut [crate::onnx::AttributeProto], rename: &HashMap<String, String>) {
    for a in attributes {
        for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
            for n in &mut g.node {
                for x in &mut n.input {
                    if let Some(new) = rename.get(x) {
                        *x = new.clone();
                    }
                }
                rename_outer_references(&mut n.attribute, rename);
            }
        }
    }
}

/// Each past input still read becomes a node output of the same name: zeros of shape
/// `[batch of input_ids, kv_heads, 0, head_dim]`. Returns the names bound.
fn bind_empty_pasts(graph: &mut Graph) -> Result<HashSet<String>> {
    let pasts: Vec<_> = graph.inputs.iter().filter(|i| i.name.starts_with(PAST_PREFIX)).cloned().collect();
    if pasts.is_empty() {
        return Ok(HashSet::new());
    }
    let input_ids =
        graph.inputs.iter().find(|i| i.name == "input_ids").map(|i| i.name.clone()).ok_or_else(|| {
            Error::graph(format!("input {}: an empty past needs the batch size of an `input_ids` input, and the model has none", pasts[0].name))
        })?;
    let mut b = Builder::new(&mut graph.names, "no_cache/");
    let batch = b.dim(&input_ids, 0, "no_cache/batch");
    let mut bound = HashSet::new();
    for past in &pasts {
        let (elem, shape) = value_info_type(past).ok_or_else(|| Error::graph(format!("input {}: not a tensor", past.name)))?;
        let (heads, head_dim) = match shape.as_deref() {
            Some([_, Dim::Fixed(h), _, Dim::Fixed(d)]) if dtype::is_float(elem) => (*h, *d),
            _ => {
                return Err(Error::graph(format!(
                    "input {}: cannot make an empty past of it: expected a float tensor [batch, kv_heads, past_sequence, head_dim] with fixed kv_heads and head_dim, got {} {:?}",
                    past.name,
                    dtype::name(elem),
                    shape
                )))
            }
        };
        let rest = b.ints(&[heads, 0, head_dim]);
        let dims = b.op("Concat", &[&batch, &rest], vec![attr_i("axis", 0)], &format!("no_cache/{}_shape", past.name));
        b.op_into("ConstantOfShape", &[&dims], &[&past.name], vec![attr_t("value", zero_value(elem))]);
        bound.insert(past.name.clone());
    }
    let nodes = b.take();
    graph.inputs.retain(|i| !bound.contains(&i.name));
    graph.nodes.splice(0..0, nodes);
    Ok(bound)
}

/// `Concat(past, new)` along the past's empty axis is `new`: the empty input is dropped (a Concat
/// left with one input becomes an Identity).
fn drop_empty_concatenations(graph: &mut Graph, empty: &HashSet<String>) {
    for n in graph.nodes.iter_mut().filter(|n| n.op_type == "Concat") {
        let axis = n.int_or("axis", 0);
        // the past's rank is 4, and so is every other input of a Concat that reads it
        if axis.rem_euclid(4) != PAST_AXIS || !n.input.iter().any(|x| empty.contains(x)) {
            continue;
        }
        n.input.retain(|x| !empty.contains(x));
        if n.input.len() == 1 {
            n.op_type = "Identity".into();
            n.attribute.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{proto::ModelProto, tensor_f32, value_info, OperatorSetIdProto};
    use crate::runtime::{run, HostTensor, SessionConfig};
    use ndarray::{ArrayD, IxDyn};

    const HEADS: i64 = 2;
    const HEAD_DIM: i64 = 3;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: format!("{op}_{}", outputs[0]),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn sym(s: &str) -> Dim {
        Dim::Sym(s.into())
    }

    /// Layer 0 of an attention-shaped decoder, as an Optimum export with a cache writes it:
    /// `keys = Concat(past, new keys)` on axis -2 (returned as `present.0.key`), `logits` reads the
    /// keys' sum over the sequence and the past's length.
    fn with_past() -> GraphProto {
        let w = tensor_f32("w", &[HEADS * HEAD_DIM], &(0..HEADS * HEAD_DIM).map(|v| v as f32 * 0.5 - 1.0).collect::<Vec<_>>());
        let shape = crate::onnx::tensor_i64("new_shape", &[4], &[0, 0, HEADS, HEAD_DIM]);
        let axes = crate::onnx::tensor_i64("axes", &[1], &[2]);
        let mut nodes = vec![
            node("Cast", &["input_ids"], &["ids_f"]),
            node("Unsqueeze", &["ids_f", "axes"], &["ids_3d"]),
            node("Mul", &["ids_3d", "w"], &["flat"]),
            node("Reshape", &["flat", "new_shape"], &["new_bthd"]),
            node("Transpose", &["new_bthd"], &["new_keys"]),
            node("Concat", &["past_key_values.0.key", "new_keys"], &["present.0.key"]),
            node("ReduceSum", &["present.0.key", "axes"], &["summed"]),
            node("Shape", &["past_key_values.0.key"], &["past_shape"]),
            node("Cast", &["past_shape"], &["past_shape_f"]),
            node("ReduceSum", &["past_shape_f"], &["shape_sum"]),
            node("Add", &["summed", "shape_sum"], &["logits"]),
        ];
        for n in &mut nodes {
            n.attribute = match n.output[0].as_str() {
                "ids_f" | "past_shape_f" => vec![attr_i("to", dtype::FLOAT as i64)],
                "new_keys" => vec![crate::onnx::attr_ints("perm", &[0, 2, 1, 3])],
                "present.0.key" => vec![attr_i("axis", -2)],
                "summed" | "shape_sum" => vec![attr_i("keepdims", 0)],
                _ => vec![],
            };
        }
        let past = [sym("batch"), Dim::Fixed(HEADS), sym("past"), Dim::Fixed(HEAD_DIM)];
        GraphProto {
            name: "with_past".into(),
            node: nodes,
            initializer: vec![w, shape, axes],
            input: vec![value_info("input_ids", dtype::INT64, &[sym("batch"), sym("sequence")]), value_info("past_key_values.0.key", dtype::FLOAT, &past)],
            output: vec![
                value_info("logits", dtype::FLOAT, &[sym("batch"), Dim::Fixed(HEADS), Dim::Fixed(HEAD_DIM)]),
                value_info("present.0.key", dtype::FLOAT, &[sym("batch"), Dim::Fixed(HEADS), sym("total"), Dim::Fixed(HEAD_DIM)]),
            ],
            ..Default::default()
        }
    }

    /// The merged decoder: `If(use_cache_branch)` with the graph above as `then_branch` and, as
    /// `else_branch`, the same graph without a past (its own initializer renamed, outer-scope reads of
    /// `input_ids`, `w` and the other initializers).
    fn merged() -> GraphProto {
        let cached = with_past();
        let mut no_past = cached.clone();
        no_past.name = "no_past".into();
        // the new keys alone are the present, and nothing reads a past's length
        let upto_keys = no_past.node.iter().position(|n| n.op_type == "Concat").unwrap();
        no_past.node.truncate(upto_keys);
        no_past.node.push(node("Identity", &["new_keys"], &["present.0.key"]));
        let mut sum = cached.node.iter().find(|n| n.output[0] == "summed").unwrap().clone();
        sum.input[0] = "present.0.key".into();
        no_past.node.push(sum);
        no_past.node.push(node("Identity", &["summed"], &["logits"]));
        // a name the main graph uses too: the inlining must rename it
        for n in &mut no_past.node {
            for x in n.input.iter_mut().chain(n.output.iter_mut()) {
                if x == "flat" {
                    *x = "w_inner".into();
                }
            }
        }
        no_past.initializer.clear();
        no_past.input.clear();
        let mut then = cached.clone();
        then.initializer.clear();
        then.input.clear();
        let cond = value_info(USE_CACHE_BRANCH, dtype::BOOL, &[Dim::Fixed(1)]);
        let mut if_node = node("If", &[USE_CACHE_BRANCH], &["logits", "present.0.key"]);
        if_node.name = "optimum::if".into();
        if_node.attribute = vec![crate::onnx::attr_g("then_branch", then), crate::onnx::attr_g("else_branch", no_past)];
        let mut g = cached;
        g.node = vec![if_node, node("Identity", &["w"], &["w_inner"])];
        g.output.push(value_info("w_inner", dtype::FLOAT, &[Dim::Fixed(HEADS * HEAD_DIM)]));
        g.input.push(cond);
        g
    }

    fn model(g: GraphProto) -> ModelProto {
        ModelProto { ir_version: 8, opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }], graph: Some(g), ..Default::default() }
    }

    fn ids() -> ArrayD<i64> {
        ArrayD::from_shape_vec(IxDyn(&[3, 4]), (0..12).map(|v| v % 5 + 1).collect()).unwrap()
    }

    /// ONNX Runtime on `m` with `feeds`: every output by name.
    fn outputs(m: &ModelProto, feeds: &[(&str, HostTensor)]) -> HashMap<String, ArrayD<f32>> {
        let bytes = prost::Message::encode_to_vec(m);
        let mut session = SessionConfig::default().session_from_bytes(&bytes).unwrap();
        run(&mut session, feeds).unwrap().into_iter().filter_map(|(n, t)| t.as_f32().cloned().map(|a| (n, a))).collect()
    }

    fn empty_past() -> HostTensor {
        HostTensor::F32(ArrayD::zeros(IxDyn(&[3, HEADS as usize, 0, HEAD_DIM as usize])))
    }

    fn transformed(g: GraphProto) -> (Graph, CacheRemoval) {
        let mut graph = Graph::from_model(model(g)).unwrap();
        let done = remove_kv_cache(&mut graph).unwrap();
        graph.sort_topologically().unwrap();
        (graph, done)
    }

    #[test]
    fn a_past_is_bound_empty_and_the_present_dropped() {
        let reference = outputs(&model(with_past()), &[("input_ids", HostTensor::I64(ids())), ("past_key_values.0.key", empty_past())]);
        let (graph, done) = transformed(with_past());
        assert_eq!(done, CacheRemoval { presents_dropped: 1, pasts_bound_empty: 1, ..Default::default() });
        let inputs: Vec<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids"]);
        let outs: Vec<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outs, ["logits"]);
        // the Concat with the empty past is gone; the past still feeds the Shape
        assert!(graph.nodes.iter().all(|n| n.op_type != "Concat" || !n.input.iter().any(|x| x.starts_with(PAST_PREFIX))));
        assert!(graph.nodes.iter().any(|n| n.op_type == "Shape" && n.input[0] == "past_key_values.0.key"));
        let got = outputs(&graph.clone().into_model(), &[("input_ids", HostTensor::I64(ids()))]);
        assert_eq!(got["logits"], reference["logits"]);
        assert!(reference["logits"].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn a_merged_decoder_runs_its_branch_without_a_cache() {
        let false_ = HostTensor::Bool(ArrayD::from_elem(IxDyn(&[1]), false));
        let reference =
            outputs(&model(merged()), &[("input_ids", HostTensor::I64(ids())), ("past_key_values.0.key", empty_past()), (USE_CACHE_BRANCH, false_)]);
        let (graph, done) = transformed(merged());
        assert_eq!(done, CacheRemoval { branches_inlined: 1, presents_dropped: 1, pasts_removed: 1, ..Default::default() });
        let inputs: Vec<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(inputs, ["input_ids"]);
        assert!(graph.nodes.iter().all(|n| n.op_type != "If"));
        let got = outputs(&graph.clone().into_model(), &[("input_ids", HostTensor::I64(ids()))]);
        assert_eq!(got["logits"], reference["logits"]);
        assert_eq!(got["w_inner"], reference["w_inner"], "the main graph's own w_inner is not the branch's");
    }

    #[test]
    fn use_cache_branch_read_by_another_op_is_refused_naming_the_node() {
        let mut g = merged();
        g.node.push(node("Not", &[USE_CACHE_BRANCH], &["not_cached"]));
        let mut graph = Graph::from_model(model(g)).unwrap();
        let e = remove_kv_cache(&mut graph).unwrap_err().to_string();
        assert!(e.contains("Not_not_cached") && e.contains(USE_CACHE_BRANCH), "{e}");
    }

    #[test]
    fn a_past_of_unknown_shape_is_refused_naming_it() {
        let mut g = with_past();
        g.input[1] = value_info("past_key_values.0.key", dtype::FLOAT, &[sym("batch"), sym("heads"), sym("past"), Dim::Fixed(HEAD_DIM)]);
        let mut graph = Graph::from_model(model(g)).unwrap();
        let e = remove_kv_cache(&mut graph).unwrap_err().to_string();
        assert!(e.contains("past_key_values.0.key") && e.contains("fixed kv_heads"), "{e}");
    }
}
