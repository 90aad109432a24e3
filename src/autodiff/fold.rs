//! Local rewrites of the emitted backward nodes that rules cannot see on their own, because each
//! pattern spans two rules. Every rewrite computes the same values with fewer full-size tensors;
//! the big wins are on tied embeddings, whose gradient is `vocab x hidden`.
//!
//! - `Transpose(Gemm(A, B))` → `Gemm(B, A)` with swapped transposes: the gradient of a weight used
//!   as `MatMul(x, Transpose(W))` comes out in `W`'s layout directly.
//! - `Sum(.., ScatterND(zeros, i, u, add), ..)` → `ScatterND(Sum(..), i, u, add)`: a gather's
//!   gradient scatters into the other contributions instead of into a fresh zero tensor.
//! - `LogSoftmax`'s gradient `g - exp(y) * sum(g)` where `g = ScatterElements(zeros, i, u, add)`
//!   (the log-prob of picked tokens, the usual LM loss) → `ScatterElements(exp(y) * -sum(u), i, u,
//!   add)`: no zero tensor, no vocabulary-wide row sums, no subtraction. Only when the probes show
//!   `i` covering every non-axis position of the scattered tensor, so `sum(g) = sum(u)` row by row.
//! - `Identity` of a tensor nothing else reads: its producer writes the identity's output instead
//!   (a parameter's single gradient contribution would otherwise be copied once more).
//! - Nodes whose outputs nothing reads are dropped.

use std::collections::{HashMap, HashSet};

use crate::graph::{constant_tensors, live_nodes, Names, TensorInfos};
use crate::onnx::{attr_i, tensor_to_i64, NodeAttrs, NodeProto, TensorProto};

/// Applies every rewrite to `nodes` (in topological order); `roots` are the outputs that must stay.
/// `infos` are the forward tensors' probed shapes.
pub fn fold(nodes: Vec<NodeProto>, roots: &HashSet<String>, names: &mut Names, infos: &TensorInfos) -> Vec<NodeProto> {
    let nodes = log_softmax_of_scatter(nodes, infos, names);
    let nodes = transpose_of_gemm(nodes);
    let nodes = scatter_into_sum(nodes, names);
    let nodes = rename_through_identity(nodes, roots);
    drop_dead(nodes, roots)
}

/// How many node inputs read each tensor (owned keys: the rewrites then mutate `nodes`).
fn consumer_counts(nodes: &[NodeProto]) -> HashMap<String, usize> {
    let mut uses = HashMap::new();
    for n in nodes {
        for i in &n.input {
            *uses.entry(i.clone()).or_insert(0) += 1;
        }
    }
    uses
}

fn producers(nodes: &[NodeProto]) -> HashMap<String, usize> {
    nodes.iter().enumerate().flat_map(|(k, n)| n.output.iter().map(move |o| (o.clone(), k))).collect()
}

fn transpose_of_gemm(mut nodes: Vec<NodeProto>) -> Vec<NodeProto> {
    let prod = producers(&nodes);
    let uses = consumer_counts(&nodes);
    let mut removed = HashSet::new();
    for t in 0..nodes.len() {
        let n = &nodes[t];
        let swaps = n.op_type == "Transpose" && n.ints_attr("perm").is_some_and(|p| p == [1, 0]);
        if !swaps {
            continue;
        }
        let Some(&g) = prod.get(&n.input[0]) else { continue };
        let gemm = &nodes[g];
        let plain = gemm.op_type == "Gemm" && gemm.input.len() == 2 && uses.get(&gemm.output[0]) == Some(&1);
        if !plain {
            continue;
        }
        // (op(A) op(B))^T = op(B)^T op(A)^T
        let (ta, tb) = (gemm.int_or("transA", 0), gemm.int_or("transB", 0));
        let mut attrs: Vec<_> = gemm.attribute.iter().filter(|a| a.name != "transA" && a.name != "transB").cloned().collect();
        attrs.push(attr_i("transA", 1 - tb));
        attrs.push(attr_i("transB", 1 - ta));
        let swapped = NodeProto {
            input: vec![gemm.input[1].clone(), gemm.input[0].clone()],
            output: nodes[t].output.clone(),
            name: nodes[t].name.clone(),
            op_type: "Gemm".into(),
            attribute: attrs,
            ..Default::default()
        };
        nodes[t] = swapped;
        removed.insert(g);
    }
    nodes.into_iter().enumerate().filter(|(k, _)| !removed.contains(k)).map(|(_, n)| n).collect()
}

