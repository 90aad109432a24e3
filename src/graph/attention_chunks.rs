//! Causal attention in query chunks: every `softmax(q k^T ...) v` of the decoder computed for a slice
//! of the queries at a time, against only the keys up to that slice's last query.
//!
//! Why: at long rows a block's attention scores, probabilities and their gradients are `[rows, heads,
//! T, T]` each (SmolLM2, 8 rows of 1,787 tokens: 0.9 GiB per tensor), and they decided the peak of the
//! recomputed graph. In chunks, a chunk's scores die with the chunk in the forward pass, the keys a
//! causal query never sees are not multiplied at all (about half the products), and what the backward
//! pass keeps is the lower triangle only. Values are unchanged up to float summation order: the keys
//! left out are the ones the model's causal mask sends to zero weight, so this relies on the model
//! being a causal decoder (every model betadpo trains is). Queries and keys are aligned at the end, so
//! a query `i` of `Tq` sees the keys up to `i + Tk - Tq`.
//!
//! An attention is found, not assumed: a Softmax over the last axis whose only reader is the left
//! operand of a MatMul (the values; a Cast between them is allowed), fed through a chain of element-wise ops (scale, soft-cap, masks,
//! biases) that each have one reader, from a MatMul (queries by transposed keys). The chain's other
//! operands are sliced along the query and key axes where they are not broadcast. Anything else is
//! left as it is.
//!
//! The probes cannot see a chunk's size vary (two probe lengths may cut into equal chunks), so each
//! chunk tensor is recorded with the shape of the tensor it is cut from: its query and key axes
//! depend on the batch, which is what the gradient rules need to know.

use std::collections::HashMap;

use super::{Builder, Graph, TensorInfo, TensorInfos};
use crate::onnx::{attr_i, dtype, NodeAttrs, NodeProto};

/// The element-wise ops an attention's scores may pass through between the product and the softmax.
const CHAIN_OPS: [&str; 7] = ["Add", "Sub", "Mul", "Div", "Where", "Tanh", "Cast"];

/// One attention found in the graph (node indices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attention {
    /// `MatMul(q, k^T)`
    pub scores: usize,
    /// The element-wise nodes from the scores to the softmax, in order, each with the input index
    /// that carries the scores.
    pub chain: Vec<(usize, usize)>,
    pub softmax: usize,
    /// Casts between the softmax and the product with the values (a TorchScript export's).
    pub casts: Vec<usize>,
    /// `MatMul(probabilities, v)`
    pub context: usize,
}

/// The attentions of `graph`, in node order.
pub fn find_attentions(graph: &Graph, infos: &TensorInfos) -> Vec<Attention> {
    let producer = graph.producers();
    let consumers = graph.consumers();
    let outputs: std::collections::HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    let private = |t: &str| !outputs.contains(t) && consumers.get(t).is_some_and(|c| c.len() == 1);
    let mut found = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate().filter(|(_, n)| n.op_type == "Softmax") {
        let (Some(out), Some(x)) = (n.output.first(), n.input.first()) else { continue };
        let Some(info) = infos.get(out) else { continue };
        let rank = info.rank() as i64;
        if rank < 2 || ![-1, rank - 1].contains(&n.int_attr("axis").unwrap_or(-1)) || !private(out) {
            continue;
        }
        let (mut probs, mut casts) = (out, Vec::new());
        let mut reader = consumers[out.as_str()][0];
        while graph.nodes[reader].op_type == "Cast" && casts.len() < 2 && private(&graph.nodes[reader].output[0]) {
            casts.push(reader);
            probs = &graph.nodes[reader].output[0];
            reader = consumers[probs.as_str()][0];
        }
        let ctx = &graph.nodes[reader];
        if ctx.op_type != "MatMul" || ctx.input[0] != *probs {
            continue;
        }
        let Some((scores, chain)) = chain_to_scores(graph, infos, &producer, &private, x) else { continue };
        let attention = Attention { scores, chain, softmax: i, casts, context: reader };
        if shapes_agree(graph, infos, &attention) {
            found.push(attention);
        }
    }
    found
}

