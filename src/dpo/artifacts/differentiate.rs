//! Phase 9: the train and eval graphs. Eval is the objective graph as it is; train appends the
//! reverse pass (`autodiff::differentiate`) for every trainable parameter and outputs the gradients.
//! In float16 precision the loss is first multiplied by a fed `loss_scale` (see `train::loss_scale`).

use crate::autodiff::{differentiate, Gradients};
use crate::dpo::manifest::TensorSpec;
use crate::dpo::model::params::Param;
use crate::dpo::objective::{self, Objective};
use crate::graph::{Builder, Graph, TensorInfo, TensorInfos};
use crate::onnx::{dtype, value_info};
use crate::Result;

use super::specs::{order_inputs, param_inputs, set_outputs};

/// The train graph's input scaling the loss before differentiation (float16 precision).
pub const LOSS_SCALE: &str = "loss_scale";

pub struct TrainAndEval {
    pub train: Graph,
    pub eval: Graph,
    pub train_inputs: Vec<TensorSpec>,
    pub eval_inputs: Vec<TensorSpec>,
    /// The metrics and, after them, one gradient per trainable parameter.
    pub train_outputs: Vec<TensorSpec>,
    pub grads: Gradients,
}

pub struct Objectives<'a> {
    pub obj: &'a Objective,
    pub batch_inputs: &'a [TensorSpec],
    pub metric_outputs: &'a [TensorSpec],
}

pub fn train_and_eval(mut graph: Graph, infos: &mut TensorInfos, params: &[Param], o: Objectives, scale_loss: bool) -> Result<TrainAndEval> {
    let mut eval = graph.clone();
    eval.prune();
    let trainable: Vec<String> = params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let mut train_inputs = o.batch_inputs.to_vec();
    let mut eval_inputs = o.batch_inputs.to_vec();
    let loss = if scale_loss {
        train_inputs.push(TensorSpec::float(LOSS_SCALE, LOSS_SCALE, &[]).described("the train graph's gradients are of loss x loss_scale"));
        scaled_loss(&mut graph, infos, &o.obj.loss)
    } else {
        o.obj.loss.clone()
    };
    let grads = differentiate(&mut graph, &loss, &trainable, infos)?;
    let mut train_outputs = o.metric_outputs.to_vec();
    for (p, gname) in &grads.by_param {
        let dims = &params.iter().find(|x| &x.name == p).expect("a gradient per trainable parameter").dims;
        train_outputs.push(TensorSpec::float(gname, "gradient", dims).of_parameter(p));
    }
    set_outputs(&mut graph, &train_outputs);
    train_inputs.extend(param_inputs(params));
    eval_inputs.extend(param_inputs(params));
    order_inputs(&mut graph, &train_inputs);
    order_inputs(&mut eval, &eval_inputs);
    Ok(TrainAndEval { train: graph, eval, train_inputs, eval_inputs, train_outputs, grads })
}

/// Adds `loss x loss_scale` (a scalar input) to `graph` and returns its name: differentiating it seeds the
/// backward pass with the scale, so float16 gradients stay above float16's smallest normal.
fn scaled_loss(graph: &mut Graph, infos: &mut TensorInfos, loss: &str) -> String {
    let mut names = std::mem::take(&mut graph.names);
    let mut b = Builder::new(&mut names, objective::NODE_PREFIX);
    let scaled = b.op("Mul", &[loss, LOSS_SCALE], vec![], "scaled_loss");
    graph.nodes.extend(b.take());
    graph.names = names;
    graph.inputs.push(value_info(LOSS_SCALE, dtype::FLOAT, &[]));
    for t in [LOSS_SCALE, &scaled] {
        infos.insert(t.to_string(), TensorInfo::fixed(dtype::FLOAT, &[]));
    }
    scaled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::test_model::{output, parameter_feeds, prepared, run_graph, values};
    use crate::dpo::ObjectiveConfig;
    use crate::runtime::HostTensor;

    /// The train graph's gradients agree with central differences of the eval graph's loss along a
    /// direction that moves every parameter (the model's weights and the beta head together).
    #[test]
    fn gradients_match_central_differences_of_the_eval_loss() {
        let p = prepared(&ObjectiveConfig::default());
        let objectives = Objectives { obj: &p.appended.obj, batch_inputs: &p.appended.batch_inputs, metric_outputs: &p.appended.outputs };
        let mut infos = p.infos.clone();
        let g = train_and_eval(p.laid.graph.clone(), &mut infos, &p.params, objectives, false).unwrap();
        let batch = crate::dpo::artifacts::test_model::padded_batch();
        let params = parameter_feeds(&p);
        let direction: Vec<Vec<f32>> = params.iter().enumerate().map(|(k, (_, t))| values(t.shape().iter().product(), 0.9 + k as f32)).collect();
        let feeds_at = |eps: f32| -> Vec<(String, HostTensor)> {
            let mut f = batch.clone();
            for ((name, t), d) in params.iter().zip(&direction) {
                let mut v = t.as_f32().unwrap().clone();
                v.iter_mut().zip(d).for_each(|(x, d)| *x += eps * d);
                f.push((name.clone(), HostTensor::F32(v)));
            }
            f
        };
        let outs = run_graph(&g.train, &feeds_at(0.0));
        let analytic: f64 = g
            .grads
            .by_param
            .iter()
            .map(|(param, grad)| {
                let k = params.iter().position(|(n, _)| n == param).unwrap();
                output(&outs, grad).iter().zip(&direction[k]).map(|(g, d)| (*g as f64) * (*d as f64)).sum::<f64>()
            })
            .sum();
        let eps = 1e-2;
        let loss = |e: f32| output(&run_graph(&g.eval, &feeds_at(e)), &p.appended.obj.loss)[[]] as f64;
        let numeric = (loss(eps) - loss(-eps)) / (2.0 * eps as f64);
        assert!(analytic.abs() > 1e-3, "a direction the loss does not move along tests nothing: {analytic}");
        assert!((analytic - numeric).abs() <= 1e-2 * numeric.abs(), "autodiff {analytic} vs central differences {numeric}");
        assert_eq!(g.grads.by_param.len(), p.params.iter().filter(|p| p.trainable).count());
    }

    /// With a loss scale the train graph takes `loss_scale` and its gradients are the unscaled ones times it.
    #[test]
    fn a_loss_scale_multiplies_the_gradients() {
        let p = prepared(&ObjectiveConfig::default());
        let run = |scale: bool| {
            let objectives = Objectives { obj: &p.appended.obj, batch_inputs: &p.appended.batch_inputs, metric_outputs: &p.appended.outputs };
            let mut infos = p.infos.clone();
            let g = train_and_eval(p.laid.graph.clone(), &mut infos, &p.params, objectives, scale).unwrap();
            let mut feeds = crate::dpo::artifacts::test_model::padded_batch();
            feeds.extend(parameter_feeds(&p));
            feeds.push((LOSS_SCALE.into(), HostTensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), 8.0))));
            let (_, grad) = g.grads.by_param[0].clone();
            (g.train.has_input(LOSS_SCALE), output(&run_graph(&g.train, &feeds), &grad).clone())
        };
        let (plain_has, plain) = run(false);
        let (scaled_has, scaled) = run(true);
        assert!(!plain_has && scaled_has);
        for (a, b) in plain.iter().zip(scaled.iter()) {
            assert!((8.0 * a - b).abs() <= 1e-5 * b.abs().max(1e-6), "{a} x 8 != {b}");
        }
    }
}
