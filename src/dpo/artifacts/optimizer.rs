//! The optimizer graph: AdamW with decoupled weight decay, global-norm gradient clipping and a
//! separate learning rate for the beta head, in standard ONNX ops.
//!
//! Per parameter `p` it takes `p`, its gradient and its moments `m`, `v`, and returns the updated
//! three. The step counter and all hyper-parameters are inputs, so a schedule is just a different
//! value per call.

use crate::dpo::manifest::{GraphSpec, ParameterSpec, TensorSpec};
use crate::graph::{Builder, Graph, Names};
use crate::onnx::{attr_i, dtype, value_info, Dim, OperatorSetIdProto};

pub const OPSET: i64 = 18;

/// Scalar hyper-parameter inputs: (name, role).
pub const HYPER: &[(&str, &str)] = &[
    ("learning_rate", "learning_rate"),
    ("head_learning_rate", "head_learning_rate"),
    ("step", "step"),
    ("adam_beta1", "adam_beta1"),
    ("adam_beta2", "adam_beta2"),
    ("adam_epsilon", "adam_epsilon"),
    ("weight_decay", "weight_decay"),
    ("max_grad_norm", "max_grad_norm"),
    ("gradient_scale", "gradient_scale"),
];

pub fn state_name(p: &str, which: &str) -> String {
    format!("{p}.adam_{which}")
}
pub fn updated(name: &str) -> String {
    format!("{name}.new")
}