/// Walks up from the softmax's input through private element-wise nodes to the scores' MatMul.
fn chain_to_scores(
    graph: &Graph,
    infos: &TensorInfos,
    producer: &HashMap<&str, usize>,
    private: &impl Fn(&str) -> bool,
    from: &str,
) -> Option<(usize, Vec<(usize, usize)>)> {
    let mut chain = Vec::new();
    let mut x = from.to_string();
    for _ in 0..16 {
        if !private(&x) {
            return None;
        }
        let p = *producer.get(x.as_str())?;
        let n = &graph.nodes[p];
        if n.op_type == "MatMul" {
            chain.reverse();
            return Some((p, chain));
        }
        if !CHAIN_OPS.contains(&n.op_type.as_str()) {
            return None;
        }
        let out_info = infos.get(&x)?;
        // the input carrying the scores: float, shaped like the output, computed by a node
        let carriers: Vec<usize> = (0..n.input.len())
            .filter(|&k| {
                let t = &n.input[k];
                producer.contains_key(t.as_str()) && infos.get(t).is_some_and(|i| i.is_float() && i.dims == out_info.dims)
            })
            .collect();
        let [k] = carriers[..] else { return None };
        chain.push((p, k));
        x = n.input[k].clone();
    }
    None
}

/// Queries, keys and values have the scores' rank and matching query/key sizes in both probes, the
/// query axis depends on the batch, and every other operand of the chain is sliceable.
fn shapes_agree(graph: &Graph, infos: &TensorInfos, a: &Attention) -> bool {
    let dims = |t: &str| infos.get(t).map(|i| i.dims.clone());
    let axis = |d: &[Vec<i64>; 2], k: usize| [d[0][k], d[1][k]];
    let n = &graph.nodes;
    let (Some(s), Some(q), Some(kt), Some(v)) =
        (dims(&n[a.scores].output[0]), dims(&n[a.scores].input[0]), dims(&n[a.scores].input[1]), dims(&n[a.context].input[1]))
    else {
        return false;
    };
    let r = s[0].len();
    if [&q, &kt, &v].iter().any(|d| d[0].len() != r) {
        return false;
    }
    let (tq, tk) = (axis(&s, r - 2), axis(&s, r - 1));
    let ok = axis(&q, r - 2) == tq && axis(&kt, r - 1) == tk && axis(&v, r - 2) == tk && tq[0] != tq[1];
    ok && a.chain.iter().all(|&(p, carrier)| side_inputs(&n[p], carrier).all(|x| side_slices(infos, x, &s).is_some()))
}

/// The operands of a chain node other than the scores.
fn side_inputs(n: &NodeProto, carrier: usize) -> impl Iterator<Item = &str> {
    n.input.iter().enumerate().filter(move |(k, x)| *k != carrier && !x.is_empty()).map(|(_, x)| x.as_str())
}

/// Which of a chain operand's last two axes follow the scores' query and key axes (`true`) and which
/// are broadcast (`false`); `None` when neither (it cannot be cut with the chunks).
fn side_slices(infos: &TensorInfos, x: &str, scores: &[Vec<i64>; 2]) -> Option<(bool, bool)> {
    let d = &infos.get(x)?.dims;
    let (rx, r) = (d[0].len(), scores[0].len());
    let follows = |from_end: usize| -> Option<bool> {
        if rx < from_end {
            return Some(false);
        }
        let (a, b) = ([d[0][rx - from_end], d[1][rx - from_end]], [scores[0][r - from_end], scores[1][r - from_end]]);
        match (a, b) {
            ([1, 1], _) => Some(false),
            _ if a == b => Some(true),
            _ => None,
        }
    };
    Some((follows(2)?, follows(1)?))
}

