//! The backward pass: reverse traversal of the active nodes, gradient accumulation, and the
//! parameter gradients as named outputs (`<param>_grad`).

use std::collections::HashMap;

use super::activity::analyze;
use super::context::RuleCtx;
use super::fold::fold;
use super::rules::rule_for;
use crate::graph::{Builder, Graph, TensorInfos};
use crate::onnx::{attr_t, dtype, NodeProto};
use crate::{Error, Result};

/// Names of the gradient tensors, one per parameter, in parameter order.
#[derive(Debug, Clone)]
pub struct Gradients {
    pub by_param: Vec<(String, String)>,
    pub nodes_added: usize,
    /// The loss's own gradient, where the backward pass starts: every backward tensor that
    /// depends on it exists only once the backward pass has run that far.
    pub seed: String,
}

/// Appends to `graph` the nodes computing d`loss`/d`param` for each parameter (graph inputs or
/// initializers). The graph must be topologically sorted. Nothing is changed on error.
pub fn differentiate(graph: &mut Graph, loss: &str, params: &[String], infos: &TensorInfos) -> Result<Gradients> {
    let activity = analyze(graph, params, loss, infos);
    let missing: Vec<String> = activity
        .nodes
        .iter()
        .map(|&i| &graph.nodes[i])
        .filter(|n| rule_for(&n.op_type).is_none())
        .map(|n| format!("{} ({})", n.op_type, if n.name.is_empty() { &n.output[0] } else { &n.name }))
        .collect();
    if !missing.is_empty() {
        return Err(Error::UnsupportedOps { count: missing.len(), list: missing.join(", ") });
    }
    if !activity.tensors.contains(loss) {
        return Err(Error::graph(format!("the loss {loss} does not depend on any trainable parameter")));
    }
    let consts = graph.constants();
    let opset = graph.opset();
    let mut names = graph.names.clone();
    for p in params {
        names.reserve(&format!("{p}_grad"));
    }
    let mut contribs: HashMap<String, Vec<String>> = HashMap::new();
    let mut emitted: Vec<NodeProto> = Vec::new();

    let loss_type = infos.get(loss).map(|i| i.dtype).unwrap_or(dtype::FLOAT);
    let mut seed = Builder::new(&mut names, "grad/");
    let one = seed.scalar(1.0, loss_type);
    let loss_rank = infos.get(loss).map(|i| i.rank()).unwrap_or(0);
    let seed_grad = if loss_rank == 0 {
        one
    } else {
        let s = seed.op("Shape", &[loss], vec![], "loss_shape");
        seed.op("Expand", &[&one, &s], vec![], &format!("{loss}_grad"))
    };
    emitted.extend(seed.take());
    contribs.insert(loss.to_string(), vec![seed_grad.clone()]);

    for &idx in activity.nodes.iter().rev() {
        let node = &graph.nodes[idx];
        let mut grads_out = Vec::with_capacity(node.output.len());
        for o in &node.output {
            let g = accumulate(&mut names, &mut contribs, o, None, &mut emitted);
            grads_out.push(g);
        }
        if grads_out.iter().all(Option::is_none) {
            continue;
        }
        let active_in: Vec<bool> = node.input.iter().map(|x| activity.tensors.contains(x)).collect();
        let rule = rule_for(&node.op_type).expect("checked above");
        let mut ctx = RuleCtx::new(node, &mut names, opset, infos, &consts, grads_out, active_in);
        rule(&mut ctx).map_err(|e| match e {
            Error::Node { .. } => e,
            other => Error::node(&node.name, &node.op_type, other.to_string()),
        })?;
        let grads_in = std::mem::take(&mut ctx.grads_in);
        emitted.extend(ctx.b.take());
        for (k, gs) in grads_in.into_iter().enumerate() {
            if !gs.is_empty() {
                contribs.entry(node.input[k].clone()).or_default().extend(gs);
            }
        }
    }

    let mut by_param = Vec::with_capacity(params.len());
    for p in params {
        let out = format!("{p}_grad");
        match accumulate(&mut names, &mut contribs, p, Some(&out), &mut emitted) {
            Some(_) => {}
            None => {
                // A trainable tensor the loss does not reach: its gradient is zero.
                let mut b = Builder::new(&mut names, "grad/");
                let shape = b.op("Shape", &[p], vec![], &format!("{p}_shape"));
                let t = infos.get(p).map(|i| i.dtype).unwrap_or(dtype::FLOAT);
                let zero = crate::onnx::zero_value(t);
                b.op_into("ConstantOfShape", &[&shape], &[&out], vec![attr_t("value", zero)]);
                emitted.extend(b.take());
            }
        }
        by_param.push((p.clone(), out));
    }
    let roots = by_param.iter().map(|(_, g)| g.clone()).collect();
    let emitted = fold(emitted, &roots, &mut names, infos);
    let nodes_added = emitted.len();
    graph.nodes.extend(emitted);
    graph.names = names;
    Ok(Gradients { by_param, nodes_added, seed: seed_grad })
}

/// Gradient of `tensor` from all its contributions: none, the single one, or their `Sum`.
/// With `into`, the result is written to that exact name.
fn accumulate(
    names: &mut crate::graph::Names,
    contribs: &mut HashMap<String, Vec<String>>,
    tensor: &str,
    into: Option<&str>,
    emitted: &mut Vec<NodeProto>,
) -> Option<String> {
    let parts = contribs.remove(tensor)?;
    let mut b = Builder::new(names, "grad/");
    let result = match (parts.len(), into) {
        (1, None) => parts.into_iter().next().unwrap(),
        (_, into) => {
            let out = match into {
                Some(n) => n.to_string(),
                None => b.fresh(&format!("{tensor}_grad")),
            };
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let op = if parts.len() == 1 { "Identity" } else { "Sum" };
            b.op_into(op, &refs, &[&out], vec![]);
            out
        }
    };
    emitted.extend(b.take());
    Some(result)
}