/// `gradient_scale` multiplies every gradient first (1/k after accumulating k micro-batches).
/// Builds the optimizer graph for the trainable parameters; `grad_name(p)` names p's gradient.
pub fn build(params: &[ParameterSpec], grad_name: impl Fn(&str) -> String) -> (Graph, GraphSpec) {
    let mut g =
        Graph { name: "betadpo_adamw".into(), ir_version: 8, opsets: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }], ..Default::default() };
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    for (name, role) in HYPER {
        g.inputs.push(value_info(name, dtype::FLOAT, &[]));
        inputs.push(TensorSpec::float(name, role, &[]));
    }
    let trainable: Vec<&ParameterSpec> = params.iter().filter(|p| p.trainable).collect();
    for p in &trainable {
        let dims: Vec<Dim> = p.shape.iter().map(|&d| Dim::Fixed(d)).collect();
        let grad = grad_name(&p.name);
        for (n, role) in [(p.name.clone(), "parameter"), (grad.clone(), "gradient"), (state_name(&p.name, "m"), "adam_m"), (state_name(&p.name, "v"), "adam_v")]
        {
            g.inputs.push(value_info(&n, dtype::FLOAT, &dims));
            inputs.push(TensorSpec::float(&n, role, &p.shape).of_parameter(&p.name));
        }
    }
    let mut names = Names::from_graph(&g);
    let mut b = Builder::new(&mut names, "adamw/");
    let zero_axes_keep = vec![attr_i("keepdims", 0)];

    // global gradient norm, and the clipping coefficient min(1, max_norm / (norm + 1e-6))
    let mut scaled = Vec::new();
    let squares: Vec<String> = trainable
        .iter()
        .map(|p| {
            let raw = grad_name(&p.name);
            let gr = b.op("Mul", &[&raw, "gradient_scale"], vec![], &format!("{}.scaled_grad", p.name));
            let sq = b.op("Mul", &[&gr, &gr], vec![], &format!("{}.grad_sq", p.name));
            scaled.push(gr);
            b.op("ReduceSum", &[&sq], zero_axes_keep.clone(), &format!("{}.grad_sq_sum", p.name))
        })
        .collect();
    let refs: Vec<&str> = squares.iter().map(String::as_str).collect();
    let total = b.op("Sum", &refs, vec![], "grad_sq_total");
    b.op_into("Sqrt", &[&total], &["grad_norm"], vec![]);
    let tiny = b.scalar(1e-6, dtype::FLOAT);
    let one = b.scalar(1.0, dtype::FLOAT);
    let zero = b.scalar(0.0, dtype::FLOAT);
    let denom = b.op("Add", &["grad_norm", &tiny], vec![], "clip_denominator");
    let ratio = b.op("Div", &["max_grad_norm", &denom], vec![], "clip_ratio");
    let capped = b.op("Min", &[&ratio, &one], vec![], "clip_capped");
    // max_grad_norm <= 0 disables clipping
    let enabled = b.op("Greater", &["max_grad_norm", &zero], vec![], "clip_enabled");
    let coef = b.op("Where", &[&enabled, &capped, &one], vec![], "clip_coefficient");

    // bias corrections 1 - beta^t
    let b1t = b.op("Pow", &["adam_beta1", "step"], vec![], "beta1_pow");
    let b2t = b.op("Pow", &["adam_beta2", "step"], vec![], "beta2_pow");
    let bc1 = b.op("Sub", &[&one, &b1t], vec![], "bias_correction1");
    let bc2 = b.op("Sub", &[&one, &b2t], vec![], "bias_correction2");
    let omb1 = b.op("Sub", &[&one, "adam_beta1"], vec![], "one_minus_beta1");
    let omb2 = b.op("Sub", &[&one, "adam_beta2"], vec![], "one_minus_beta2");

    for (p, g_scaled) in trainable.iter().zip(&scaled) {
        let n = &p.name;
        let lr = if p.beta_head { "head_learning_rate" } else { "learning_rate" };
        let gr = b.op("Mul", &[g_scaled, &coef], vec![], &format!("{n}.clipped_grad"));
        let (m, v) = (state_name(n, "m"), state_name(n, "v"));
        let m1 = b.op("Mul", &[&m, "adam_beta1"], vec![], &format!("{n}.m_decayed"));
        let m2 = b.op("Mul", &[&gr, &omb1], vec![], &format!("{n}.m_fresh"));
        b.op_into("Add", &[&m1, &m2], &[&updated(&m)], vec![]);
        let gg = b.op("Mul", &[&gr, &gr], vec![], &format!("{n}.grad_sq2"));
        let v1 = b.op("Mul", &[&v, "adam_beta2"], vec![], &format!("{n}.v_decayed"));
        let v2 = b.op("Mul", &[&gg, &omb2], vec![], &format!("{n}.v_fresh"));
        b.op_into("Add", &[&v1, &v2], &[&updated(&v)], vec![]);
        let mhat = b.op("Div", &[&updated(&m), &bc1], vec![], &format!("{n}.m_hat"));
        let vhat = b.op("Div", &[&updated(&v), &bc2], vec![], &format!("{n}.v_hat"));
        let sd = b.op("Sqrt", &[&vhat], vec![], &format!("{n}.v_sqrt"));
        let den = b.op("Add", &[&sd, "adam_epsilon"], vec![], &format!("{n}.denominator"));
        let mut upd = b.op("Div", &[&mhat, &den], vec![], &format!("{n}.adam_direction"));
        if p.weight_decay {
            let wd = b.op("Mul", &[n.as_str(), "weight_decay"], vec![], &format!("{n}.decay"));
            upd = b.op("Add", &[&upd, &wd], vec![], &format!("{n}.direction"));
        }
        let step = b.op("Mul", &[&upd, lr], vec![], &format!("{n}.step"));
        b.op_into("Sub", &[n.as_str(), &step], &[&updated(n)], vec![]);
        for (out, role) in [(updated(n), "updated_parameter"), (updated(&m), "updated_adam_m"), (updated(&v), "updated_adam_v")] {
            outputs.push(TensorSpec::float(&out, role, &p.shape).of_parameter(n));
        }
    }
    g.nodes = b.take();
    g.names = names;
    outputs.insert(0, TensorSpec::float("grad_norm", "metric", &[]).described("global L2 norm of the gradients before clipping"));
    g.outputs = outputs.iter().map(|o| value_info(&o.name, dtype::FLOAT, &[])).collect();
    for (vi, o) in g.outputs.iter_mut().zip(&outputs) {
        let dims: Vec<Dim> = o.shape.iter().map(|d| Dim::Fixed(d.as_i64().unwrap_or(0))).collect();
        *vi = value_info(&o.name, dtype::FLOAT, &dims);
    }
    (g, GraphSpec { file: crate::run_layout::graph_file("optimizer"), inputs, outputs })
}

#[cfg(test)]
mod tests {
    use super::super::test_model::{output, run_graph};
    use super::*;
    use crate::runtime::HostTensor;
    use ndarray::{ArrayD, IxDyn};

    fn param(name: &str, shape: &[i64], beta_head: bool, weight_decay: bool) -> ParameterSpec {
        ParameterSpec { name: name.into(), shape: shape.to_vec(), trainable: true, beta_head, initializers: vec![], weight_decay }
    }

