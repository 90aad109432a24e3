//! Which tensors train: the model's parameters (float initializers on a differentiable path to
//! the loss), minus buffers, with tied copies merged into one trained tensor.

use std::collections::HashSet;

use regex::Regex;

use crate::autodiff::analyze;
use crate::graph::{Graph, TensorInfos};
use crate::onnx::{dtype, TensorProto};
use crate::{Error, Result};

/// Names that exporters give to buffers: computed constants that PyTorch does not train.
const BUFFER_PATTERN: &str =
    r"(^|[./_])(inv_freq|rotary_emb|rope|cos_cached|sin_cached|position_ids|causal_mask|masked_bias|bias_mask)([./_]|$)|(^|\.)attn\.bias$";

/// One original initializer a parameter stands for.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct InitializerRef {
    pub name: String,
    pub transposed: bool,
}

#[derive(Clone, Debug)]
pub struct Param {
    /// Graph input name (the first initializer's name).
    pub name: String,
    pub dims: Vec<i64>,
    pub trainable: bool,
    pub beta_head: bool,
    pub initializers: Vec<InitializerRef>,
}

/// How the user narrows or widens the trainable set.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub freeze: Option<Regex>,
    pub train: Option<Regex>,
    /// Train only the beta head.
    pub head_only: bool,
}

/// Finds the model parameters among the initializers. `loss` must be built already; `infos`
/// gives dtypes for the activity analysis.
pub fn find_parameters(graph: &Graph, loss: &str, infos: &TensorInfos, sel: &Selection) -> Result<Vec<Param>> {
    let buffers = Regex::new(BUFFER_PATTERN).expect("valid pattern");
    let candidates: Vec<String> = graph
        .initializers
        .iter()
        .filter(|t| dtype::is_float(t.data_type) && t.dims.iter().product::<i64>() > 1 && !t.dims.is_empty())
        .map(|t| t.name.clone())
        .collect();
    let activity = analyze(graph, &candidates, loss, infos);
    let on_path: Vec<&TensorProto> = graph.initializers.iter().filter(|t| activity.tensors.contains(&t.name) && candidates.contains(&t.name)).collect();
    let mut params = Vec::new();
    let mut merged: HashSet<String> = HashSet::new();
    let (mut train_matched, mut freeze_matched) = (false, false);
    for (i, t) in on_path.iter().enumerate() {
        if merged.contains(&t.name) {
            continue;
        }
        let mut refs = vec![InitializerRef { name: t.name.clone(), transposed: false }];
        for other in &on_path[i + 1..] {
            if merged.contains(&other.name) {
                continue;
            }
            if let Some(transposed) = tied(t, other) {
                refs.push(InitializerRef { name: other.name.clone(), transposed });
                merged.insert(other.name.clone());
            }
        }
        // Prefer the copy whose name reads like a module path over an exporter's temporary name.
        refs.sort_by_key(|r| (r.transposed, looks_generated(&r.name)));
        let primary = refs[0].clone();
        let base_dims = on_path.iter().find(|x| x.name == primary.name).unwrap().dims.clone();
        let refs: Vec<InitializerRef> = refs.into_iter().map(|r| InitializerRef { transposed: r.transposed != primary.transposed, name: r.name }).collect();
        let is_buffer = refs.iter().any(|r| buffers.is_match(&r.name));
        let mut trainable = !is_buffer && !sel.head_only;
        if let Some(f) = &sel.freeze {
            if refs.iter().any(|r| f.is_match(&r.name)) {
                trainable = false;
                freeze_matched = true;
            }
        }
        if let Some(t) = &sel.train {
            let matched = refs.iter().any(|r| t.is_match(&r.name));
            train_matched |= matched;
            trainable = matched && !sel.head_only;
        }
        if is_buffer && !sel.train.as_ref().map(|t| refs.iter().any(|r| t.is_match(&r.name))).unwrap_or(false) {
            continue; // buffers are not parameters at all
        }
        params.push(Param { name: primary.name.clone(), dims: base_dims, trainable, beta_head: false, initializers: refs });
    }
    if params.is_empty() {
        return Err(Error::graph("no float initializer of the model reaches the loss: nothing to train"));
    }
    for (flag, pattern, matched) in [("--train", &sel.train, train_matched), ("--freeze", &sel.freeze, freeze_matched)] {
        if let (Some(p), false) = (pattern, matched) {
            return Err(unmatched(flag, p, &params));
        }
    }
    Ok(params)
}

/// A selection pattern that names none of the model's weights: a typo, not a wish to freeze or
/// train everything.
fn unmatched(flag: &str, pattern: &Regex, params: &[Param]) -> Error {
    let names: Vec<&str> = params.iter().filter(|p| !p.beta_head).map(|p| p.name.as_str()).collect();
    let examples = names.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    Error::BadFlag { flag: flag.into(), detail: format!("{:?} matches none of the model's {} weights (e.g. {examples})", pattern.as_str(), names.len()) }
}

