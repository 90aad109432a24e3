//! One optimizer step: the optimizer graph applied to the state, and the accumulation of
//! gradients across micro-batches, both on the runtime's device.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorValueType};

use super::device::Device;
use super::session_io::Feeds;
use crate::dpo::artifacts::optimizer::{state_name, updated};
use crate::dpo::manifest::GraphSpec;
use crate::graph::{Builder, Graph, Names};
use crate::onnx::{dtype, value_info, Dim, OperatorSetIdProto};
use crate::runtime::SessionConfig;
use crate::{Error, Result};

/// Hyper-parameters of one step, fed as scalar inputs.
pub struct Hyper {
    pub learning_rate: f32,
    pub head_learning_rate: f32,
    pub step: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_epsilon: f32,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    pub gradient_scale: f32,
}

impl Hyper {
    fn value(&self, role: &str) -> Option<f32> {
        Some(match role {
            "learning_rate" => self.learning_rate,
            "head_learning_rate" => self.head_learning_rate,
            "step" => self.step,
            "adam_beta1" => self.adam_beta1,
            "adam_beta2" => self.adam_beta2,
            "adam_epsilon" => self.adam_epsilon,
            "weight_decay" => self.weight_decay,
            "max_grad_norm" => self.max_grad_norm,
            "gradient_scale" => self.gradient_scale,
            _ => return None,
        })
    }
}

/// Parameters and Adam moments, by parameter, in the same order.
pub struct State {
    pub params: Feeds,
    pub m: Vec<Tensor<f32>>,
    pub v: Vec<Tensor<f32>>,
}

/// Runs the optimizer graph. On success the state holds the updated values and the global gradient
/// norm is returned; when the norm is not finite nothing is updated and `Ok(None)` tells the caller.
pub fn apply(session: &mut Session, spec: &GraphSpec, state: &mut State, grads: &[Tensor<f32>], h: &Hyper, device: &Device) -> Result<Option<f32>> {
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(spec.inputs.len());
    for i in &spec.inputs {
        if let Some(v) = h.value(&i.role) {
            inputs.push((Cow::Owned(i.name.clone()), SessionInputValue::Owned(Tensor::from_array((Vec::<usize>::new(), vec![v]))?.into_dyn())));
            continue;
        }
        let p = i.parameter.as_deref().ok_or_else(|| Error::Artifacts(format!("optimizer input {} has role {} and no parameter", i.name, i.role)))?;
        let k = state.params.names.iter().position(|n| n == p).ok_or_else(|| Error::ParameterMismatch(format!("no state for parameter {p}")))?;
        let value = match i.role.as_str() {
            "parameter" => &state.params.values[k],
            "gradient" => &grads[k],
            "adam_m" => &state.m[k],
            "adam_v" => &state.v[k],
            other => return Err(Error::Artifacts(format!("optimizer input role {other} is unknown"))),
        };
        inputs.push((Cow::Owned(i.name.clone()), SessionInputValue::from(value)));
    }
    let mut outputs = device.run(session, inputs, &|name| name != "grad_norm")?;
    let norm = {
        let v = outputs.get("grad_norm").ok_or_else(|| Error::Runtime("the optimizer returned no grad_norm".into()))?;
        v.try_extract_tensor::<f32>()?.1[0]
    };
    if !norm.is_finite() {
        return Ok(None);
    }
    let mut take = |name: &str| -> Result<Tensor<f32>> {
        outputs.remove(name).ok_or_else(|| Error::Runtime(format!("the optimizer returned no {name}")))?.downcast::<TensorValueType<f32>>().map_err(Error::from)
    };
    for k in 0..state.params.names.len() {
        let p = state.params.names[k].clone();
        state.params.values[k] = take(&updated(&p))?;
        state.m[k] = take(&updated(&state_name(&p, "m")))?;
        state.v[k] = take(&updated(&state_name(&p, "v")))?;
    }
    Ok(Some(norm))
}