/// Computes every attention of `graph` in `chunks` query chunks (nothing for fewer than two), with
/// `infos` extended to the new tensors. Returns how many attentions were cut.
pub fn chunk_attention(graph: &mut Graph, infos: &mut TensorInfos, chunks: usize) -> usize {
    if chunks < 2 || graph.opset() < super::MIN_OPSET {
        return 0;
    }
    let found = find_attentions(graph, infos);
    let mut names = std::mem::take(&mut graph.names);
    let mut replaced: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut removed = std::collections::HashSet::new();
    for a in &found {
        let mut b = Builder::new(&mut names, "");
        cut(&mut b, graph, infos, a, chunks);
        replaced.insert(a.context, b.take());
        removed.extend([a.scores, a.softmax, a.context].into_iter().chain(a.chain.iter().map(|c| c.0)).chain(a.casts.iter().copied()));
    }
    graph.names = names;
    let old = std::mem::take(&mut graph.nodes);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(new) = replaced.remove(&i) {
            graph.nodes.extend(new);
        } else if !removed.contains(&i) {
            graph.nodes.push(n);
        }
    }
    found.len()
}

/// The chunked nodes of one attention; `infos` gets their tensors.
fn cut(b: &mut Builder, graph: &Graph, infos: &mut TensorInfos, a: &Attention, chunks: usize) {
    let n = &graph.nodes;
    let (q, kt) = (n[a.scores].input[0].as_str(), n[a.scores].input[1].as_str());
    let r = infos[&n[a.scores].output[0]].rank() as i64;
    let hint = n[a.softmax].output[0].clone();
    let mut ints = Ints { b, infos, hint: &hint };
    let tq = ints.size(q, r - 2, "queries");
    let tk = ints.size(kt, r - 1, "keys");
    let offset = ints.op("Sub", &[&tk, &tq], "key_offset");
    let zero = ints.constant(&[0]);
    let of = ints.constant(&[chunks as i64]);
    let mut bounds = vec![zero.clone()];
    for k in 1..chunks {
        let times = ints.constant(&[k as i64]);
        let m = ints.op("Mul", &[&tq, &times], "bound_times");
        bounds.push(ints.op("Div", &[&m, &of], "bound"));
    }
    bounds.push(tq.clone());
    let sizes: Vec<String> = (0..chunks).map(|k| ints.op("Sub", &[&bounds[k + 1], &bounds[k]], "chunk_size")).collect();
    let split = ints.concat(&sizes, "chunk_sizes");
    let key_ends: Vec<String> = (0..chunks).map(|k| ints.op("Add", &[&bounds[k + 1], &offset], "key_end")).collect();
    let Ints { b, infos, .. } = ints;
    let qs = b.op_n("Split", &[q, &split], chunks, vec![attr_i("axis", r - 2)], &format!("{hint}/queries"));
    let mut contexts = Vec::with_capacity(chunks);
    for k in 0..chunks {
        infos.insert(qs[k].clone(), infos[q].clone());
        let chunk = Chunk { start: &bounds[k], end: &bounds[k + 1], key_end: &key_ends[k], zero: &zero, hint: format!("{hint}/chunk{k}") };
        contexts.push(chunk.attend(b, graph, infos, a, &qs[k], r));
    }
    let refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
    b.op_into("Concat", &refs, &[&n[a.context].output[0]], vec![attr_i("axis", r - 2)]);
}

/// One query chunk's bounds (int64 tensors of one element).
struct Chunk<'a> {
    start: &'a str,
    end: &'a str,
    key_end: &'a str,
    zero: &'a str,
    hint: String,
}

