//! Casting half-precision frozen weights where each use needs them, not once for the whole step.
//!
//! After [`super::store_frozen`] a half weight `W.bfloat16` is read through one `Cast` to float32 named `W`.
//! ONNX Runtime frees a tensor after its last reader, and `W`'s last reader is in the backward pass (the
//! input gradient of `x·W` reads `W` again), so every frozen weight's float32 copy stays alive from its
//! forward use to its backward one: the float32 bytes of the whole model, twice its half bytes, for the
//! whole step. Nor is a `Cast` that reads only an initializer bound to run near its reader.
//!
//! This phase gives every reader its own cast, made to depend on one of the reader's other inputs (the
//! activation going forward, the incoming gradient going backward), so it runs when its reader can, and is
//! freed right after:
//!
//! ```text
//! Cast(W.bfloat16) → W → MatMul(dY, Transpose(W))
//!   becomes
//! Reshape(W.bfloat16, Shape(W.bfloat16) + 0·Size(dY)) → Cast → Transpose → MatMul(dY, ·)
//! ```
//!
//! The `Reshape` changes nothing but the order: its shape is the weight's own, plus a zero computed from the
//! reader's other input. Chains of layout ops on the weight alone (a tied embedding's `Transpose`) are
//! cloned with it. A `Gather` (an embedding lookup) reads the half weight itself and casts only the rows it
//! took. A `Split` of the weight (the vocabulary slices of a frozen lm_head) becomes, for each reader of a
//! part, a `Slice` of the half weight and a cast of that part alone: Llama 3's 128,256 x 2,048 head was
//! otherwise cast whole (1.05 GB) and its parts kept from the forward pass to the backward one (1.05 GB
//! more). A `Shape` of such a value reads the half weight's shape (or a constant, for a part). Readers with
//! no other input to wait for keep the shared cast.

use std::collections::{HashMap, HashSet};

use super::{constant_tensors, Builder, Graph, Names};
use crate::onnx::{attr_i, attr_t, dtype, tensor_i64, tensor_to_i64, NodeAttrs, NodeProto, TensorProto};

/// Ops that only move a weight's values: cloned per reader with the cast before them.
const LAYOUT_OPS: &[&str] = &["Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"];

/// What a float32 value that comes from frozen half weights alone is made from.
enum WeightValue {
    /// The `Cast` of a half initializer (by its name).
    Cast { half: String },
    /// A layout op over weight values and constants (by node index).
    Layout(usize),
    /// One output of a `Split` of a half initializer's cast (the vocabulary slices of a frozen lm_head):
    /// each reader slices the half weight and casts its part only.
    Part { half: String, axis: i64, start: i64, end: i64, dims: Vec<i64> },
}

/// Rewrites `graph` so that every reader of a frozen half weight's cast has its own, and returns how many
/// readers were rewritten.
pub fn cast_per_use(graph: &mut Graph) -> usize {
    let constants: HashSet<String> = graph
        .initializers
        .iter()
        .map(|t| t.name.clone())
        .chain(graph.nodes.iter().filter(|n| n.op_type == "Constant").flat_map(|n| n.output.iter().cloned()))
        .collect();
    let weights = weight_values(graph, &constants);
    if weights.is_empty() {
        return 0;
    }
    let mut names = Names::from_graph(graph);
    let mut b = Builder::new(&mut names, "cast_per_use/");
    let mut rewritten = 0;
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let mut node = node.clone();
        let is_weight_node = node.output.iter().any(|o| weights.contains_key(o.as_str()));
        let reads_weights = node.input.iter().any(|x| weights.contains_key(x.as_str()));
        if is_weight_node || !reads_weights {
            nodes.push(node);
            continue;
        }
        if let Some(shape) = shape_without_cast(&node, &weights, &mut b) {
            // a shape is known without the values (recomputation gates read the shapes of the parts)
            nodes.extend(b.take());
            nodes.push(shape);
            rewritten += 1;
            continue;
        }
        if let Some(half) = gathered_half(&node, &weights) {
            // Gather the half rows, then cast only those
            let rows = b.fresh(&format!("{}/half", node.output[0]));
            let mut gather = node.clone();
            gather.input[0] = half;
            gather.output[0] = rows.clone();
            gather.name = b.names.fresh(&format!("{}/half", node.name));
            b.nodes.push(gather);
            b.op_into("Cast", &[&rows], &[&node.output[0]], vec![attr_i("to", dtype::FLOAT as i64)]);
            nodes.extend(b.take());
            rewritten += 1;
            continue;
        }
        let Some(dep) = node.input.iter().find(|x| !x.is_empty() && !weights.contains_key(x.as_str()) && !constants.contains(x.as_str())).cloned() else {
            nodes.push(node);
            continue;
        };
        let mut cloned = HashMap::new();
        for k in 0..node.input.len() {
            if weights.contains_key(node.input[k].as_str()) {
                node.input[k] = clone_for(&node.input[k], &dep, graph, &weights, &mut b, &mut cloned);
            }
        }
        nodes.extend(b.take());
        nodes.push(node);
        rewritten += 1;
    }
    graph.nodes = nodes;
    graph.names = names;
    graph.prune();
    rewritten
}