fn is_zero_tensor(t: &TensorProto) -> bool {
    t.raw_data.iter().all(|&b| b == 0)
        && t.float_data.iter().all(|&v| v == 0.0)
        && t.double_data.iter().all(|&v| v == 0.0)
        && t.int32_data.iter().all(|&v| v == 0)
        && t.int64_data.iter().all(|&v| v == 0)
}

fn is_zeros(n: &NodeProto) -> bool {
    n.op_type == "ConstantOfShape" && n.tensor_attr("value").map(is_zero_tensor).unwrap_or(true)
}

/// The nodes of one `Sub(g, Mul(exp(y), ReduceSum(g)))` over a scattered `g`.
struct ScatteredLogSoftmaxGrad {
    sub: usize,
    scatter: usize,
    reduce: usize,
    mul: usize,
    /// Which input of the `Mul` is the row sum.
    sum_slot: usize,
}

fn match_scattered_log_softmax_grad(
    nodes: &[NodeProto],
    sub: usize,
    prod: &HashMap<String, usize>,
    uses: &HashMap<String, usize>,
    consts: &HashMap<String, TensorProto>,
    infos: &TensorInfos,
) -> Option<ScatteredLogSoftmaxGrad> {
    let node = |name: &str, op: &str| prod.get(name).copied().filter(|&k| nodes[k].op_type == op);
    let d = &nodes[sub];
    if d.op_type != "Sub" || d.input.len() != 2 {
        return None;
    }
    let scatter = node(&d.input[0], "ScatterElements")?;
    let sc = &nodes[scatter];
    let g = &sc.output[0];
    if sc.input.len() != 3 || sc.str_attr("reduction").as_deref() != Some("add") || uses.get(g) != Some(&2) {
        return None;
    }
    let zeros = node(&sc.input[0], "ConstantOfShape").filter(|&z| is_zeros(&nodes[z]))?;
    let like = node(&nodes[zeros].input[0], "Shape").filter(|&s| nodes[s].attribute.is_empty())?;
    let (data, idx) = (infos.get(&nodes[like].input[0])?, infos.get(&sc.input[1])?);
    let rank = data.rank() as i64;
    let axis = sc.int_or("axis", 0).rem_euclid(rank.max(1));
    let covers = idx.rank() == data.rank() && (0..2).all(|p| (0..data.rank()).all(|k| k as i64 == axis || idx.dims[p][k] == data.dims[p][k]));
    if !covers {
        return None;
    }
    let mul = node(&d.input[1], "Mul").filter(|&m| uses.get(&nodes[m].output[0]) == Some(&1))?;
    let (sum_slot, reduce) = nodes[mul].input.iter().enumerate().find_map(|(k, x)| Some((k, node(x, "ReduceSum")?)))?;
    // The other factor must have the scattered tensor's full shape (it becomes the scatter's data):
    // `exp(y)` of the log-softmax output `y`, which has the probed shape of `data`.
    let factor = node(nodes[mul].input.get(1 - sum_slot)?, "Exp")?;
    if infos.get(&nodes[factor].input[0]).map(|i| &i.dims) != Some(&data.dims) {
        return None;
    }
    let r = &nodes[reduce];
    let axes = match r.input.get(1) {
        Some(a) => tensor_to_i64(consts.get(a)?).ok()?,
        None => r.ints_attr("axes")?.to_vec(),
    };
    let one_axis = axes.len() == 1 && axes[0].rem_euclid(rank.max(1)) == axis;
    let fits = r.input[0] == *g && r.int_or("keepdims", 1) == 1 && one_axis && uses.get(&r.output[0]) == Some(&1);
    fits.then_some(ScatteredLogSoftmaxGrad { sub, scatter, reduce, mul, sum_slot })
}

