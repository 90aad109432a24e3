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
//! took. Readers with no other input to wait for keep the shared cast.

use std::collections::{HashMap, HashSet};

use super::{Builder, Graph, Names};
use crate::onnx::{attr_i, dtype, NodeProto};

/// Ops that only move a weight's values: cloned per reader with the cast before them.
const LAYOUT_OPS: &[&str] = &["Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"];

/// What a float32 value that comes from frozen half weights alone is made from.
enum WeightValue {
    /// The `Cast` of a half initializer (by its name).
    Cast { half: String },
    /// A layout op over weight values and constants (by node index).
    Layout(usize),
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
    let half: HashSet<&str> =
        graph.initializers.iter().filter(|t| t.data_type == dtype::FLOAT16 || t.data_type == dtype::BFLOAT16).map(|t| t.name.as_str()).collect();
    let mut values = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let to_float = n.attribute.iter().any(|a| a.name == "to" && a.i == dtype::FLOAT as i64);
        if n.op_type == "Cast" && to_float && n.input.len() == 1 && half.contains(n.input[0].as_str()) {
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

/// The half initializer a `Gather` reads rows of through its cast.
fn gathered_half(node: &NodeProto, weights: &HashMap<String, WeightValue>) -> Option<String> {
    if node.op_type != "Gather" {
        return None;
    }
    match weights.get(node.input.first()?.as_str())? {
        WeightValue::Cast { half } => Some(half.clone()),
        WeightValue::Layout(_) => None,
    }
}

/// A copy of weight value `name` for one reader, made after `dep` exists (`cloned`: this reader's copies).
fn clone_for(name: &str, dep: &str, graph: &Graph, weights: &HashMap<String, WeightValue>, b: &mut Builder, cloned: &mut HashMap<String, String>) -> String {
    if let Some(done) = cloned.get(name) {
        return done.clone();
    }
    let out = match &weights[name] {
        WeightValue::Cast { half } => {
            let size = b.op("Size", &[dep], vec![], &format!("{half}/after"));
            let zero = b.op("Sub", &[&size, &size], vec![], &format!("{half}/zero"));
            let own = b.op("Shape", &[half], vec![], &format!("{half}/shape"));
            let shape = b.op("Add", &[&own, &zero], vec![], &format!("{half}/shape_after"));
            let waited = b.op("Reshape", &[half, &shape], vec![], &format!("{half}/waited"));
            b.op("Cast", &[&waited], vec![attr_i("to", dtype::FLOAT as i64)], &format!("{name}/use"))
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