/// The float32 values computed from frozen half weights alone, by name.
fn weight_values(graph: &Graph, constants: &HashSet<String>) -> HashMap<String, WeightValue> {
    let half: HashMap<&str, &[i64]> = graph
        .initializers
        .iter()
        .filter(|t| t.data_type == dtype::FLOAT16 || t.data_type == dtype::BFLOAT16)
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    let constant_values = constant_tensors(&graph.nodes, &graph.initializers);
    let mut values = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        if let Some(parts) = split_parts(n, &values, &constant_values, &half) {
            values.extend(parts);
            continue;
        }
        let to_float = n.attribute.iter().any(|a| a.name == "to" && a.i == dtype::FLOAT as i64);
        if n.op_type == "Cast" && to_float && n.input.len() == 1 && half.contains_key(n.input[0].as_str()) {
            values.insert(n.output[0].clone(), WeightValue::Cast { half: n.input[0].clone() });
        } else if LAYOUT_OPS.contains(&n.op_type.as_str())
            && n.output.len() == 1
            && n.input.first().is_some_and(|x| values.contains_key(x.as_str()))
            && n.input[1..].iter().all(|x| x.is_empty() || constants.contains(x.as_str()))
        {
            values.insert(n.output[0].clone(), WeightValue::Layout(i));
        }
    }
    values
}

/// The parts of a `Split` of a half weight's cast along constant sizes, by output name.
fn split_parts(
    n: &NodeProto,
    values: &HashMap<String, WeightValue>,
    constants: &HashMap<String, TensorProto>,
    half_dims: &HashMap<&str, &[i64]>,
) -> Option<Vec<(String, WeightValue)>> {
    if n.op_type != "Split" {
        return None;
    }
    let Some(WeightValue::Cast { half }) = values.get(n.input.first()?.as_str()) else { return None };
    let sizes = match n.input.get(1).filter(|x| !x.is_empty()) {
        Some(x) => tensor_to_i64(constants.get(x.as_str())?).ok()?,
        None => n.ints_attr("split")?.to_vec(),
    };
    let whole = *half_dims.get(half.as_str())?;
    let rank = whole.len() as i64;
    let axis = n.attribute.iter().find(|a| a.name == "axis").map_or(0, |a| a.i);
    let axis = if axis < 0 { axis + rank } else { axis };
    if sizes.len() != n.output.len() || !(0..rank).contains(&axis) {
        return None;
    }
    let mut start = 0;
    let mut parts = Vec::with_capacity(sizes.len());
    for (out, size) in n.output.iter().zip(sizes) {
        let mut dims = whole.to_vec();
        dims[axis as usize] = size;
        parts.push((out.clone(), WeightValue::Part { half: half.clone(), axis, start, end: start + size, dims }));
        start += size;
    }
    Some(parts)
}

/// A `Shape` of a weight value that reads no float32 values: of the half initializer itself, or a
/// constant for a part of one.
fn shape_without_cast(node: &NodeProto, weights: &HashMap<String, WeightValue>, b: &mut Builder) -> Option<NodeProto> {
    if node.op_type != "Shape" || !node.attribute.is_empty() {
        return None;
    }
    let mut shape = node.clone();
    match weights.get(node.input.first()?.as_str())? {
        WeightValue::Cast { half } => shape.input[0] = half.clone(),
        WeightValue::Part { dims, .. } => {
            let value = tensor_i64("", &[dims.len() as i64], dims);
            shape = NodeProto { op_type: "Constant".into(), output: node.output.clone(), name: b.names.fresh(&node.name), ..Default::default() };
            shape.attribute.push(attr_t("value", value));
        }
        WeightValue::Layout(_) => return None,
    }
    Some(shape)
}

/// The half initializer a `Gather` reads rows of through its cast.
fn gathered_half(node: &NodeProto, weights: &HashMap<String, WeightValue>) -> Option<String> {
    if node.op_type != "Gather" {
        return None;
    }
    match weights.get(node.input.first()?.as_str())? {
        WeightValue::Cast { half } => Some(half.clone()),
        WeightValue::Layout(_) | WeightValue::Part { .. } => None,
    }
}

/// A copy of weight value `name` for one reader, made after `dep` exists (`cloned`: this reader's copies).
fn clone_for(name: &str, dep: &str, graph: &Graph, weights: &HashMap<String, WeightValue>, b: &mut Builder, cloned: &mut HashMap<String, String>) -> String {
    if let Some(done) = cloned.get(name) {
        return done.clone();
    }
    let out = match &weights[name] {
        WeightValue::Cast { half } => {
            let waited = waited_for(half, dep, b);
            b.op("Cast", &[&waited], vec![attr_i("to", dtype::FLOAT as i64)], &format!("{name}/use"))
        }
        WeightValue::Part { half, axis, start, end, .. } => {
            let waited = waited_for(half, dep, b);
            let (starts, ends, axes) = (b.ints(&[*start]), b.ints(&[*end]), b.ints(&[*axis]));
            let part = b.op("Slice", &[&waited, &starts, &ends, &axes], vec![], &format!("{name}/half"));
            b.op("Cast", &[&part], vec![attr_i("to", dtype::FLOAT as i64)], &format!("{name}/use"))
        }
        WeightValue::Layout(i) => {
            let mut node = graph.nodes[*i].clone();
            node.input[0] = clone_for(&node.input[0], dep, graph, weights, b, cloned);
            let out = b.fresh(&format!("{name}/use"));
            node.output[0] = out.clone();
            node.name = b.names.fresh(&format!("cast_per_use/{}", node.name));
            b.nodes.push(node);
            out
        }
    };
    cloned.insert(name.to_string(), out.clone());
    out
}

/// Half initializer `half`, read only once `dep` exists: `Reshape(half, Shape(half) + 0·Size(dep))`.
fn waited_for(half: &str, dep: &str, b: &mut Builder) -> String {
    let size = b.op("Size", &[dep], vec![], &format!("{half}/after"));
    let zero = b.op("Sub", &[&size, &size], vec![], &format!("{half}/zero"));
    let own = b.op("Shape", &[half], vec![], &format!("{half}/shape"));
    let shape = b.op("Add", &[&own, &zero], vec![], &format!("{half}/shape_after"));
    b.op("Reshape", &[half, &shape], vec![], &format!("{half}/waited"))
}
