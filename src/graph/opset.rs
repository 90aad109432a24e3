//! Raising an older model's default-domain opset to 16, the first with ScatterND's
//! `reduction="add"`, which the gradient of an embedding lookup (Gather) needs. Hugging Face
//! Optimum exports many decoders at opset 14.
//!
//! Opsets 15 and 16 introduced new ops, widened the types of others and added attributes whose
//! defaults keep the old behaviour (Shape's `start`/`end`, the scatters' `reduction`), with one
//! exception: RoiAlign-16 changed the default `coordinate_transformation_mode`. A graph with a
//! RoiAlign keeps its opset.

use super::Graph;
use crate::onnx::NodeProto;

pub const SCATTER_ADD_OPSET: i64 = 16;

/// Ops whose meaning an older opset's graph would change by being read at opset 16.
const MEANING_CHANGED_BY_16: &[&str] = &["RoiAlign"];

/// Raises the default-domain opset to [`SCATTER_ADD_OPSET`] when it is lower and that changes no
/// op's meaning; returns the opset it had when it was raised.
pub fn raise_to_scatter_add_opset(graph: &mut Graph) -> Option<i64> {
    let old = graph.opset();
    if old >= SCATTER_ADD_OPSET || any_node(&graph.nodes, &|n| is_default_domain(n) && MEANING_CHANGED_BY_16.contains(&n.op_type.as_str())) {
        return None;
    }
    let default = graph.opsets.iter_mut().find(|o| o.domain.is_empty() || o.domain == "ai.onnx")?;
    default.version = SCATTER_ADD_OPSET;
    Some(old)
}

fn is_default_domain(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// Whether any node, in subgraphs (If and Loop bodies) too, satisfies `f`.
fn any_node(nodes: &[NodeProto], f: &dyn Fn(&NodeProto) -> bool) -> bool {
    nodes.iter().any(|n| f(n) || n.attribute.iter().any(|a| a.g.iter().chain(a.graphs.iter()).any(|g| any_node(&g.node, f))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{attr_g, proto::ModelProto, GraphProto, OperatorSetIdProto};

    fn graph_at(opset: i64, ops_in_branch: &[&str]) -> Graph {
        let node = |op: &str| NodeProto { op_type: op.into(), ..Default::default() };
        let branch = GraphProto { node: ops_in_branch.iter().map(|op| node(op)).collect(), ..Default::default() };
        // Well-formed where the model is checked (the main graph's nodes have their inputs and outputs).
        let gather = NodeProto { op_type: "Gather".into(), input: vec!["data".into(), "index".into()], output: vec!["picked".into()], ..Default::default() };
        let mut if_node = NodeProto { op_type: "If".into(), input: vec!["use_cache".into()], output: vec!["branch_out".into()], ..Default::default() };
        if_node.attribute.push(attr_g("else_branch", branch));
        let model = ModelProto {
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }, OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 }],
            graph: Some(GraphProto { node: vec![gather, if_node], ..Default::default() }),
            ..Default::default()
        };
        Graph::from_model(model).unwrap()
    }

    #[test]
    fn opset_14_becomes_16_and_other_domains_stay() {
        let mut g = graph_at(14, &["Shape", "ScatterElements"]);
        assert_eq!(raise_to_scatter_add_opset(&mut g), Some(14));
        assert_eq!(g.opset(), 16);
        assert_eq!(g.opsets[1].version, 1);
    }

    #[test]
    fn newer_opsets_and_a_roialign_anywhere_are_left_alone() {
        let mut g = graph_at(18, &[]);
        assert_eq!(raise_to_scatter_add_opset(&mut g), None);
        assert_eq!(g.opset(), 18);
        let mut g = graph_at(14, &["RoiAlign"]);
        assert_eq!(raise_to_scatter_add_opset(&mut g), None);
        assert_eq!(g.opset(), 14);
    }
}