    fn f32s(shape: &[usize], values: impl Fn(usize) -> f64) -> ArrayD<f32> {
        let n = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| values(i) as f32).collect()).unwrap()
    }

    /// One step of the graph against PyTorch's AdamW (`torch.optim.AdamW`, decoupled decay
    /// `p -= lr·wd·p` before the Adam step) after `clip_grad_norm_`, written out in float64: a
    /// decayed matrix, the head at its own rate without decay, gradients scaled by 1/2 then clipped,
    /// at step 3 with moments already non-zero; and a frozen parameter is not in the graph.
    #[test]
    fn one_step_is_pytorchs_adamw_after_clipping() {
        let params =
            [param("w", &[2, 3], false, true), param("head", &[3], true, false), ParameterSpec { trainable: false, ..param("frozen", &[4], false, true) }];
        let (graph, spec) = build(&params, |p| format!("{p}_grad"));
        assert!(!graph.has_input("frozen"), "a frozen parameter is updated");
        let (lr, head_lr, step, b1, b2, eps, wd, max_norm, scale) = (1e-2, 3e-2, 3.0, 0.9, 0.999, 1e-8, 0.1, 0.5, 0.5);
        let mut feeds: Vec<(String, HostTensor)> = [
            ("learning_rate", lr),
            ("head_learning_rate", head_lr),
            ("step", step),
            ("adam_beta1", b1),
            ("adam_beta2", b2),
            ("adam_epsilon", eps),
            ("weight_decay", wd),
            ("max_grad_norm", max_norm),
            ("gradient_scale", scale),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v as f32))))
        .collect();
        let values = |shape: &[usize], k: f64| {
            [
                f32s(shape, |i| (i as f64 * 0.7 + k).sin()),
                f32s(shape, |i| (i as f64 * 1.3 - k).cos()),
                f32s(shape, |i| 0.01 * (i as f64 + k).sin()),
                f32s(shape, |i| 1e-4 * (1.0 + i as f64 + k)),
            ]
        };
        let cases = [("w", vec![2usize, 3], values(&[2, 3], 0.0)), ("head", vec![3], values(&[3], 5.0))];
        for (name, _, [p, g, m, v]) in &cases {
            for (n, t) in [(name.to_string(), p), (format!("{name}_grad"), g), (state_name(name, "m"), m), (state_name(name, "v"), v)] {
                feeds.push((n, HostTensor::F32(t.clone())));
            }
        }
        let outs = run_graph(&graph, &feeds);

        let norm = cases.iter().flat_map(|c| c.2[1].iter()).map(|&g| (g as f64 * scale).powi(2)).sum::<f64>().sqrt();
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        assert!(coef < 0.9, "the case should clip (norm {norm})");
        assert!((output(&outs, "grad_norm").iter().next().copied().unwrap() as f64 - norm).abs() < 1e-5 * norm);
        for (name, _, [p, g, m, v]) in &cases {
            let (rate, decay) = if *name == "head" { (head_lr, 0.0) } else { (lr, wd) };
            for i in 0..p.len() {
                let at = |a: &ArrayD<f32>| a.as_slice().unwrap()[i] as f64;
                let gc = at(g) * scale * coef;
                let m1 = b1 * at(m) + (1.0 - b1) * gc;
                let v1 = b2 * at(v) + (1.0 - b2) * gc * gc;
                let mut p1 = at(p) * (1.0 - rate * decay);
                p1 -= rate * (m1 / (1.0 - b1.powf(step))) / ((v1 / (1.0 - b2.powf(step))).sqrt() + eps);
                for (out, want) in [(updated(name), p1), (updated(&state_name(name, "m")), m1), (updated(&state_name(name, "v")), v1)] {
                    let got = output(&outs, &out).as_slice().unwrap()[i] as f64;
                    // float32 arithmetic: a few roundings of each term
                    assert!((got - want).abs() <= 1e-5 * want.abs() + 1e-8, "{out}[{i}]: {got} vs {want}");
                }
            }
        }
        let listed: Vec<&str> = spec.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(listed, ["grad_norm", "w.new", "w.adam_m.new", "w.adam_v.new", "head.new", "head.adam_m.new", "head.adam_v.new"]);
    }
}
