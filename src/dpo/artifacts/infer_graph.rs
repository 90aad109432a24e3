//! Phase 10: the deployable graph — the model (with its LoRA adapters) plus the beta head reading
//! each row's last non-padding token, outputting the full logits and a beta per row. A fixed-beta
//! method outputs its constant instead.

use crate::dpo::manifest::{GraphSpec, SpecDim, TensorSpec};
use crate::dpo::model::params::{lift_parameters, Param};
use crate::dpo::model::LmSignature;
use crate::dpo::objective::{self, ModelTensors};
use crate::dpo::{BetaSource, ObjectiveConfig};
use crate::graph::{Builder, Graph};
use crate::onnx::{dtype, value_info, Dim};
use crate::Result;

use super::specs::{lm_inputs, param_inputs};

/// The prefix of the names of the nodes the inference graph adds to the model (its beta head).
pub const INFER_HEAD_PREFIX: &str = "beta/";

pub fn inference_graph(base: &Graph, sig: &LmSignature, cfg: &ObjectiveConfig, params: &[Param]) -> Result<Graph> {
    let mut g = base.clone();
    let mut names = g.names.clone();
    let mut b = Builder::new(&mut names, INFER_HEAD_PREFIX);
    let tensors = ModelTensors::of(sig, false);
    let constant = cfg.fixed_beta.or(cfg.beta_dpo.map(|d| d.beta0)).or(cfg.epsilon_dpo.map(|e| e.beta0));
    let beta = match constant {
        Some(f) => {
            let k = b.scalar(f, dtype::FLOAT);
            let rows = b.dim(&sig.input_ids, 0, "beta/rows");
            b.op("Expand", &[&k, &rows], vec![], "beta/fixed")
        }
        None => {
            // At inference there is no answer yet: the head reads the prompt's last token (or
            // averages over the prompt), which is the sequence rule with an empty completion.
            let head_cfg = ObjectiveConfig { beta_source: BetaSource::Sequence, ..cfg.clone() };
            let zero = crate::onnx::tensor_f32("", &[1], &[0.0]);
            let shape = b.op("Shape", &[&sig.input_ids], vec![], "beta/ids_shape");
            let no_answer = b.op("ConstantOfShape", &[&shape], vec![crate::onnx::attr_t("value", zero)], "beta/no_answer");
            objective::beta_head(&mut b, &tensors, &no_answer, &head_cfg)
        }
    };
    b.op_into("Identity", &[&beta], &["beta"], vec![]);
    g.nodes.extend(b.take());
    g.names = names;
    if cfg.has_head() {
        g.initializers.extend(objective::head_initial_values(sig.hidden_size, cfg));
    }
    let logits_vi = g.outputs.iter().find(|o| o.name == sig.logits).cloned().expect("the recognised logits are an output");
    g.outputs = vec![logits_vi, value_info("beta", dtype::FLOAT, &[Dim::Sym("rows".into())])];
    lift_parameters(&mut g, params, true);
    g.prune();
    Ok(g)
}

/// The manifest's description of the inference graph.
pub fn spec(sig: &LmSignature, vocab: i64, params: &[Param]) -> GraphSpec {
    let mut inputs = lm_inputs(sig);
    inputs.extend(param_inputs(params));
    let outputs = vec![
        TensorSpec::new(&sig.logits, "logits", "float32", &[SpecDim::Named("rows"), SpecDim::Named("sequence"), SpecDim::Fixed(vocab)]),
        TensorSpec::float_named("beta", "beta", &["rows"]),
    ];
    GraphSpec { file: crate::run_layout::graph_file("infer"), inputs, outputs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::test_model::{output, parameter_feeds, prepared, run_graph, values, HIDDEN};
    use crate::dpo::objective::{HEAD_BIAS, HEAD_WEIGHT};
    use crate::runtime::HostTensor;
    use ndarray::{ArrayD, IxDyn};

    fn softplus(x: f64) -> f64 {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }

    /// The deployable graph's logits are the model's own, and its beta is softplus(w·h + b) of the
    /// hidden state at each row's last non-padding token, computed here from the model's hidden state.
    #[test]
    fn infer_outputs_the_models_logits_and_the_heads_beta_at_the_last_token() {
        // the head as the product defines it: softplus of the raw hidden state's projection, unbounded
        let cfg = crate::dpo::ObjectiveConfig { head_input: crate::dpo::HeadInput::Raw, beta_max: f64::INFINITY, ..Default::default() };
        let p = prepared(&cfg);
        let infer = inference_graph(&p.model.base, &p.model.sig, &cfg, &p.params).unwrap();
        let batch = crate::dpo::artifacts::test_model::padded_batch();
        let mut feeds = batch.clone();
        for (name, t) in parameter_feeds(&p) {
            // a head that is not at its (zero-weight) init, so the hidden state shows in beta
            let t =
                if name == HEAD_WEIGHT { HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[HIDDEN as usize]), values(HIDDEN as usize, 1.7)).unwrap()) } else { t };
            feeds.push((name, t));
        }
        let got = run_graph(&infer, &feeds);
        let mut model = p.model.base.clone();
        model.outputs.push(crate::onnx::value_info(&p.model.sig.hidden, crate::onnx::dtype::FLOAT, &[]));
        let want = run_graph(&model, &batch);
        assert_eq!(output(&got, &p.model.sig.logits), output(&want, &p.model.sig.logits));
        let hidden = output(&want, &p.model.sig.hidden);
        let w = values(HIDDEN as usize, 1.7);
        let b = feeds.iter().find(|(n, _)| n == HEAD_BIAS).unwrap().1.as_f32().unwrap()[[0]] as f64;
        let mask = batch[1].1.clone();
        let HostTensor::I64(mask) = mask else { unreachable!() };
        let beta = output(&got, "beta");
        for row in 0..4 {
            let last = (0..5).rev().find(|&c| mask[[row, c]] == 1).unwrap();
            let z: f64 = (0..HIDDEN as usize).map(|k| hidden[[row, last, k]] as f64 * w[k] as f64).sum::<f64>() + b;
            assert!((beta[[row]] as f64 - softplus(z)).abs() < 1e-5, "row {row}: {} vs {}", beta[[row]], softplus(z));
        }
    }
}