impl Chunk<'_> {
    /// `softmax(chain(q_k k_k^T)) v_k` for the chunk's queries `qk` and the keys up to its last query.
    fn attend(&self, b: &mut Builder, graph: &Graph, infos: &mut TensorInfos, a: &Attention, q: &str, r: i64) -> String {
        let n = &graph.nodes;
        let (kt, v) = (n[a.scores].input[1].as_str(), n[a.context].input[1].as_str());
        let scores_dims = infos[&n[a.scores].output[0]].dims.clone();
        let kt_k = self.slice(b, infos, kt, &[(r - 1, false)]);
        let v_k = self.slice(b, infos, v, &[(r - 2, false)]);
        let mut x = copy_node(b, infos, &n[a.scores], &[q, &kt_k], &self.hint);
        for &(p, carrier) in &a.chain {
            let node = &n[p];
            let mut inputs: Vec<String> = Vec::with_capacity(node.input.len());
            for (k, input) in node.input.iter().enumerate() {
                inputs.push(match k {
                    _ if k == carrier => x.clone(),
                    _ if input.is_empty() => String::new(),
                    _ => {
                        let (query, key) = side_slices(infos, input, &scores_dims).expect("checked when found");
                        let rx = infos[input].rank() as i64;
                        let axes: Vec<(i64, bool)> =
                            [(rx - 2, true), (rx - 1, false)].into_iter().zip([query, key]).filter(|(_, s)| *s).map(|(a, _)| a).collect();
                        self.slice(b, infos, input, &axes)
                    }
                });
            }
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            x = copy_node(b, infos, node, &refs, &self.hint);
        }
        let mut p = copy_node(b, infos, &n[a.softmax], &[&x], &self.hint);
        for &c in &a.casts {
            p = copy_node(b, infos, &n[c], &[&p], &self.hint);
        }
        copy_node(b, infos, &n[a.context], &[&p, &v_k], &self.hint)
    }

    /// `x` cut along `axes` (axis, is it the query axis): queries to the chunk, keys to its key end.
    fn slice(&self, b: &mut Builder, infos: &mut TensorInfos, x: &str, axes: &[(i64, bool)]) -> String {
        if axes.is_empty() {
            return x.to_string();
        }
        let pick = |query: bool, on_query: &str, on_key: &str| if query { on_query.to_string() } else { on_key.to_string() };
        let starts: Vec<String> = axes.iter().map(|&(_, q)| pick(q, self.start, self.zero)).collect();
        let ends: Vec<String> = axes.iter().map(|&(_, q)| pick(q, self.end, self.key_end)).collect();
        let mut ints = Ints { b, infos, hint: &self.hint };
        let starts = ints.concat(&starts, "starts");
        let ends = ints.concat(&ends, "ends");
        let axes = ints.constant(&axes.iter().map(|a| a.0).collect::<Vec<_>>());
        let Ints { b, infos, .. } = ints;
        let out = b.op("Slice", &[x, &starts, &ends, &axes], vec![], &format!("{}/{}", self.hint, short(x)));
        let info = infos[x].clone();
        infos.insert(out.clone(), info);
        out
    }
}

/// A copy of `node` reading `inputs`, its output recorded with the original output's shape.
fn copy_node(b: &mut Builder, infos: &mut TensorInfos, node: &NodeProto, inputs: &[&str], hint: &str) -> String {
    let out = b.op(&node.op_type, inputs, node.attribute.clone(), &format!("{hint}/{}", short(&node.output[0])));
    infos.insert(out.clone(), infos[&node.output[0]].clone());
    out
}

/// The last path component of a tensor name, for readable chunk names.
fn short(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// Small int64 index arithmetic, each result recorded as a one-element tensor.
struct Ints<'a, 'b> {
    b: &'a mut Builder<'b>,
    infos: &'a mut TensorInfos,
    hint: &'a str,
}

impl Ints<'_, '_> {
    fn record(&mut self, t: String, len: i64) -> String {
        self.infos.insert(t.clone(), TensorInfo::fixed(dtype::INT64, &[len]));
        t
    }
    fn op(&mut self, op: &str, inputs: &[&str], what: &str) -> String {
        let t = self.b.op(op, inputs, vec![], &format!("{}/{what}", self.hint));
        self.record(t, 1)
    }
    fn constant(&mut self, v: &[i64]) -> String {
        let t = self.b.ints(v);
        self.record(t, v.len() as i64)
    }
    fn concat(&mut self, parts: &[String], what: &str) -> String {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let t = self.b.op("Concat", &refs, vec![attr_i("axis", 0)], &format!("{}/{what}", self.hint));
        self.record(t, parts.len() as i64)
    }
    /// The run-time size of `x` along `axis`.
    fn size(&mut self, x: &str, axis: i64, what: &str) -> String {
        let shape = self.b.op("Shape", &[x], vec![], &format!("{}/{what}_shape", self.hint));
        let rank = self.infos[x].rank() as i64;
        self.record(shape.clone(), rank);
        let at = self.constant(&[axis]);
        let t = self.b.op("Gather", &[&shape, &at], vec![attr_i("axis", 0)], &format!("{}/{what}", self.hint));
        self.record(t, 1)
    }
}
