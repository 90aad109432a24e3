//! Which execution provider runs which node of a session, as ONNX Runtime recorded it (API 24's
//! `Session_GetEpGraphAssignmentInfo`, recorded only when the session was built with [`RECORD_KEY`]). On
//! TensorRT it tells which nodes TensorRT did not take and the CUDA provider runs instead.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};

use ort::session::Session;
use ort::AsPointer as _;

use crate::{Error, Result};

/// Session configuration key that makes ONNX Runtime record the assignment.
pub const RECORD_KEY: &str = "session.record_ep_graph_assignment_info";

/// The nodes one provider runs: (operator type, node name) each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub provider: String,
    pub nodes: Vec<(String, String)>,
}

/// The providers' node sets of `session`, merged per provider, in ONNX Runtime's order.
pub fn node_placement(session: &Session) -> Result<Vec<Assigned>> {
    let api = ort::api();
    let mut subgraphs: *const *const ort::sys::OrtEpAssignedSubgraph = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: a live session; ONNX Runtime owns the returned arrays and strings for the session's lifetime.
    check(unsafe { (api.Session_GetEpGraphAssignmentInfo)(session.ptr(), &mut subgraphs, &mut count) })?;
    let mut out: Vec<Assigned> = Vec::new();
    for i in 0..count {
        let sub = unsafe { *subgraphs.add(i) };
        let mut name: *const c_char = std::ptr::null();
        check(unsafe { (api.EpAssignedSubgraph_GetEpName)(sub, &mut name) })?;
        let provider = text(name);
        let mut nodes: *const *const ort::sys::OrtEpAssignedNode = std::ptr::null();
        let mut n = 0usize;
        check(unsafe { (api.EpAssignedSubgraph_GetNodes)(sub, &mut nodes, &mut n) })?;
        let mut list = Vec::with_capacity(n);
        for j in 0..n {
            let node = unsafe { *nodes.add(j) };
            let (mut op, mut node_name): (*const c_char, *const c_char) = (std::ptr::null(), std::ptr::null());
            check(unsafe { (api.EpAssignedNode_GetOperatorType)(node, &mut op) })?;
            check(unsafe { (api.EpAssignedNode_GetName)(node, &mut node_name) })?;
            list.push((text(op), text(node_name)));
        }
        match out.iter_mut().find(|a| a.provider == provider) {
            Some(a) => a.nodes.extend(list),
            None => out.push(Assigned { provider, nodes: list }),
        }
    }
    Ok(out)
}

/// One line saying how many nodes `primary` took and which operators the other providers run, e.g.
/// `TensorrtExecutionProvider runs 120 of 134 nodes; CUDAExecutionProvider runs 14: 10 Gather, 4 ScatterND`.
/// None when the primary provider runs everything.
pub fn fallback_summary(placement: &[Assigned], primary: &str) -> Option<String> {
    let total: usize = placement.iter().map(|a| a.nodes.len()).sum();
    let taken = placement.iter().filter(|a| a.provider == primary).map(|a| a.nodes.len()).sum::<usize>();
    if taken == total {
        return None;
    }
    let others: Vec<String> = placement
        .iter()
        .filter(|a| a.provider != primary && !a.nodes.is_empty())
        .map(|a| {
            let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
            for (op, _) in &a.nodes {
                *ops.entry(op.as_str()).or_default() += 1;
            }
            let mut ops: Vec<(&str, usize)> = ops.into_iter().collect();
            ops.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(y.0)));
            let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{n} {op}")).collect();
            format!("{} runs {}: {}", a.provider, a.nodes.len(), ops.join(", "))
        })
        .collect();
    Some(format!("{primary} runs {taken} of {total} nodes; {}", others.join("; ")))
}

fn check(status: ort::sys::OrtStatusPtr) -> Result<()> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status carries a message until released.
    let msg = text(unsafe { (api.GetErrorMessage)(status.0) });
    unsafe { (api.ReleaseStatus)(status.0) };
    Err(Error::Runtime(format!("reading the node placement: {msg}")))
}

fn text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: ONNX Runtime returns NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
