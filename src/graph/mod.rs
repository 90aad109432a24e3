//! An editable view of an ONNX graph: nodes, initializers, declared inputs/outputs, and a name
//! table so that every tensor this crate adds gets a fresh, readable name.

mod attention_chunks;
mod blocks;
mod builder;
mod cast_per_use;
mod check;
pub mod dependency;
mod gradient_order;
mod mixed_precision;
mod names;
mod opset;
mod precision;
mod probe;
mod probe_stand_ins;
mod recompute;
mod tensor_info;

pub use attention_chunks::{chunk_attention, find_attentions, Attention};
pub use blocks::{decoder_blocks, layer_index};
pub use builder::Builder;
pub use cast_per_use::cast_per_use;
pub use gradient_order::{tie_weight_gradients, Ordered};
pub use mixed_precision::{drop_exact_round_trips, products_in_half, MixedPrecision, Precision};
pub use names::Names;
pub use opset::{raise_to_scatter_add_opset, SCATTER_ADD_OPSET};
pub use precision::{compute_in_float32, is_deferred, materialize_deferred, store_frozen, stored_name, stored_names, HalfOrigin, StoredWeights};
pub use probe::{filled_weights, probe_shapes, probe_shapes_with, ProbeBatch, ProbeWeights};
pub use recompute::{recompute, Recomputed};
pub use tensor_info::{TensorInfo, TensorInfos};

use std::collections::HashMap;

use crate::onnx::{
    proto::{ModelProto, OperatorSetIdProto},
    GraphProto, NodeAttrs, NodeProto, TensorProto, ValueInfoProto,
};
use crate::{Error, Result};

/// The `producer_name` of every model betadpo writes.
pub const PRODUCER: &str = "betadpo";

/// The ops this crate emits and the models it reads live in the default domain at this opset or above.
pub const MIN_OPSET: i64 = 13;

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    pub value_info: Vec<ValueInfoProto>,
    pub opsets: Vec<OperatorSetIdProto>,
    pub ir_version: i64,
    pub producer_name: String,
    pub names: Names,
}

impl Graph {
    /// The graph of a model; its nodes are checked first (see [`check::check_nodes`]), so code
    /// that walks the graph may index the inputs and outputs the spec gives each op.
    pub fn from_model(model: ModelProto) -> Result<Self> {
        let g = model.graph.ok_or_else(|| Error::graph("the model has no graph"))?;
        check::check_nodes(&g.node)?;
        let mut graph = Graph {
            name: g.name,
            nodes: g.node,
            initializers: g.initializer,
            inputs: g.input,
            outputs: g.output,
            value_info: g.value_info,
            opsets: model.opset_import,
            ir_version: model.ir_version,
            producer_name: model.producer_name,
            names: Names::default(),
        };
        graph.names = Names::from_graph(&graph);
        let opset = graph.opset();
        if opset < MIN_OPSET {
            return Err(Error::graph(format!("the model uses opset {opset}; betadpo needs opset {MIN_OPSET} or newer (re-export with a newer opset)")));
        }
        Ok(graph)
    }

    pub fn into_model(self) -> ModelProto {
        ModelProto {
            ir_version: self.ir_version.max(8),
            opset_import: self.opsets,
            producer_name: PRODUCER.into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(GraphProto {
                name: self.name,
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                value_info: self.value_info,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The default-domain opset version.
    pub fn opset(&self) -> i64 {
        self.opsets.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(0)
    }

    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.initializers.iter().find(|t| t.name == name)
    }

    pub fn initializer_index(&self) -> HashMap<String, usize> {
        self.initializers.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect()
    }

    /// tensor name -> index of the node that produces it.
    /// Small constant tensors by name (see [`constant_tensors`]).
    pub fn constants(&self) -> HashMap<String, TensorProto> {
        constant_tensors(&self.nodes, &self.initializers)
    }

    pub fn producers(&self) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &n.output {
                if !o.is_empty() {
                    m.insert(o.as_str(), i);
                }
            }
        }
        m
    }

    /// tensor name -> indices of the nodes that read it.
    pub fn consumers(&self) -> HashMap<&str, Vec<usize>> {
        let mut m: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for x in &n.input {
                if !x.is_empty() {
                    m.entry(x.as_str()).or_default().push(i);
                }
            }
        }
        m
    }

    pub fn has_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|i| i.name == name)
    }

    /// Removes nodes whose outputs reach no graph output, and initializers no node reads.
    pub fn prune(&mut self) {
        let roots = self.outputs.iter().map(|o| o.name.clone()).collect();
        let (keep, live) = live_nodes(&self.nodes, roots);
        let mut k = keep.into_iter();
        self.nodes.retain(|_| k.next().unwrap());
        self.initializers.retain(|t| live.contains(&t.name));
        self.value_info.retain(|v| live.contains(&v.name));
    }

    /// Nodes in an order where each node's inputs are produced before it; errors on cycles.
    pub fn sort_topologically(&mut self) -> Result<()> {
        let mut available: std::collections::HashSet<String> = self.inputs.iter().map(|i| i.name.clone()).collect();
        available.extend(self.initializers.iter().map(|t| t.name.clone()));
        available.insert(String::new());
        let mut pending: Vec<NodeProto> = std::mem::take(&mut self.nodes);
        let mut sorted = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for n in pending {
                if n.input.iter().all(|x| available.contains(x)) {
                    available.extend(n.output.iter().cloned());
                    sorted.push(n);
                } else {
                    rest.push(n);
                }
            }
            if rest.len() == before {
                let n = &rest[0];
                let missing: Vec<&String> = n.input.iter().filter(|x| !available.contains(*x)).collect();
                return Err(Error::node(&n.name, &n.op_type, format!("inputs {missing:?} are never produced")));
            }
            pending = rest;
        }
        self.nodes = sorted;
        Ok(())
    }
}

/// Which of `nodes` (in topological order) contribute to a tensor in `roots`, and every tensor
/// those nodes read (with the roots).
pub fn live_nodes(nodes: &[NodeProto], roots: std::collections::HashSet<String>) -> (Vec<bool>, std::collections::HashSet<String>) {
    let mut live = roots;
    let mut keep = vec![false; nodes.len()];
    for (i, n) in nodes.iter().enumerate().rev() {
        if n.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
        }
    }
    (keep, live)
}

/// Constant tensors by name: `initializers` (float ones only up to 16 elements, so no weight is
/// copied) and the `value` of every `Constant` node among `nodes`.
pub fn constant_tensors(nodes: &[NodeProto], initializers: &[TensorProto]) -> HashMap<String, TensorProto> {
    let mut m = HashMap::new();
    for t in initializers {
        if !crate::onnx::dtype::is_float(t.data_type) || t.dims.iter().product::<i64>() <= 16 {
            m.insert(t.name.clone(), t.clone());
        }
    }
    for n in nodes.iter().filter(|n| n.op_type == "Constant") {
        if let Some(t) = n.tensor_attr("value") {
            m.insert(n.output[0].clone(), t.clone());
        }
    }
    m
}