/// Sums gradients of micro-batches on the device: `acc_i + w * g_i` for every parameter (`w` = 1 in
/// one process; a rank's share of the batch under `--allreduce nccl`), or `w * g_i` to start a sum.
pub struct Accumulator {
    accumulate: Session,
    /// `w * g_i`, built when a sum first starts here (only the NCCL path starts one: the
    /// single-process path takes the first micro-batch's gradients as they are).
    scale: Option<Session>,
    shapes: Vec<Vec<i64>>,
    cfg: SessionConfig,
    device: Device,
}

/// `w * g_i` (`accumulate` false) or `acc_i + w * g_i`, for every parameter.
fn weighted_sum_graph(shapes: &[Vec<i64>], accumulate: bool) -> Vec<u8> {
    let mut g = Graph {
        name: "betadpo_weighted_gradient_sum".into(),
        ir_version: 8,
        opsets: vec![OperatorSetIdProto { domain: String::new(), version: 18 }],
        ..Default::default()
    };
    g.inputs.push(value_info("weight", dtype::FLOAT, &[]));
    for (i, s) in shapes.iter().enumerate() {
        let dims: Vec<Dim> = s.iter().map(|&d| Dim::Fixed(d)).collect();
        if accumulate {
            g.inputs.push(value_info(&format!("acc{i}"), dtype::FLOAT, &dims));
        }
        g.inputs.push(value_info(&format!("g{i}"), dtype::FLOAT, &dims));
        g.outputs.push(value_info(&format!("sum{i}"), dtype::FLOAT, &dims));
    }
    let mut names = Names::from_graph(&g);
    let mut b = Builder::new(&mut names, "wsum/");
    for i in 0..shapes.len() {
        let (gi, out) = (format!("g{i}"), format!("sum{i}"));
        if accumulate {
            let scaled = b.op("Mul", &["weight", &gi], vec![], &format!("scaled{i}"));
            b.op_into("Add", &[&format!("acc{i}"), &scaled], &[&out], vec![]);
        } else {
            b.op_into("Mul", &["weight", &gi], &[&out], vec![]);
        }
    }
    g.nodes = b.take();
    prost::Message::encode_to_vec(&g.into_model())
}

impl Accumulator {
    pub fn new(shapes: &[Vec<i64>], cfg: &SessionConfig, device: Device) -> Result<Self> {
        Ok(Accumulator {
            accumulate: cfg.session_from_bytes(&weighted_sum_graph(shapes, true))?,
            scale: None,
            shapes: shapes.to_vec(),
            cfg: cfg.clone(),
            device,
        })
    }

    /// `acc + g` (weight 1: `acc + 1 * g` is `acc + g` to the bit).
    pub fn add(&mut self, acc: Vec<Tensor<f32>>, grads: &[Tensor<f32>]) -> Result<Vec<Tensor<f32>>> {
        self.add_weighted(Some(&acc), grads, 1.0)
    }

    /// `acc + weight * grads`, or `weight * grads` without `acc`.
    pub fn add_weighted(&mut self, acc: Option<&[Tensor<f32>]>, grads: &[Tensor<f32>], weight: f32) -> Result<Vec<Tensor<f32>>> {
        let w = Tensor::from_array((Vec::<usize>::new(), vec![weight]))?;
        let n = self.shapes.len();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(2 * n + 1);
        inputs.push((Cow::Borrowed("weight"), SessionInputValue::from(&w)));
        for i in 0..n {
            if let Some(acc) = acc {
                inputs.push((Cow::Owned(format!("acc{i}")), SessionInputValue::from(&acc[i])));
            }
            inputs.push((Cow::Owned(format!("g{i}")), SessionInputValue::from(&grads[i])));
        }
        let session = match (acc, &mut self.scale) {
            (Some(_), _) => &mut self.accumulate,
            (None, Some(scale)) => scale,
            (None, scale @ None) => scale.insert(self.cfg.session_from_bytes(&weighted_sum_graph(&self.shapes, false))?),
        };
        let mut out = self.device.run(session, inputs, &|_| true)?;
        (0..n)
            .map(|i| {
                out.remove(&format!("sum{i}"))
                    .ok_or_else(|| Error::Runtime("accumulator output missing".into()))?
                    .downcast::<TensorValueType<f32>>()
                    .map_err(Error::from)
            })
            .collect()
    }
}
