//! epsilon-DPO's graphs (`--beta-method epsilon-dpo`) against PyTorch: the golden of
//! `scripts/fixtures/make_epsilon_dpo_golden.py` (the authors' formulas in float64 on the shared tiny Llama
//! and its golden batch, with the policy's weights perturbed away from the reference's) gives the
//! per-pair steps (+1, -1 and 0 all occur), betas, the next global beta, the loss and the
//! gradient, on both layouts. The frozen reference copy is what makes the steps non-zero: at the
//! stored weights the policy is the reference and every step is 0.

mod common;

use std::collections::HashMap;
use std::path::Path;

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::validate::{validate, ValidateOptions};
use betadpo::dpo::{build_artifacts, BuildOptions, EpsilonDpoConfig, LossKind, Manifest, ObjectiveConfig};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use betadpo::store::read_safetensors;
use ndarray::{ArrayD, IxDyn};

use common::fixtures::{read_tensors, repo, scratch, shared, Tensors};
use common::golden::{batch_input, load_golden, packed_golden, Golden};

fn golden_eps() -> Tensors {
    read_tensors(&repo().join("tests/fixtures/epsilon_dpo/golden.safetensors"))
}

/// The script's perturbation, in float32 as it computes it: element k + ((k * 7919) % 2001 - 1000) * (scale / 1000).
fn perturbed(w: &[f32], scale: f32) -> Vec<f32> {
    let step = (scale as f64 / 1000.0) as f32;
    w.iter().enumerate().map(|(k, &x)| x + pattern(k) * step).collect()
}

fn pattern(k: usize) -> f32 {
    ((k as i64 * 7919) % 2001 - 1000) as f32
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn scalar(t: &Tensors, name: &str) -> f64 {
    t.f32s[name].iter().next().copied().unwrap() as f64
}

fn values(t: &Tensors, name: &str) -> Vec<f64> {
    t.f32s[name].iter().map(|&x| x as f64).collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-3)
}

/// Runs the train graph of `art` on the shared golden batch; `scale` perturbs the stored
/// parameters as the golden script does (0: the stored ones). Returns the manifest and every float output.
fn train_outputs(
    art: &Path,
    shared_golden: &Golden,
    objective: &ObjectiveConfig,
    ref_logps: &ArrayD<f32>,
    scale: f32,
) -> (Manifest, HashMap<String, Vec<f32>>) {
    let m = Manifest::load(art).unwrap();
    let spec = m.graph("train").unwrap();
    let (params, _) = read_safetensors(&art.join(&m.parameters_file)).unwrap();
    let packed = (m.layout == betadpo::dpo::Layout::Packed).then(|| packed_golden(shared_golden, objective));
    let beta0 = objective.epsilon_dpo.unwrap().beta0 as f32;
    let mut feeds: Vec<(&str, HostTensor)> = Vec::new();
    for i in &spec.inputs {
        if let Some(t) = batch_input(shared_golden, packed.as_ref(), &i.role) {
            feeds.push((i.name.as_str(), t));
            continue;
        }
        let t = match i.role.as_str() {
            "ref_logps" => HostTensor::F32(ref_logps.clone()),
            "epsilon_beta" => HostTensor::F32(ArrayD::from_elem(IxDyn(&[1]), beta0)),
            "parameter" => {
                let p = params.iter().find(|p| p.name == i.name).unwrap();
                let data = if scale == 0.0 { p.data.clone() } else { perturbed(&p.data, scale) };
                HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&p.shape), data).unwrap())
            }
            other => panic!("unexpected input role {other}"),
        };
        feeds.push((i.name.as_str(), t));
    }
    let mut session = SessionConfig::default().session_from_file(&art.join(&spec.file)).unwrap();
    let outs = run(&mut session, &feeds).unwrap().into_iter().filter_map(|(n, t)| t.as_f32().map(|a| (n, a.iter().copied().collect()))).collect();
    (m, outs)
}

