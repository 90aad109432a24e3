//! Making an exported model packable: its attention mask and its token positions become graph
//! inputs, so several sequences (and a pair's shared prompt) can share one row.
//!
//! Exporters (torch.onnx TorchScript and dynamo, transformers' unified masking) compute one additive
//! mask `[batch, 1, query, key]` from `attention_mask` and add it to every layer's attention scores
//! right before the Softmax; positions come from a `Range(0, sequence)` that is unsqueezed into a
//! broadcastable `[1, sequence, ...]`. Both are replaced: the shared mask by the input
//! [`ATTENTION_BIAS`], the broadcast positions by per-row [`POSITIONS`] (or the model's own
//! `position_ids` input when it has one). Anything else is refused with the reason, so a model this
//! does not understand never trains on a silently wrong mask.

use std::collections::HashSet;

use crate::dpo::model::LmSignature;
use crate::graph::{Builder, Graph};
use crate::onnx::{attr_i, dtype, tensor_i64, tensor_to_i64, value_info, Dim};
use crate::runtime::{run, HostTensor, SessionConfig};
use crate::{Error, Result};

/// `[rows, 1, sequence, sequence]` float: 0 where a query may attend to a key, the lowest float
/// where it may not.
pub const ATTENTION_BIAS: &str = "packed_attention_bias";
/// `[rows, sequence]` int64: each token's position within its own sequence.
pub const POSITIONS: &str = "packed_positions";

fn packing_error(detail: impl std::fmt::Display) -> Error {
    Error::NotPackable(detail.to_string())
}

/// Rewrites the model so that masking and positions are inputs. Returns whether positions come
/// from [`POSITIONS`] (`false`: from the model's `position_ids` input).
pub fn make_packable(graph: &mut Graph, sig: &LmSignature) -> Result<bool> {
    let mask = shared_attention_mask(graph)?;
    verify_plain_causal(graph, &mask)?;
    let mask_dtype = float_type_of_mask(graph, &mask);
    let mut names = graph.names.clone();
    let mut b = Builder::new(&mut names, "packing/");
    let bias = if mask_dtype == dtype::FLOAT {
        ATTENTION_BIAS.to_string()
    } else {
        b.op("Cast", &[ATTENTION_BIAS], vec![attr_i("to", mask_dtype as i64)], "packing/attention_bias")
    };
    rename_uses(graph, &mask, &bias);
    graph.nodes.extend(b.take());
    graph.inputs.push(value_info(
        ATTENTION_BIAS,
        dtype::FLOAT,
        &[Dim::Sym("rows".into()), Dim::Fixed(1), Dim::Sym("sequence".into()), Dim::Sym("sequence".into())],
    ));
    graph.prune();
    graph.sort_topologically()?;
    if sig.position_ids.is_some() {
        graph.names = names;
        return Ok(false);
    }
    let rewritten = broadcast_positions_to_rows(graph, &mut names)?;
    graph.names = names;
    if rewritten == 0 {
        return Err(packing_error("no position computation (Range) was found and the model has no position_ids input"));
    }
    graph.inputs.push(value_info(POSITIONS, dtype::INT64, &[Dim::Sym("rows".into()), Dim::Sym("sequence".into())]));
    graph.prune();
    graph.sort_topologically()?;
    Ok(true)
}

/// The one tensor every attention layer adds to its scores before the Softmax.
fn shared_attention_mask(graph: &Graph) -> Result<String> {
    let producers = graph.producers();
    let softmaxes: Vec<_> = graph.nodes.iter().filter(|n| n.op_type == "Softmax").collect();
    if softmaxes.is_empty() {
        return Err(packing_error("it has no Softmax (attention may be a fused op)"));
    }
    let mut common: Option<HashSet<String>> = None;
    for s in &softmaxes {
        let add = producers.get(s.input[0].as_str()).map(|&i| &graph.nodes[i]).filter(|n| n.op_type == "Add");
        let Some(add) = add else {
            return Err(packing_error(format!("Softmax {} does not read scores plus a mask (no Add before it)", s.name)));
        };
        let here: HashSet<String> = add.input.iter().cloned().collect();
        common = Some(match common {
            None => here,
            Some(c) => c.intersection(&here).cloned().collect(),
        });
    }
    let common = common.unwrap_or_default();
    match common.len() {
        1 => Ok(common.into_iter().next().unwrap()),
        0 => Err(packing_error("its attention layers do not share one additive mask")),
        _ => Err(packing_error("several tensors are shared by every attention layer's Add")),
    }
}

/// Sequences up to this many tokens are checked to see a plain causal mask; longer ones cannot be
/// packed (a sliding window, say, could start beyond it).
pub const VERIFIED_SEQUENCE_TOKENS: usize = 2048;

