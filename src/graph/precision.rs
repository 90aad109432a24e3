//! Precision phases: betadpo computes in float32, while frozen weights may be stored at half precision.
//!
//! - [`compute_in_float32`] turns a float16/bfloat16 export into a float32 graph (constants, casts and
//!   declared types). Small half initializers are converted at once; large ones are *deferred*: a float32
//!   initializer with no values, whose half original [`HalfOrigin`] keeps. No float32 copy of the weights is
//!   ever made for weights that stay frozen, so building a 3 B bfloat16 model needs no 13 GB float32 copy.
//! - [`store_frozen`] runs last, on every graph of the artifacts: each frozen float weight is stored in the
//!   chosen dtype and cast back to float32 where it is read (`Cast` after the half weight), so a half
//!   export keeps its half weights, and a float32 one may halve its frozen weights' bytes on disk and in
//!   memory. A weight stored in the dtype it came in is the model's own bytes (and stays in the model's data
//!   file, see `onnx::save_models_sharing_data`).
//! - [`materialize_deferred`] gives the deferred weights that are still float32 (trainable, or frozen in
//!   float32 by choice) their values, once for all graphs.

use std::collections::{HashMap, HashSet};

use prost::bytes::Bytes;

use super::Graph;
use crate::onnx::proto::type_proto;
use crate::onnx::{attr_i, dtype, tensor_to_f32, DType, NodeProto, TensorProto};
use crate::{Error, Result};

/// Half initializers with fewer elements are converted to float32 at once: shape constants and scalars whose
/// values build phases and the shape probe read.
const DEFER_MIN_ELEMENTS: i64 = 4096;

/// The half-precision initializers a graph was exported with, by name, as loaded, each with the address of
/// the float32 copy that replaced it (a later phase that changes the weight makes a new copy), or with
/// `None` for a deferred one (see [`is_deferred`]).
#[derive(Clone, Debug, Default)]
pub struct HalfOrigin {
    original: HashMap<String, (TensorProto, Option<usize>)>,
}

impl HalfOrigin {
    /// The original of `t`, when `t` is still the float32 copy of a half initializer, or its deferred stand-in.
    fn of(&self, t: &TensorProto) -> Option<&TensorProto> {
        if let Some(name) = deferred_from(t) {
            return self.original.get(name).map(|(o, _)| o);
        }
        let (o, at) = self.original.get(&t.name)?;
        (*at == Some(t.raw_data.as_ptr() as usize)).then_some(o)
    }

    /// What holds `t`'s values: its half original when `t` is deferred, else `t` itself.
    fn values_of<'a>(&'a self, t: &'a TensorProto) -> &'a TensorProto {
        deferred_from(t).and_then(|name| self.original.get(name)).map_or(t, |(o, _)| o)
    }

    /// The float32 little-endian bytes of `t`, converted from its half original when `t` is deferred.
    pub fn float32_bytes<'a>(&self, t: &'a TensorProto) -> Result<std::borrow::Cow<'a, [u8]>> {
        let source = self.values_of(t);
        if std::ptr::eq(source, t) && t.data_type == dtype::FLOAT && !t.raw_data.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(&t.raw_data[..]));
        }
        Ok(std::borrow::Cow::Owned(f32_bytes(&tensor_to_f32(source)?)))
    }
}

/// Marks a deferred initializer's `doc_string`, followed by the name of its half original (copies of the
/// initializer under other names, such as epsilon-DPO's reference weights, keep it).
const DEFERRED_TAG: &str = "betadpo:deferred-half:";

/// A float32 initializer that stands for a half one whose values were not converted (yet).
pub fn is_deferred(t: &TensorProto) -> bool {
    deferred_from(t).is_some()
}

fn deferred_from(t: &TensorProto) -> Option<&str> {
    t.doc_string.strip_prefix(DEFERRED_TAG).filter(|_| t.data_type == dtype::FLOAT && t.raw_data.is_empty())
}

fn is_half(t: DType) -> bool {
    t == dtype::FLOAT16 || t == dtype::BFLOAT16
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn to_f32_tensor(t: &TensorProto) -> Result<TensorProto> {
    let raw = f32_bytes(&tensor_to_f32(t)?);
    Ok(TensorProto { name: t.name.clone(), dims: t.dims.clone(), data_type: dtype::FLOAT, raw_data: raw.into(), ..Default::default() })
}

/// Rewrites a half-precision graph to compute in float32. Returns the original half initializers.
pub fn compute_in_float32(graph: &mut Graph) -> Result<HalfOrigin> {
    let mut origin = HalfOrigin::default();
    for t in graph.initializers.iter_mut().filter(|t| is_half(t.data_type)) {
        let (f, at) = if t.dims.iter().product::<i64>() >= DEFER_MIN_ELEMENTS {
            let doc_string = format!("{DEFERRED_TAG}{}", t.name);
            (TensorProto { name: t.name.clone(), dims: t.dims.clone(), data_type: dtype::FLOAT, doc_string, ..Default::default() }, None)
        } else {
            let f = to_f32_tensor(t)?;
            let at = f.raw_data.as_ptr() as usize;
            (f, Some(at))
        };
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

/// Converted copies made by [`store_frozen`] and [`materialize_deferred`], keyed by the bytes they were
/// made from, so that the graphs of one build share each one (stored once).
#[derive(Default)]
pub struct StoredWeights {
    converted: HashMap<(usize, usize, DType), Bytes>,
}

impl StoredWeights {
    /// `t`'s values in `to` (float32 or half), made once per source tensor.
    fn convert(&mut self, t: &TensorProto, origin: &HalfOrigin, to: DType) -> Result<Bytes> {
        let source = origin.values_of(t);
        let key = (source.raw_data.as_ptr() as usize, source.raw_data.len(), to);
        if let Some(b) = self.converted.get(&key).filter(|_| !source.raw_data.is_empty()) {
            return Ok(b.clone());
        }
        let values = tensor_to_f32(source)?;
        let bytes: Bytes = match to {
            dtype::FLOAT => f32_bytes(&values).into(),
            _ => from_f32(&values, to).into(),
        };
        self.converted.insert(key, bytes.clone());
        Ok(bytes)
    }
}

fn from_f32(values: &[f32], to: DType) -> Vec<u8> {
    let values = values.iter().copied();
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
            None => store.convert(t, origin, to)?,
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

/// Gives every deferred initializer still in `graph` (a trainable weight's or one frozen in float32) its
/// float32 values, shared with the other graphs of the build through `store`. Returns how many.
pub fn materialize_deferred(graph: &mut Graph, origin: &HalfOrigin, store: &mut StoredWeights) -> Result<usize> {
    let mut n = 0;
    for t in graph.initializers.iter_mut().filter(|t| is_deferred(t)) {
        if origin.of(t).is_none() {
            return Err(Error::graph(format!("initializer {} has no values", t.name)));
        }
        t.raw_data = store.convert(t, origin, dtype::FLOAT)?;
        t.doc_string.clear();
        n += 1;
    }
    Ok(n)
}
