//! Feeding a batch and the parameters to the train/eval graphs and reading what they return.
//! Parameters are passed by reference (no copy); outputs stay runtime-owned values.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorValueType};

use super::batch::Batch;
use super::device::Device;
use crate::dpo::manifest::GraphSpec;
use crate::{Error, Result};

/// Values for a graph's parameter inputs, by input name.
#[derive(Default)]
pub struct Feeds {
    pub names: Vec<String>,
    pub values: Vec<Tensor<f32>>,
}

impl Feeds {
    pub fn get(&self, name: &str) -> Option<&Tensor<f32>> {
        self.names.iter().position(|n| n == name).map(|i| &self.values[i])
    }
}

/// The scalar loss and per-pair/per-row values of one forward pass.
#[derive(Clone, Debug, Default)]
pub struct ForwardOut {
    pub loss: f32,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub policy_logps: Vec<f32>,
    pub beta: Vec<f32>,
    /// beta-DPO: the running margin statistics after this batch, and the pairs its filter kept.
    pub margin_stats: Option<[f32; 2]>,
    pub kept: Vec<f32>,
    /// epsilon-DPO: each pair's step (+1, -1 or 0).
    pub epsilon_steps: Vec<f32>,
}

/// beta-DPO's per-batch inputs; graphs without them ignore these. Empty noise feeds zeros
/// (evaluation: the filter then keeps the pairs nearest the running mean).
#[derive(Clone, Debug, Default)]
pub struct BatchBetaInputs {
    pub margin_stats: [f32; 2],
    pub selection_noise: Vec<f32>,
    /// epsilon-DPO's global beta.
    pub epsilon_beta: f32,
    /// float16 artifacts: what the train graph multiplies the loss by before differentiation.
    pub loss_scale: f32,
}

/// Everything a train or eval graph is fed for one batch, parameters aside.
pub struct GraphBatch<'a> {
    pub batch: &'a Batch,
    /// Reference log-probs, one per row.
    pub refs: &'a [f32],
    pub batch_beta: &'a BatchBetaInputs,
}

fn batch_inputs<'v>(spec: &GraphSpec, GraphBatch { batch, refs, batch_beta: extra }: &GraphBatch) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'v>)>> {
    let rows = batch.input_ids.nrows();
    let mut v: Vec<(Cow<'static, str>, SessionInputValue<'v>)> = Vec::new();
    for i in &spec.inputs {
        if let Some(packed) = &batch.packed {
            if let Some(t) = packed.by_role(&i.role) {
                v.push((Cow::Owned(i.name.clone()), t.to_input(&i.name)?));
                continue;
            }
        }
        let value: DynValue = match i.role.as_str() {
            "input_ids" => Tensor::from_array(batch.input_ids.clone())?.into_dyn(),
            "attention_mask" => Tensor::from_array(batch.attention_mask.clone())?.into_dyn(),
            "position_ids" => Tensor::from_array(batch.position_ids.clone())?.into_dyn(),
            "completion_mask" => Tensor::from_array(batch.completion_mask.clone())?.into_dyn(),
            "ref_logps" => Tensor::from_array((vec![rows], refs.to_vec()))?.into_dyn(),
            "margin_stats" => Tensor::from_array((vec![2], extra.margin_stats.to_vec()))?.into_dyn(),
            "selection_noise" => {
                let pairs = refs.len() / 2;
                let noise = if extra.selection_noise.is_empty() { vec![0.0; pairs] } else { extra.selection_noise.clone() };
                Tensor::from_array((vec![pairs], noise))?.into_dyn()
            }
            "epsilon_beta" => Tensor::from_array((vec![1], vec![extra.epsilon_beta]))?.into_dyn(),
            "loss_scale" => Tensor::from_array((Vec::<usize>::new(), vec![extra.loss_scale]))?.into_dyn(),
            "parameter" => continue,
            other => return Err(Error::Artifacts(format!("the graph wants an input with role {other}, which train does not know"))),
        };
        v.push((Cow::Owned(i.name.clone()), SessionInputValue::Owned(value)));
    }
    Ok(v)
}

fn floats(v: &DynValue, name: &str) -> Result<Vec<f32>> {
    let (_, d) = v.try_extract_tensor::<f32>().map_err(|e| Error::Runtime(format!("output {name}: {e}")))?;
    Ok(d.to_vec())
}

/// Runs a train or eval graph. Returns the forward values and, for the train graph, the
/// gradient values in `grad_outputs` order.
pub fn run_graph(
    session: &mut Session,
    spec: &GraphSpec,
    fed: &GraphBatch,
    params: &Feeds,
    grad_outputs: &[String],
    device: &Device,
) -> Result<(ForwardOut, Vec<Tensor<f32>>)> {
    let mut inputs = batch_inputs(spec, fed)?;
    for i in spec.inputs.iter().filter(|i| i.role == "parameter") {
        let v = params.get(&i.name).ok_or_else(|| Error::ParameterMismatch(format!("no value for parameter {}", i.name)))?;
        inputs.push((Cow::Owned(i.name.clone()), SessionInputValue::from(v)));
    }
    let mut outputs = device.run(session, inputs, &|name| grad_outputs.iter().any(|g| g == name))?;
    let mut out = ForwardOut::default();
    let metrics: Vec<&str> = spec.outputs.iter().filter(|o| o.role == "metric").map(|o| o.name.as_str()).collect();
    for o in &spec.outputs {
        let Some(v) = outputs.get(o.name.as_str()) else { continue };
        match o.role.as_str() {
            "loss" => out.loss = floats(v, &o.name)?.first().copied().unwrap_or(f32::NAN),
            "beta" => out.beta = floats(v, &o.name)?,
            "margin_stats" => {
                let s = floats(v, &o.name)?;
                out.margin_stats = (s.len() == 2).then(|| [s[0], s[1]]);
            }
            "kept" => out.kept = floats(v, &o.name)?,
            "epsilon_steps" => out.epsilon_steps = floats(v, &o.name)?,
            "metric" => {
                let vals = floats(v, &o.name)?;
                match metrics.iter().position(|m| *m == o.name) {
                    Some(0) => out.chosen_rewards = vals,
                    Some(1) => out.rejected_rewards = vals,
                    Some(2) => out.policy_logps = vals,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let mut grads = Vec::with_capacity(grad_outputs.len());
    for g in grad_outputs {
        let v = outputs.remove(g.as_str()).ok_or_else(|| Error::Runtime(format!("the train graph returned no {g}")))?;
        grads.push(v.downcast::<TensorValueType<f32>>()?);
    }
    Ok((out, grads))
}

/// A forward pass without gradients (eval graph).
pub fn forward_values(session: &mut Session, spec: &GraphSpec, batch: &Batch, refs: &[f32], params: &Feeds, device: &Device) -> Result<ForwardOut> {
    Ok(run_graph(session, spec, &GraphBatch { batch, refs, batch_beta: &BatchBetaInputs::default() }, params, &[], device)?.0)
}
