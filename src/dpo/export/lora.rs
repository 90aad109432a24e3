//! Deploying trained LoRA adapters the ways the ecosystem does:
//!
//! - **merged** (`export --merge`): `W += s·(A·B)` folded into each base weight (in the weight's
//!   own dtype and orientation) and the adapter nodes removed: one plain ONNX model;
//! - **ONNX Runtime adapter** (`export --adapter FILE`): the model with every `A`/`B` left as an
//!   input whose default leaves the base model unchanged (`B` = 0), and ONNX Runtime's own adapter
//!   file holding the trained values, made active per run (`RunOptions.add_active_adapter`);
//! - **PEFT** (`export --hf DIR` on LoRA artifacts): see `export::hf::peft`.

use std::collections::HashMap;

use half::{bf16, f16};
use ndarray::Array2;

use crate::dpo::model::lora::{AdapterSpec, LoraSpec};
use crate::graph::Graph;
use crate::onnx::{dtype, tensor_to_f32, TensorProto};
use crate::store::NamedTensor;
use crate::{Error, Result};

/// One adapter with its trained factors.
pub struct TrainedAdapter<'a> {
    pub spec: &'a AdapterSpec,
    /// `[in, r]`
    pub a: Array2<f32>,
    /// `[r, out]`
    pub b: Array2<f32>,
}

impl TrainedAdapter<'_> {
    /// `s·(A·B)`, `[in, out]`: what the adapter adds to the product's weight.
    pub fn delta(&self, scale: f32) -> Array2<f32> {
        self.a.dot(&self.b) * scale
    }
}

/// The adapters' trained values from a parameters file's tensors.
pub fn trained_adapters<'a>(spec: &'a LoraSpec, tensors: &[NamedTensor]) -> Result<Vec<TrainedAdapter<'a>>> {
    let get = |name: &str, rows: i64, cols: i64| -> Result<Array2<f32>> {
        let t =
            tensors.iter().find(|t| t.name == name).ok_or_else(|| Error::ParameterMismatch(format!("LoRA parameter {name} is missing from the parameters")))?;
        if t.shape != [rows as usize, cols as usize] {
            return Err(Error::ParameterMismatch(format!("LoRA parameter {name} has shape {:?}, the artifacts expect [{rows}, {cols}]", t.shape)));
        }
        Ok(Array2::from_shape_vec((rows as usize, cols as usize), t.data.clone()).expect("shape checked"))
    };
    let r = spec.rank as i64;
    spec.adapters.iter().map(|s| Ok(TrainedAdapter { spec: s, a: get(&s.a, s.in_features, r)?, b: get(&s.b, r, s.out_features)? })).collect()
}

/// The scale every adapter's product is multiplied by.
pub fn scale(spec: &LoraSpec) -> f32 {
    (spec.alpha / spec.rank as f64) as f32
}

/// Folds the adapters into their base weights and removes the adapter nodes, `A` and `B`: the
/// graph computes what it computed with the adapters, as a plain model.
pub fn merge_adapters(g: &mut Graph, spec: &LoraSpec, adapters: &[TrainedAdapter]) -> Result<()> {
    for ad in adapters {
        // stored under a half-precision name when its dtype was kept or chosen (`graph::store_frozen`)
        let names = crate::graph::stored_names(&ad.spec.base_weight);
        let idx = g.initializers.iter().position(|t| names.contains(&t.name));
        let w = idx.map(|i| &mut g.initializers[i]).ok_or_else(|| Error::graph(format!("LoRA base weight {} is not in the graph", ad.spec.base_weight)))?;
        let delta = ad.delta(scale(spec));
        let delta = if ad.spec.weight_out_in { delta.reversed_axes().as_standard_layout().into_owned() } else { delta };
        add_in_place(w, delta.as_slice().expect("standard layout"))?;
    }
    strip_adapters(g, spec)
}

/// `w += delta` (same element order), rounded once into `w`'s own dtype.
fn add_in_place(w: &mut TensorProto, delta: &[f32]) -> Result<()> {
    let values = tensor_to_f32(w)?;
    if values.len() != delta.len() {
        return Err(Error::graph(format!("LoRA base weight {} has {} elements, its adapter {}", w.name, values.len(), delta.len())));
    }
    let sum = values.iter().zip(delta).map(|(v, d)| v + d);
    let raw: Vec<u8> = match w.data_type {
        dtype::FLOAT => sum.flat_map(f32::to_le_bytes).collect(),
        dtype::FLOAT16 => sum.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
        dtype::BFLOAT16 => sum.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
        other => {
            return Err(Error::graph(format!("LoRA base weight {} has dtype {}; merging supports float32, float16 and bfloat16", w.name, dtype::name(other))))
        }
    };
    *w = TensorProto { name: w.name.clone(), dims: w.dims.clone(), data_type: w.data_type, raw_data: raw.into(), ..Default::default() };
    Ok(())
}

/// Removes the adapter branches: each `Add(y_base, delta)` the adapter phase inserted (found by
/// following `B` forward through its `MatMul`, scale and cast) is replaced by its base product
/// writing `y` again, and the branch feeding `delta` is pruned.
fn strip_adapters(g: &mut Graph, spec: &LoraSpec) -> Result<()> {
    let factors: Vec<&str> = spec.adapters.iter().flat_map(|a| [a.a.as_str(), a.b.as_str()]).collect();
    let consumers: HashMap<String, Vec<usize>> = g.consumers().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let mut rename: HashMap<String, String> = HashMap::new();
    let mut joins: Vec<usize> = Vec::new();
    for ad in &spec.adapters {
        for &start in consumers.get(ad.b.as_str()).map(Vec::as_slice).unwrap_or_default() {
            let join = follow_to_join(g, &consumers, start).ok_or_else(|| {
                Error::node(&g.nodes[start].name, &g.nodes[start].op_type, format!("cannot find where the adapter {} joins its base product", ad.b))
            })?;
            let (n, delta) = (&g.nodes[join.0], join.1);
            let base = n.input.iter().find(|x| **x != delta).cloned().expect("an Add has two inputs");
            rename.insert(base, n.output[0].clone());
            joins.push(join.0);
        }
    }
    let mut i = 0;
    g.nodes.retain(|_| {
        i += 1;
        !joins.contains(&(i - 1))
    });
    for n in &mut g.nodes {
        for o in &mut n.output {
            if let Some(y) = rename.get(o.as_str()) {
                *o = y.clone();
            }
        }
    }
    g.inputs.retain(|i| !factors.contains(&i.name.as_str()));
    g.initializers.retain(|t| !factors.contains(&t.name.as_str()));
    g.prune();
    if let Some(n) = g.nodes.iter().find(|n| n.input.iter().any(|x| factors.contains(&x.as_str()))) {
        return Err(Error::node(&n.name, &n.op_type, "still reads a LoRA factor after merging"));
    }
    Ok(())
}

/// From the `MatMul` reading `B`, the chain `MatMul -> Mul (scale) [-> Cast] -> Add`: the Add's
/// index and the delta tensor it adds.
fn follow_to_join(g: &Graph, consumers: &HashMap<String, Vec<usize>>, start: usize) -> Option<(usize, String)> {
    let mut at = start;
    for _ in 0..4 {
        let out = g.nodes[at].output.first()?;
        let next = match consumers.get(out.as_str()).map(Vec::as_slice) {
            Some([one]) => *one,
            _ => return None,
        };
        match g.nodes[next].op_type.as_str() {
            "Add" => return Some((next, out.clone())),
            "Mul" | "Cast" => at = next,
            _ => return None,
        }
    }
    None
}
