//! Recomputation (gradient checkpointing) as a phase over a differentiated graph: the backward
//! reads of a segment's intermediate tensors (a decoder block's, a vocabulary chunk's) are pointed
//! at copies of the segment's forward nodes that run when the backward pass reaches the segment,
//! so those tensors die in the forward pass and only the segment's inputs live until the backward.
//!
//! A segment is any set of forward nodes: the values are the same for every choice, only what is
//! kept changes. Its *boundary* tensors (read by forward nodes outside it or by graph outputs) stay
//! as they are; every other tensor it produces that a backward node reads is recomputed.
//!
//! The copies must not run early: ONNX Runtime may schedule any node whose inputs exist. Every
//! tensor a copy reads from outside the segment goes through `Reshape(x, Concat(Shape(x), e))`,
//! where `e` is an empty int64 slice of the gradient tensors the segment's first backward reader
//! consumes: a data dependency on the backward reaching the segment that costs no copy (Reshape
//! aliases its input) and that no optimizer can fold (it reads a run-time tensor's data).

use std::collections::{HashMap, HashSet};

use super::dependency::{exists_after, gate, gradient_tensors};
use super::{Builder, Graph};
use crate::onnx::NodeProto;

/// What [`recompute`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recomputed {
    /// Segments with at least one tensor the backward reads.
    pub segments: usize,
    /// Forward nodes copied into the backward pass.
    pub nodes: usize,
    /// Distinct tensors the backward now reads from copies instead of the forward pass.
    pub tensors: usize,
}

/// One segment's copies, to be inserted before the backward node at `at`.
struct Plan {
    at: usize,
    nodes: Vec<NodeProto>,
    /// forward tensor -> its recomputed copy, for the backward readers
    renamed: HashMap<String, String>,
    readers: Vec<usize>,
    copies: usize,
}

/// Recomputes `segments` (indices of forward nodes, each < `forward_len`; the nodes from
/// `forward_len` on are the backward pass, in the order [`crate::autodiff::differentiate`] emits
/// them) in the backward pass; `seed` is the loss's gradient the backward pass starts from.
/// Segments must not overlap.
///
/// The segments listed in `one_at_a_time` (indices into `segments`) are recomputed one after
/// another in the order the backward pass reaches them: each one's copies also wait for every
/// gradient computed between the previous one's first backward reader and its own that is read
/// later (the gradients the previous segment sends on), so no two are alive at once. Without it
/// nothing stops a runtime from recomputing them all first: the gradient that reaches each
/// vocabulary slice is the same tensor.
pub fn recompute(graph: &mut Graph, forward_len: usize, seed: &str, segments: &[Vec<usize>], one_at_a_time: &[usize]) -> Recomputed {
    let mut names = std::mem::take(&mut graph.names);
    let g: &Graph = graph;
    let ctx = Context {
        graph: g,
        forward_len,
        gradients: gradient_tensors(&g.nodes[forward_len..], seed),
        producer: g.producers(),
        constants: g.nodes.iter().filter(|n| n.op_type == "Constant").flat_map(|n| n.output.iter().map(String::as_str)).collect(),
        initializers: g.initializers.iter().map(|t| t.name.as_str()).collect(),
    };
    let reads: Vec<SegmentReads> = segments.iter().map(|seg| segment_reads(&ctx, seg)).collect();
    let waits = waits_for_previous(&ctx, &reads, one_at_a_time);
    let mut plans = Vec::new();
    let mut report = Recomputed::default();
    for (k, seg_reads) in reads.iter().enumerate() {
        let after = waits.get(&k).map(Vec::as_slice).unwrap_or_default();
        if let Some(plan) = plan_segment(&ctx, seg_reads, after, &mut names) {
            report.segments += 1;
            report.tensors += plan.renamed.len();
            report.nodes += plan.copies;
            plans.push(plan);
        }
    }
    drop(reads);
    drop(ctx);
    graph.names = names;
    for plan in &plans {
        for &r in &plan.readers {
            for x in graph.nodes[r].input.iter_mut() {
                if let Some(copy) = plan.renamed.get(x.as_str()) {
                    *x = copy.clone();
                }
            }
        }
    }
    plans.sort_by_key(|p| std::cmp::Reverse(p.at));
    for plan in plans {
        graph.nodes.splice(plan.at..plan.at, plan.nodes);
    }
    report
}

/// Marks the names of copied nodes and tensors.
const COPY_MARK: &str = "recomputed/";

/// What every segment's plan reads.
struct Context<'a> {
    graph: &'a Graph,
    forward_len: usize,
    gradients: HashSet<String>,
    producer: HashMap<&'a str, usize>,
    constants: HashSet<&'a str>,
    initializers: HashSet<&'a str>,
}

/// For each segment of `one_at_a_time` but the first the backward pass reaches: the gradients its
/// copies wait for (see [`recompute`]).
fn waits_for_previous(ctx: &Context, reads: &[SegmentReads], one_at_a_time: &[usize]) -> HashMap<usize, Vec<String>> {
    let mut order: Vec<(usize, usize)> = one_at_a_time.iter().filter_map(|&k| Some((*reads[k].readers.first()?, k))).collect();
    if order.len() < 2 {
        return HashMap::new();
    }
    order.sort_unstable();
    let nodes = &ctx.graph.nodes;
    let consumers = ctx.graph.consumers();
    let outputs: HashSet<&str> = ctx.graph.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut waits = HashMap::new();
    for pair in order.windows(2) {
        let ((from, _), (to, next)) = (pair[0], pair[1]);
        let sent_on = |o: &&String| {
            ctx.gradients.contains(o.as_str()) && (outputs.contains(o.as_str()) || consumers.get(o.as_str()).is_some_and(|c| c.iter().any(|&j| j >= to)))
        };
        let finished: Vec<String> = nodes[from..to].iter().flat_map(|n| n.output.iter().filter(sent_on).cloned()).collect();
        waits.insert(next, finished);
    }
    waits
}