#[test]
fn steps_betas_loss_and_gradient_match_pytorch() {
    let Some(model_dir) = shared("tiny-llama-dynamo") else { return };
    let shared_golden = load_golden(&model_dir);
    let g = golden_eps();
    let settings = values(&g, "settings");
    let (beta0, epsilon, scale) = (settings[0] as f32 as f64, settings[1] as f32 as f64, settings[2] as f32);
    let objective = ObjectiveConfig { epsilon_dpo: Some(EpsilonDpoConfig { beta0, epsilon }), ..Default::default() };
    let steps = values(&g, "steps");
    for s in [1.0, -1.0, 0.0] {
        assert!(steps.contains(&s), "the golden exercises every step ({steps:?})");
    }
    let dir = scratch("epsilon-dpo-golden");
    for layout in [LayoutChoice::Padded, LayoutChoice::Packed] {
        let art = dir.join(format!("{layout:?}"));
        build_artifacts(&model_dir.join("model.onnx"), &art, &BuildOptions { objective: objective.clone(), layout, ..Default::default() }).unwrap();
        let label = format!("{layout:?}");

        // the policy at the stored weights is the reference: no pair steps, every beta is beta_0
        let (_, at_ref) = train_outputs(&art, &shared_golden, &objective, &g.f32s["ref_logps"], 0.0);
        assert!(at_ref["epsilon_steps"].iter().all(|&s| s == 0.0), "{label}: steps at the reference {:?}", at_ref["epsilon_steps"]);
        assert!(at_ref["beta"].iter().all(|&b| b == beta0 as f32), "{label}: betas at the reference {:?}", at_ref["beta"]);

        let (m, outs) = train_outputs(&art, &shared_golden, &objective, &g.f32s["ref_logps"], scale);
        let got = |name: &str| -> Vec<f64> { outs[name].iter().map(|&x| x as f64).collect() };
        assert_eq!(got("epsilon_steps"), steps, "{label}: steps");
        for (name, want) in [("beta", values(&g, "beta")), ("epsilon_beta_next", values(&g, "beta_next")), ("policy_logps", values(&g, "policy_logps"))] {
            let ours = got(name);
            assert_eq!(ours.len(), want.len(), "{label}: {name}");
            for (a, b) in ours.iter().zip(&want) {
                assert!(close(*a, *b, 1e-5), "{label}: {name} {ours:?}, PyTorch {want:?}");
            }
        }
        let loss = got("loss")[0];
        assert!(close(loss, scalar(&g, "loss"), 1e-4), "{label}: loss {loss}, PyTorch {}", scalar(&g, "loss"));

        // Gradients: in full where the golden has them, else their norm and their dot product with
        // the script's pattern (an error of 1e-3 of |grad| moves it by at most 1e-3 |grad| |pattern|).
        let spec = m.graph("train").unwrap();
        let largest = m.trainable().map(|p| scalar(&g, &format!("grad_norm/{}", p.name))).fold(0.0, f64::max);
        let mut full = 0;
        for p in m.trainable() {
            assert_eq!(p.initializers.len(), 1, "{}: one initializer per parameter in this model", p.name);
            let grad = &outs[&spec.output_for("gradient", &p.name).unwrap().name];
            let want_norm = scalar(&g, &format!("grad_norm/{}", p.name));
            let floor = want_norm.max(1e-6 * largest);
            assert!((norm(grad) - want_norm).abs() <= 1e-3 * floor, "{label}: |grad {}| {} vs PyTorch {want_norm}", p.name, norm(grad));
            let dot: f64 = grad.iter().enumerate().map(|(k, &x)| x as f64 * pattern(k) as f64 / 1000.0).sum();
            let pattern_norm = (0..grad.len()).map(|k| (pattern(k) as f64 / 1000.0).powi(2)).sum::<f64>().sqrt();
            let want_dot = scalar(&g, &format!("grad_dot/{}", p.name));
            assert!((dot - want_dot).abs() <= 1e-3 * floor * pattern_norm, "{label}: grad {} . pattern {dot} vs PyTorch {want_dot}", p.name);
            if let Some(want) = g.f32s.get(&format!("grad/{}", p.name)) {
                let diff = grad.iter().zip(want.iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
                assert!(diff <= 1e-3 * floor, "{label}: gradient of {} off by {:.2e} (relative)", p.name, diff / floor);
                full += 1;
            }
        }
        assert!(full >= 4, "{label}: {full} gradients compared in full");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `validate`'s checks on epsilon-DPO artifacts of the repository's quickstart model: central
/// differences of the loss at the pairs' betas held fixed (the reference code computes them under
/// `no_grad`), for every loss, and on the packed layout the model's own forward.
#[test]
fn validate_passes_on_both_layouts() {
    let dir = scratch("epsilon-dpo-validate");
    for (layout, loss) in [(LayoutChoice::Padded, LossKind::Sigmoid), (LayoutChoice::Packed, LossKind::Ipo), (LayoutChoice::Packed, LossKind::Hinge)] {
        let art = dir.join(format!("{layout:?}-{loss:?}"));
        let objective = ObjectiveConfig { loss, epsilon_dpo: Some(EpsilonDpoConfig { beta0: 0.1, epsilon: 0.1 }), ..Default::default() };
        build_artifacts(&common::fixtures::quickstart_model(), &art, &BuildOptions { objective, layout, ..Default::default() }).unwrap();
        let checks = validate(&art, &ValidateOptions { pairs: 4, ..Default::default() }).unwrap();
        for c in &checks {
            assert!(c.ok, "{layout:?}, {loss:?}: {}: {}", c.name, c.detail);
        }
        assert!(checks.iter().any(|c| c.name == "train: directional derivatives"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `reference_copy` transform against the model itself on ONNX Runtime: with every float weight
/// made trainable, lifted to an input and fed perturbed, the copy's logits stay the model's own
/// (run from its file, the independent reference) while the policy's move; at the stored weights
/// the two are the same.
#[test]
fn reference_copy_is_the_model_frozen_at_its_weights() {
    use betadpo::dpo::model::params::{lift_parameters, InitializerRef, Param};
    use betadpo::dpo::model::recognise;
    use betadpo::dpo::model::reference_copy::{add_reference_copy, freeze_reference};
    use betadpo::onnx::{dtype, load_model, save_model, value_info, Dim, SaveOptions};

    let path = common::fixtures::quickstart_model();
    let mut g = betadpo::graph::Graph::from_model(load_model(&path).unwrap()).unwrap();
    let sig = recognise(&g, None).unwrap();
    let copy = add_reference_copy(&mut g, &sig).unwrap();
    let params: Vec<Param> = g
        .initializers
        .iter()
        .filter(|t| t.data_type == dtype::FLOAT && t.dims.iter().product::<i64>() > 1)
        .map(|t| Param {
            name: t.name.clone(),
            dims: t.dims.clone(),
            trainable: true,
            beta_head: false,
            initializers: vec![InitializerRef { name: t.name.clone(), transposed: false }],
        })
        .collect();
    let stored: HashMap<String, Vec<f32>> =
        params.iter().map(|p| (p.name.clone(), betadpo::onnx::tensor_to_f32(g.initializer(&p.name).unwrap()).unwrap())).collect();
    assert_eq!(freeze_reference(&mut g, &copy, &params), params.len(), "every weight the copy reads is frozen");
    lift_parameters(&mut g, &params, true);
    let logits_shape = [Dim::Sym("rows".into()), Dim::Sym("sequence".into()), Dim::Fixed(512)];
    g.outputs = vec![value_info(&sig.logits, dtype::FLOAT, &logits_shape), value_info(&copy.logits, dtype::FLOAT, &logits_shape)];
    g.prune();
    let dir = scratch("reference-copy");
    save_model(&g.into_model(), &dir.join("copy.onnx"), &SaveOptions::default()).unwrap();

    let ids = ArrayD::from_shape_fn(IxDyn(&[2, 7]), |ix| ((ix[0] * 31 + ix[1] * 7 + 3) % 512) as i64);
    let mask = ArrayD::from_shape_fn(IxDyn(&[2, 7]), |ix| i64::from(ix[0] == 0 || ix[1] < 5));
    let batch = [("input_ids", HostTensor::I64(ids)), ("attention_mask", HostTensor::I64(mask))];
    let mut model = SessionConfig::default().session_from_file(&path).unwrap();
    let own: Vec<f32> = betadpo::runtime::f32_output(&run(&mut model, &batch).unwrap(), &sig.logits).unwrap().iter().copied().collect();
    let mut with_copy = SessionConfig::default().session_from_file(&dir.join("copy.onnx")).unwrap();
    for scale in [0.0f32, 1.0] {
        let mut feeds: Vec<(&str, HostTensor)> = batch.iter().map(|(n, t)| (*n, t.clone())).collect();
        for p in &params {
            let dims: Vec<usize> = p.dims.iter().map(|&d| d as usize).collect();
            feeds.push((p.name.as_str(), HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&dims), perturbed(&stored[&p.name], scale)).unwrap())));
        }
        let outs = run(&mut with_copy, &feeds).unwrap();
        let get = |n: &str| -> Vec<f32> { betadpo::runtime::f32_output(&outs, n).unwrap().iter().copied().collect() };
        let (policy, reference) = (get(&sig.logits), get(&copy.logits));
        let gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(gap(&reference, &own) <= 1e-5, "scale {scale}: the copy's logits are not the model's (max gap {})", gap(&reference, &own));
        let moved = gap(&policy, &own);
        assert!(if scale == 0.0 { moved <= 1e-5 } else { moved > 1e-2 }, "scale {scale}: the policy's logits moved by {moved}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