fn looks_generated(name: &str) -> bool {
    name.starts_with("onnx::") || name.starts_with("val_") || name.starts_with('_') || !name.contains('.')
}

/// Whether `b` is an exporter's copy of `a` (`Some(false)`) or of its transpose (`Some(true)`).
/// Tensors holding one repeated value (zero biases, unit norm weights of a fresh model) are equal
/// by coincidence, not tied; and an untransposed duplicate counts only when one of the two names
/// is an exporter's temporary name. Comparisons read the raw little-endian bytes in place and
/// start with a few sampled elements, so most non-copies are rejected in O(1).
fn tied(a: &TensorProto, b: &TensorProto) -> Option<bool> {
    if a.data_type != b.data_type || a.raw_data.len() != b.raw_data.len() || a.raw_data.is_empty() {
        return None;
    }
    let w = dtype::size_of(a.data_type)?;
    let (ra, rb) = (&a.raw_data[..], &b.raw_data[..]);
    fn at(raw: &[u8], w: usize, k: usize) -> &[u8] {
        &raw[k * w..(k + 1) * w]
    }
    let n = ra.len() / w;
    let samples = [0, n / 7, n / 3, n / 2, n - 1];
    let verdict = if a.dims == b.dims && samples.iter().all(|&k| at(ra, w, k) == at(rb, w, k)) && ra == rb {
        (looks_generated(&a.name) || looks_generated(&b.name)).then_some(false)
    } else if a.dims.len() == 2 && b.dims.len() == 2 && a.dims[0] == b.dims[1] && a.dims[1] == b.dims[0] {
        let (r, c) = (a.dims[0] as usize, a.dims[1] as usize);
        let same = |i: usize, j: usize| at(ra, w, i * c + j) == at(rb, w, j * r + i);
        let probes = [(0, 0), (r - 1, c - 1), (r / 2, c / 3), (r / 3, c - 1), (r - 1, 0)];
        (probes.iter().all(|&(i, j)| same(i, j)) && (0..r).all(|i| (0..c).all(|j| same(i, j)))).then_some(true)
    } else {
        None
    };
    // checked last: a constant tensor matches its copies and transposes by coincidence
    verdict.filter(|_| !ra.chunks_exact(w).all(|x| x == &ra[..w]))
}

/// Turns parameters into graph inputs: the primary initializer is removed (it becomes an input of
/// the same name) and tied copies are recomputed from it (`Transpose` or `Identity`).
pub fn lift_parameters(graph: &mut Graph, params: &[Param], only_trainable: bool) {
    let lifted: Vec<&Param> = params.iter().filter(|p| p.trainable || !only_trainable).collect();
    let mut removed: HashSet<String> = HashSet::new();
    let mut ties = Vec::new();
    for p in &lifted {
        let t = graph.initializer(&p.name).cloned();
        let dt = t.as_ref().map(|t| t.data_type).unwrap_or(dtype::FLOAT);
        let dims: Vec<crate::onnx::Dim> = p.dims.iter().map(|&d| crate::onnx::Dim::Fixed(d)).collect();
        removed.insert(p.name.clone());
        if !graph.has_input(&p.name) {
            graph.inputs.push(crate::onnx::value_info(&p.name, dt, &dims));
        }
        for r in &p.initializers[1..] {
            removed.insert(r.name.clone());
            let op = if r.transposed { "Transpose" } else { "Identity" };
            ties.push(crate::onnx::NodeProto {
                name: format!("tie/{}", r.name),
                op_type: op.into(),
                input: vec![p.name.clone()],
                output: vec![r.name.clone()],
                ..Default::default()
            });
        }
    }
    graph.initializers.retain(|t| !removed.contains(&t.name));
    ties.append(&mut graph.nodes);
    graph.nodes = ties;
}

/// Prints the table of parameters people check before a long run.
pub fn describe(params: &[Param]) -> String {
    let mut s = String::new();
    let (mut n_train, mut n_frozen) = (0i64, 0i64);
    s.push_str(&format!("{:<60} {:>16} {:>12}  {}\n", "parameter", "shape", "elements", "status"));
    for p in params {
        let n: i64 = p.dims.iter().product();
        let status = match (p.trainable, p.beta_head) {
            (true, true) => "trainable (beta head)",
            (true, false) => "trainable",
            (false, _) => "frozen",
        };
        let tied = if p.initializers.len() > 1 {
            format!(" (tied: {})", p.initializers[1..].iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "))
        } else {
            String::new()
        };
        s.push_str(&format!("{:<60} {:>16} {:>12}  {status}{tied}\n", p.name, format!("{:?}", p.dims), n));
        if p.trainable {
            n_train += n;
        } else {
            n_frozen += n;
        }
    }
    s.push_str(&format!("trainable elements: {n_train}, frozen: {n_frozen}\n"));
    s
}