/// Runs the model's own mask computation on one unpadded sequence of [`VERIFIED_SEQUENCE_TOKENS`]
/// tokens and checks it is exactly causal: 0 on and below the diagonal, effectively minus infinity
/// above. Sliding windows, prefix-LM masks or anything else the block mask would silently replace
/// are refused here.
fn verify_plain_causal(graph: &Graph, mask: &str) -> Result<()> {
    let mut g = graph.clone();
    let mut names = g.names.clone();
    let mut b = Builder::new(&mut names, "packing/");
    let as_float = b.op("Cast", &[mask], vec![attr_i("to", dtype::FLOAT as i64)], "packing/mask_as_float");
    g.nodes.extend(b.take());
    g.outputs = vec![value_info(&as_float, dtype::FLOAT, &[Dim::Sym("a".into()), Dim::Sym("b".into()), Dim::Sym("q".into()), Dim::Sym("k".into())])];
    g.value_info.clear();
    g.prune();
    let read: HashSet<&str> = g.nodes.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    g.inputs.retain(|i| read.contains(i.name.as_str()));
    let n = VERIFIED_SEQUENCE_TOKENS;
    let mut feeds = Vec::new();
    for i in &g.inputs {
        let values: Vec<i64> = match i.name.as_str() {
            "attention_mask" => vec![1; n],
            "position_ids" => (0..n as i64).collect(),
            _ => vec![0; n],
        };
        feeds.push((i.name.clone(), HostTensor::i64(&[1, n], values)?));
    }
    let bytes = prost::Message::encode_to_vec(&g.into_model());
    let mut session = SessionConfig { intra_threads: Some(1), ..Default::default() }.session_from_bytes(&bytes)?;
    let refs: Vec<(&str, HostTensor)> = feeds.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let out = run(&mut session, &refs).map_err(|e| packing_error(format!("its attention mask could not be computed on its own ({e})")))?;
    let values = out.into_iter().next().and_then(|(_, t)| t.as_f32().cloned()).ok_or_else(|| packing_error("its attention mask is not a float tensor"))?;
    let shape = values.shape().to_vec();
    if shape.len() != 4 || shape[2] != n || shape[3] != n {
        return Err(packing_error(format!("its attention mask has shape {shape:?} for one sequence of {n} tokens, not [1, 1, {n}, {n}]")));
    }
    for q in 0..n {
        for k in 0..n {
            let v = values[[0, 0, q, k]];
            let ok = if k <= q { v == 0.0 } else { v < -1e30 };
            if !ok {
                let what = if k <= q { "may not attend to" } else { "may attend to" };
                return Err(packing_error(format!(
                    "its attention mask is not plain causal: token {q} {what} token {k} (a sliding window or another mask the packed layout would replace)"
                )));
            }
        }
    }
    Ok(())
}

/// The mask's element type, read from the constants it selects between (float32 when unknown).
fn float_type_of_mask(graph: &Graph, mask: &str) -> i32 {
    let producers = graph.producers();
    let Some(&i) = producers.get(mask) else { return dtype::FLOAT };
    let n = &graph.nodes[i];
    n.input.iter().filter_map(|x| graph.initializer(x).map(|t| t.data_type)).find(|&t| dtype::is_float(t)).unwrap_or(dtype::FLOAT)
}

fn rename_uses(graph: &mut Graph, from: &str, to: &str) {
    for n in &mut graph.nodes {
        for x in n.input.iter_mut().filter(|x| *x == from) {
            *x = to.to_string();
        }
    }
}

/// `Unsqueeze(Range(0, S), axes ∋ 0)` is a position vector broadcast over the batch; it becomes
/// `Unsqueeze(positions[rows, S], axes ∖ {0})`, the same rank with the batch axis filled in.
fn broadcast_positions_to_rows(graph: &mut Graph, names: &mut crate::graph::Names) -> Result<usize> {
    let consts = graph.constants();
    let consumers = graph.consumers();
    let mut rewrites: Vec<(usize, Vec<i64>)> = Vec::new();
    for n in graph.nodes.iter().filter(|n| n.op_type == "Range") {
        let uses = consumers.get(n.output[0].as_str()).cloned().unwrap_or_default();
        for u in uses {
            let c = &graph.nodes[u];
            let axes = (c.op_type == "Unsqueeze").then(|| c.input.get(1).and_then(|a| tensor_to_i64(consts.get(a)?).ok())).flatten();
            let Some(axes) = axes else {
                return Err(packing_error(format!(
                    "its positions Range {} is read by {} ({}), not by an Unsqueeze over the batch axis",
                    n.name, c.name, c.op_type
                )));
            };
            let rank = 1 + axes.len() as i64;
            let axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + rank } else { a }).collect();
            if !axes.contains(&0) {
                return Err(packing_error(format!("Unsqueeze {} of positions Range {} adds no batch axis", c.name, n.name)));
            }
            rewrites.push((u, axes.into_iter().filter(|&a| a != 0).collect()));
        }
    }
    let count = rewrites.len();
    for (u, axes) in rewrites {
        let node = &mut graph.nodes[u];
        node.input[0] = POSITIONS.to_string();
        if axes.is_empty() {
            node.op_type = "Identity".into();
            node.input.truncate(1);
        } else {
            let name = names.fresh("packing/position_axes");
            graph.initializers.push(tensor_i64(&name, &[axes.len() as i64], &axes));
            graph.nodes[u].input[1] = name;
        }
    }
    Ok(count)
}
