//! Each decoder block's weight gradients computed as soon as the backward pass has been through the
//! block, whatever order the runtime picks.
//!
//! A weight gradient is a graph output that no other node reads, so a runtime may leave it to the end
//! of the run: ONNX Runtime's default order (a depth-first walk back from each output in turn) does,
//! and then every input of those products (each block's activations, recomputed ones included, and
//! the gradients flowing into it) stays alive until the end, which undoes gradient checkpointing and
//! holds the plain graph's activations through the whole backward pass. This phase makes the rest of
//! the backward pass wait for them: every gradient tensor computed before a block's last weight
//! gradient and read after it is read through a gate (`dependency::gate`) on that block's weight
//! gradients. Values are unchanged; only when nodes may run changes.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::dependency::{exists_after, gate, gradient_tensors};
use super::{Builder, Graph};

const MARK: &str = "in_order/";

/// What [`tie_weight_gradients`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ordered {
    /// Blocks whose weight gradients the rest of the backward pass now waits for.
    pub blocks: usize,
    /// Gradient tensors read through a gate.
    pub gated: usize,
}

/// One block's weight gradients: the last node (list index) computing one, and their names.
struct Boundary {
    last: usize,
    gradients: Vec<String>,
}

/// `blocks` are the forward nodes of each decoder block (indices below `forward_len`; the nodes from
/// `forward_len` on are the backward pass, whose gradients depend on `seed`); `by_param` pairs each
/// parameter with its gradient output. Only parameters no forward node outside the block reads count.
pub fn tie_weight_gradients(graph: &mut Graph, forward_len: usize, seed: &str, blocks: &[Vec<usize>], by_param: &[(String, String)]) -> Ordered {
    let boundaries = boundaries(graph, forward_len, blocks, by_param);
    if boundaries.is_empty() {
        return Ordered::default();
    }
    let gradients = gradient_tensors(&graph.nodes[forward_len..], seed);
    let producer: HashMap<String, usize> = graph.producers().into_iter().map(|(t, i)| (t.to_string(), i)).collect();
    // per boundary: tensor -> the backward nodes that read it after the boundary
    let mut crossings: Vec<BTreeMap<String, Vec<usize>>> = vec![BTreeMap::new(); boundaries.len()];
    for j in forward_len..graph.nodes.len() {
        for x in &graph.nodes[j].input {
            let Some(&p) = producer.get(x).filter(|_| gradients.contains(x)) else { continue };
            // the latest boundary between the tensor and its reader
            if let Some(k) = boundaries.iter().rposition(|b| p <= b.last && b.last < j) {
                crossings[k].entry(x.clone()).or_default().push(j);
            }
        }
    }
    let mut names = std::mem::take(&mut graph.names);
    let mut inserts: Vec<(usize, Vec<crate::onnx::NodeProto>)> = Vec::new();
    let mut report = Ordered::default();
    for (boundary, tensors) in boundaries.iter().zip(&crossings).filter(|(_, t)| !t.is_empty()) {
        let mut b = Builder::new(&mut names, "");
        let waits: Vec<&str> = boundary.gradients.iter().map(String::as_str).collect();
        let dep = exists_after(&mut b, &waits, MARK);
        for (x, readers) in tensors {
            let gated = gate(&mut b, x, dep.as_deref(), MARK);
            for &j in readers {
                for input in graph.nodes[j].input.iter_mut().filter(|i| *i == x) {
                    *input = gated.clone();
                }
            }
            report.gated += 1;
        }
        report.blocks += 1;
        inserts.push((boundary.last + 1, b.take()));
    }
    graph.names = names;
    inserts.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, nodes) in inserts {
        graph.nodes.splice(at..at, nodes);
    }
    report
}

/// Each block's exclusive weight gradients and where the last is computed, in list order.
fn boundaries(graph: &Graph, forward_len: usize, blocks: &[Vec<usize>], by_param: &[(String, String)]) -> Vec<Boundary> {
    let grad_of: HashMap<&str, &str> = by_param.iter().map(|(p, g)| (p.as_str(), g.as_str())).collect();
    let producer = graph.producers();
    let mut readers: HashMap<&str, HashSet<usize>> = HashMap::new();
    for (i, n) in graph.nodes[..forward_len].iter().enumerate() {
        for x in n.input.iter().filter(|x| grad_of.contains_key(x.as_str())) {
            readers.entry(x.as_str()).or_default().insert(i);
        }
    }
    let mut out: Vec<Boundary> = blocks
        .iter()
        .filter_map(|block| {
            let members: HashSet<usize> = block.iter().copied().collect();
            let mut gradients: Vec<String> = readers
                .iter()
                // every reader in the block (each parameter listed has at least one)
                .filter(|(_, r)| r.iter().all(|i| members.contains(i)))
                .map(|(p, _)| grad_of[p].to_string())
                .collect();
            gradients.sort();
            let last = gradients.iter().map(|g| producer.get(g.as_str()).copied()).collect::<Option<Vec<usize>>>()?.into_iter().max()?;
            (last >= forward_len).then_some(Boundary { last, gradients })
        })
        .collect();
    out.sort_by_key(|b| b.last);
    out
}