fn log_softmax_of_scatter(mut nodes: Vec<NodeProto>, infos: &TensorInfos, names: &mut Names) -> Vec<NodeProto> {
    let prod = producers(&nodes);
    let uses = consumer_counts(&nodes);
    let consts = constant_tensors(&nodes, &[]);
    let found: Vec<_> = (0..nodes.len()).filter_map(|k| match_scattered_log_softmax_grad(&nodes, k, &prod, &uses, &consts, infos)).collect();
    let mut removed = HashSet::new();
    let mut inserted: HashMap<usize, NodeProto> = HashMap::new();
    for m in found {
        let scatter = nodes[m.scatter].clone();
        let updates = scatter.input[2].clone();
        nodes[m.reduce].input[0] = updates.clone();
        let row_sum = nodes[m.reduce].output[0].clone();
        let negated = names.fresh(&format!("{row_sum}_neg"));
        inserted.insert(
            m.mul,
            NodeProto { input: vec![row_sum], output: vec![negated.clone()], name: format!("grad/{negated}"), op_type: "Neg".into(), ..Default::default() },
        );
        nodes[m.mul].input[m.sum_slot] = negated;
        let base = nodes[m.mul].output[0].clone();
        let sub = &nodes[m.sub];
        let rewritten = NodeProto { input: vec![base, scatter.input[1].clone(), updates], output: sub.output.clone(), name: sub.name.clone(), ..scatter };
        nodes[m.sub] = rewritten;
        removed.insert(m.scatter);
    }
    splice(nodes, inserted, &removed)
}

/// `nodes` without the `removed` indices, with `inserted[k]` placed just before node `k`.
fn splice(nodes: Vec<NodeProto>, mut inserted: HashMap<usize, NodeProto>, removed: &HashSet<usize>) -> Vec<NodeProto> {
    let mut out = Vec::with_capacity(nodes.len() + inserted.len());
    for (k, n) in nodes.into_iter().enumerate() {
        if let Some(pre) = inserted.remove(&k) {
            out.push(pre);
        }
        if !removed.contains(&k) {
            out.push(n);
        }
    }
    out
}

fn scatter_into_sum(mut nodes: Vec<NodeProto>, names: &mut Names) -> Vec<NodeProto> {
    let prod = producers(&nodes);
    let uses = consumer_counts(&nodes);
    let mut removed = HashSet::new();
    let mut inserted: HashMap<usize, NodeProto> = HashMap::new();
    for s in 0..nodes.len() {
        if nodes[s].op_type != "Sum" || nodes[s].input.len() < 2 {
            continue;
        }
        let found = nodes[s].input.iter().enumerate().find_map(|(k, x)| {
            let &p = prod.get(x)?;
            let sc = &nodes[p];
            let adds = sc.str_attr("reduction").as_deref() == Some("add");
            let into_zeros = prod.get(&sc.input[0]).map(|&z| is_zeros(&nodes[z])).unwrap_or(false);
            let fits = sc.op_type == "ScatterND" && adds && into_zeros && uses.get(x) == Some(&1) && !removed.contains(&p);
            fits.then_some((k, p))
        });
        let Some((k, p)) = found else { continue };
        let mut others: Vec<String> = nodes[s].input.clone();
        others.remove(k);
        let data = if others.len() == 1 {
            others.pop().unwrap()
        } else {
            let partial = names.fresh(&format!("{}_partial", nodes[s].output[0]));
            let sum = NodeProto { input: others, output: vec![partial.clone()], name: partial.clone(), op_type: "Sum".into(), ..Default::default() };
            inserted.insert(s, sum);
            partial
        };
        let mut scatter = nodes[p].clone();
        scatter.input[0] = data;
        scatter.output = nodes[s].output.clone();
        scatter.name = nodes[s].name.clone();
        nodes[s] = scatter;
        removed.insert(p);
    }
    splice(nodes, inserted, &removed)
}

fn rename_through_identity(mut nodes: Vec<NodeProto>, roots: &HashSet<String>) -> Vec<NodeProto> {
    let prod = producers(&nodes);
    let uses = consumer_counts(&nodes);
    let mut removed = HashSet::new();
    for k in 0..nodes.len() {
        if nodes[k].op_type != "Identity" {
            continue;
        }
        let x = nodes[k].input[0].clone();
        let Some(&p) = prod.get(&x) else { continue };
        if uses.get(&x) != Some(&1) || roots.contains(&x) {
            continue;
        }
        let y = nodes[k].output[0].clone();
        if let Some(slot) = nodes[p].output.iter_mut().find(|o| **o == x) {
            *slot = y;
            removed.insert(k);
        }
    }
    nodes.into_iter().enumerate().filter(|(k, _)| !removed.contains(k)).map(|(_, n)| n).collect()
}

fn drop_dead(nodes: Vec<NodeProto>, roots: &HashSet<String>) -> Vec<NodeProto> {
    let (keep, _) = live_nodes(&nodes, roots.clone());
    nodes.into_iter().zip(keep).filter_map(|(n, k)| k.then_some(n)).collect()
}