/// What a segment produces, which of it stays as it is, and who reads the rest in the backward pass.
struct SegmentReads<'a> {
    /// tensor -> the segment's node that produces it
    produced_by: HashMap<&'a str, usize>,
    /// produced tensors that forward nodes outside the segment or graph outputs read: kept
    boundary: HashSet<&'a str>,
    /// the backward nodes that read the other produced tensors (its inner ones), in order
    readers: Vec<usize>,
}

impl SegmentReads<'_> {
    fn inner(&self, x: &str) -> bool {
        self.produced_by.contains_key(x) && !self.boundary.contains(x)
    }
}

fn segment_reads<'a>(ctx: &Context<'a>, seg: &[usize]) -> SegmentReads<'a> {
    let (graph, forward_len) = (ctx.graph, ctx.forward_len);
    let nodes = &graph.nodes;
    let members: HashSet<usize> = seg.iter().copied().collect();
    let produced_by: HashMap<&str, usize> = seg.iter().flat_map(|&i| nodes[i].output.iter().filter(|o| !o.is_empty()).map(move |o| (o.as_str(), i))).collect();
    let mut boundary: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).filter(|o| produced_by.contains_key(o)).collect();
    for (_, n) in nodes[..forward_len].iter().enumerate().filter(|(i, _)| !members.contains(i)) {
        boundary.extend(n.input.iter().map(String::as_str).filter(|x| produced_by.contains_key(x)));
    }
    let mut reads = SegmentReads { produced_by, boundary, readers: Vec::new() };
    reads.readers = (forward_len..nodes.len()).filter(|&j| nodes[j].input.iter().any(|x| reads.inner(x))).collect();
    reads
}

fn plan_segment(ctx: &Context, reads: &SegmentReads, after: &[String], names: &mut super::Names) -> Option<Plan> {
    let nodes = &ctx.graph.nodes;
    let (produced_by, readers) = (&reads.produced_by, &reads.readers);
    let inner = |x: &str| reads.inner(x);
    let first = *readers.first()?;
    // the segment's nodes the read tensors need, through inner tensors only
    let mut needed: HashSet<usize> = HashSet::new();
    let mut stack: Vec<&str> = readers.iter().flat_map(|&j| nodes[j].input.iter().map(String::as_str)).filter(|x| inner(x)).collect();
    while let Some(t) = stack.pop() {
        let i = produced_by[t];
        if needed.insert(i) {
            stack.extend(nodes[i].input.iter().map(String::as_str).filter(|x| inner(x)));
        }
    }
    let mut b = Builder::new(names, "");
    let dep = backward_reached(&mut b, ctx, &readers, first, after);
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut order: Vec<usize> = needed.into_iter().collect();
    order.sort_unstable();
    let copies = order.len();
    for i in order {
        let n = &nodes[i];
        let mut input = Vec::with_capacity(n.input.len());
        for x in &n.input {
            let read = if x.is_empty() || ctx.constants.contains(x.as_str()) || ctx.initializers.contains(x.as_str()) {
                x.clone()
            } else if let Some(r) = renamed.get(x) {
                r.clone()
            } else {
                let gated = gate(&mut b, x, dep.as_deref(), COPY_MARK);
                renamed.insert(x.clone(), gated.clone());
                gated
            };
            input.push(read);
        }
        let output: Vec<String> = n.output.iter().map(|o| if o.is_empty() { o.clone() } else { b.fresh(&format!("{COPY_MARK}{o}")) }).collect();
        for (o, c) in n.output.iter().zip(&output) {
            renamed.insert(o.clone(), c.clone());
        }
        let name = b.fresh(&format!("{COPY_MARK}{}", n.name));
        b.nodes.push(NodeProto { name, input, output, ..n.clone() });
    }
    // only the inner tensors are read from copies; gated inputs serve the copies alone
    renamed.retain(|k, _| inner(k));
    Some(Plan { at: first, nodes: b.take(), renamed, readers: readers.clone(), copies })
}

/// An empty int64 tensor computed from gradients the segment's first backward reader consumes
/// (or, when it consumes none, from the last gradient computed before it) and from `after`: it
/// exists only once the backward pass has reached the segment. Gradients are the backward tensors that depend on the
/// loss's gradient `seed`; other backward tensors (a reshaped forward tensor) could run early.
fn backward_reached(b: &mut Builder, ctx: &Context, readers: &[usize], first: usize, after: &[String]) -> Option<String> {
    let (nodes, gradients) = (&ctx.graph.nodes, &ctx.gradients);
    let mut triggers: Vec<&str> = Vec::new();
    for &j in readers {
        for x in &nodes[j].input {
            let before = gradients.contains(x) && ctx.producer.get(x.as_str()).is_some_and(|&p| p < first);
            if before && !triggers.contains(&x.as_str()) {
                triggers.push(x);
            }
        }
    }
    if triggers.is_empty() {
        let last = nodes[..first].iter().rev().find(|n| n.output.iter().any(|o| gradients.contains(o)));
        triggers.extend(last.into_iter().flat_map(|n| n.output.iter().map(String::as_str).filter(|o| gradients.contains(*o))));
    }
    triggers.extend(after.iter().map(String::as_str).filter(|t| !triggers.contains(t)).collect::<Vec<_>>());
    exists_after(b, &triggers, COPY_MARK)
}
