//! Precision phases: betadpo computes in float32, while frozen weights may be stored at half precision.
//!
//! - [`compute_in_float32`] turns a float16/bfloat16 export into a float32 graph (initializers, constants,
//!   casts and declared types), remembering each half initializer's original bytes. ONNX Runtime's CPU
//!   provider has no half-precision matrix products, and parameters, gradients and AdamW moments are float32.
//! - [`store_frozen`] runs last, on every graph of the artifacts: each frozen float weight is stored in the
//!   chosen dtype and cast back to float32 where it is read (`Cast` after the half weight), so a half
//!   export keeps its half weights, and a float32 one may halve its frozen weights' bytes on disk and in
//!   memory. A weight stored in the dtype it came in is the model's own bytes (and stays in the model's data
//!   file, see `onnx::save_models_sharing_data`).

use std::collections::{HashMap, HashSet};

use prost::bytes::Bytes;

use super::Graph;
use crate::onnx::proto::type_proto;
use crate::onnx::{attr_i, dtype, tensor_to_f32, DType, NodeProto, TensorProto};
use crate::{Error, Result};

/// The half-precision initializers a graph was exported with, by name, as loaded, each with the address of
/// the float32 copy that replaced it (a later phase that changes the weight makes a new copy).
#[derive(Clone, Debug, Default)]
pub struct HalfOrigin {
    original: HashMap<String, (TensorProto, usize)>,
}

impl HalfOrigin {
    /// The original of `t`, when `t` is still the float32 copy of a half initializer.
    fn of(&self, t: &TensorProto) -> Option<&TensorProto> {
        self.original.get(&t.name).filter(|(_, at)| *at == t.raw_data.as_ptr() as usize).map(|(o, _)| o)
    }
}

fn is_half(t: DType) -> bool {
    t == dtype::FLOAT16 || t == dtype::BFLOAT16
}

fn to_f32_tensor(t: &TensorProto) -> Result<TensorProto> {
    let values = tensor_to_f32(t)?;
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(TensorProto { name: t.name.clone(), dims: t.dims.clone(), data_type: dtype::FLOAT, raw_data: raw.into(), ..Default::default() })
}

/// Rewrites a half-precision graph to compute in float32. Returns the original half initializers.
pub fn compute_in_float32(graph: &mut Graph) -> Result<HalfOrigin> {
    let mut origin = HalfOrigin::default();
    for t in graph.initializers.iter_mut().filter(|t| is_half(t.data_type)) {
        let f = to_f32_tensor(t)?;
        let at = f.raw_data.as_ptr() as usize;
        origin.original.insert(t.name.clone(), (std::mem::replace(t, f), at));
    }
    for node in graph.nodes.iter_mut() {
        for a in node.attribute.iter_mut() {
            // Cast/RandomNormal `to`/`dtype`, and the tensors of Constant and ConstantOfShape
            if (a.name == "to" || a.name == "dtype") && is_half(a.i as DType) {
                a.i = dtype::FLOAT as i64;
            }
            if let Some(t) = a.t.as_mut().filter(|t| is_half(t.data_type)) {
                let name = std::mem::take(&mut t.name);
                *t = TensorProto { name, ..to_f32_tensor(t)? };
            }
        }
    }
    for v in graph.inputs.iter_mut().chain(graph.outputs.iter_mut()).chain(graph.value_info.iter_mut()) {
        if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            if is_half(t.elem_type) {
                t.elem_type = dtype::FLOAT;
            }
        }
    }
    Ok(origin)
}

/// Converted copies made by [`store_frozen`], so that the graphs of one build share each one (stored once).
#[derive(Default)]
pub struct StoredWeights {
    converted: HashMap<(usize, usize, DType), Bytes>,
}

fn from_f32(raw: &[u8], to: DType) -> Vec<u8> {
    let values = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    match to {
        dtype::FLOAT16 => values.flat_map(|v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect(),
        _ => values.flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
    }
}

/// The name of the stored initializer whose float32 cast keeps the weight's own name.
pub fn stored_name(name: &str, to: DType) -> String {
    format!("{name}.{}", dtype::name(to))
}

/// The names a frozen weight `name` may be stored under: its own, or a half-precision one.
pub fn stored_names(name: &str) -> [String; 3] {
    [name.to_string(), stored_name(name, dtype::BFLOAT16), stored_name(name, dtype::FLOAT16)]
}

/// Stores the frozen weights named in `frozen` (float32 initializers by now) in `to`, or, when `to` is
/// `None`, in the dtype the model had them in, each read through a `Cast` to float32 under its own name.
/// A weight stored in the dtype it came in gets its original bytes back (`origin`). Returns how many.
pub fn store_frozen(graph: &mut Graph, frozen: &HashSet<String>, to: Option<DType>, origin: &HalfOrigin, store: &mut StoredWeights) -> Result<usize> {
    let taken: HashSet<String> = graph.initializers.iter().map(|t| t.name.clone()).collect();
    let mut casts = Vec::new();
    for t in graph.initializers.iter_mut().filter(|t| t.data_type == dtype::FLOAT && frozen.contains(&t.name)) {
        let original = origin.of(t);
        let Some(to) = to.or(original.map(|o| o.data_type)).filter(|&d| is_half(d)) else { continue };
        let name = stored_name(&t.name, to);
        if taken.contains(&name) {
            return Err(Error::graph(format!("cannot store {} as {}: the model already has an initializer {name}", t.name, dtype::name(to))));
        }
        let bytes = match original.filter(|o| o.data_type == to && !o.raw_data.is_empty()) {
            Some(o) => o.raw_data.clone(),
            None => {
                let key = (t.raw_data.as_ptr() as usize, t.raw_data.len(), to);
                store.converted.entry(key).or_insert_with(|| from_f32(&t.raw_data, to).into()).clone()
            }
        };
        casts.push(NodeProto {
            name: format!("frozen/{}", t.name),
            op_type: "Cast".into(),
            input: vec![name.clone()],
            output: vec![t.name.clone()],
            attribute: vec![attr_i("to", dtype::FLOAT as i64)],
            ..Default::default()
        });
        *t = TensorProto { name, dims: t.dims.clone(), data_type: to, raw_data: bytes, ..Default::default() };
    }
    let n = casts.len();
    casts.append(&mut graph.nodes);
    graph.nodes = casts;
    Ok(n)
}
