//! build-graph against PyTorch autograd: the loss and every parameter gradient of the train graph
//! equal `golden.safetensors` (computed in float64 by PyTorch) for the prompt, sequence and
//! fixed-beta objectives, on every fixture model, and the default trainable set equals the
//! golden's parameter set.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use betadpo::dpo::{build_artifacts, BetaSource, BuildOptions, Manifest, ObjectiveConfig};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use betadpo::store::read_safetensors;
use ndarray::{ArrayD, IxDyn};

struct Golden {
    f32s: HashMap<String, ArrayD<f32>>,
    i64s: HashMap<String, ArrayD<i64>>,
}

fn load_golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut g = Golden { f32s: HashMap::new(), i64s: HashMap::new() };
    for (name, v) in st.tensors() {
        let shape = IxDyn(v.shape());
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let d: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                g.f32s.insert(name, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            safetensors::Dtype::I64 => {
                let d: Vec<i64> = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                g.i64s.insert(name, ArrayD::from_shape_vec(shape, d).unwrap());
            }
            other => panic!("unexpected dtype {other:?}"),
        }
    }
    g
}

fn norm(a: &ArrayD<f32>) -> f64 {
    a.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

fn diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}

fn rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    diff(a, b) / norm(b).max(1e-30)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Prompt,
    Sequence,
    Fixed,
}

fn check_model(model_dir: &Path, mode: Mode) {
    let golden = load_golden(model_dir);
    let objective = ObjectiveConfig {
        beta_source: if matches!(mode, Mode::Sequence) { BetaSource::Sequence } else { BetaSource::Prompt },
        beta_min: 0.0,
        beta_max: f64::INFINITY,
        beta_reg: 0.0,
        fixed_beta: matches!(mode, Mode::Fixed).then_some(0.1),
        ..Default::default()
    };
    let out = common::fixtures::scratch(&format!("golden-{}-{mode:?}", model_dir.file_name().unwrap().to_string_lossy()));
    build_artifacts(&model_dir.join("model.onnx"), &out, &BuildOptions { objective, ..Default::default() }).unwrap();
    let m = Manifest::load(&out).unwrap();
    let spec = m.graph("train").unwrap();
    let (params, _) = read_safetensors(&out.join(&m.parameters_file)).unwrap();
    let mut feeds: Vec<(&str, HostTensor)> = Vec::new();
    for i in &spec.inputs {
        let t = match i.role.as_str() {
            "input_ids" => HostTensor::I64(golden.i64s["input_ids"].clone()),
            "attention_mask" => HostTensor::I64(golden.i64s["attention_mask"].clone()),
            "position_ids" => HostTensor::I64(golden.i64s["position_ids"].clone()),
            "completion_mask" => HostTensor::F32(golden.f32s["loss_mask"].clone()),
            "ref_logps" => HostTensor::F32(golden.f32s["ref_logps"].clone()),
            "parameter" => {
                // the golden's beta head is not the build's zero init
                let v = match golden.f32s.get(&i.name) {
                    Some(g) if i.name.starts_with("beta_head.") => g.clone(),
                    _ => {
                        let p = params.iter().find(|p| p.name == i.name).unwrap();
                        ArrayD::from_shape_vec(IxDyn(&p.shape), p.data.clone()).unwrap()
                    }
                };
                HostTensor::F32(v)
            }
            other => panic!("unexpected input role {other}"),
        };
        feeds.push((i.name.as_str(), t));
    }
    let mut session = SessionConfig::default().session_from_file(&out.join(&spec.file)).unwrap();
    let outs: HashMap<String, ArrayD<f32>> = run(&mut session, &feeds).unwrap().into_iter().filter_map(|(n, t)| t.as_f32().cloned().map(|a| (n, a))).collect();
    let (loss_key, grad_prefix) = match mode {
        Mode::Prompt => ("loss", "grad/"),
        Mode::Sequence => ("loss_sequence", "grad_sequence/"),
        Mode::Fixed => ("loss_fixed_beta", "grad_fixed_beta/"),
    };
    let label = format!("{} {mode:?}", model_dir.display());
    let loss = &outs[&spec.output("loss").unwrap().name];
    let r = rel(loss, &golden.f32s[loss_key].clone().into_shape_with_order(IxDyn(&[])).unwrap());
    assert!(r < 1e-4, "{label}: loss {loss} vs golden {}, relative error {r:.2e}", golden.f32s[loss_key]);
    let logps = &outs[&spec.outputs.iter().find(|o| o.name == "policy_logps").unwrap().name];
    assert!(rel(logps, &golden.f32s["policy_logps"]) < 1e-4, "{label}: policy log-probs differ");

    // Some gradients are zero in exact arithmetic (e.g. a key bias, which shifts every attention
    // score of a query equally); there both sides hold rounding noise, so relative errors are taken
    // against at least a millionth of the largest gradient.
    let largest = golden.f32s.iter().filter(|(k, _)| k.starts_with(grad_prefix)).map(|(_, g)| norm(g)).fold(0.0, f64::max);
    let mut compared = 0;
    for p in m.trainable() {
        let grad = &outs[&spec.output_for("gradient", &p.name).unwrap().name];
        let mut expected: Option<ArrayD<f32>> = None;
        for r in &p.initializers {
            let Some(g) = golden.f32s.get(&format!("{grad_prefix}{}", r.name)) else { continue };
            let g = if r.transposed { g.t().to_owned() } else { g.clone() };
            expected = Some(match expected {
                None => g,
                Some(e) => e + g,
            });
        }
        let Some(expected) = expected else {
            // sequence goldens carry head gradients only
            assert!(matches!(mode, Mode::Sequence) && !p.beta_head, "{label}: no golden gradient for {}", p.name);
            continue;
        };
        let r = diff(grad, &expected) / norm(&expected).max(1e-6 * largest);
        assert!(r < 1e-3, "{label}: gradient of {} off by {r:.2e} (relative)", p.name);
        compared += 1;
    }
    assert!(compared > 0, "{label}: no gradient compared");

    if matches!(mode, Mode::Prompt) {
        // default trainable set == the golden's parameter set
        let ours: BTreeSet<String> =
            m.parameters.iter().filter(|p| p.trainable && !p.beta_head).flat_map(|p| p.initializers.iter().map(|r| r.name.clone())).collect();
        let theirs: BTreeSet<String> =
            golden.f32s.keys().filter_map(|k| k.strip_prefix("grad/")).filter(|k| !k.starts_with("beta_head.")).map(str::to_string).collect();
        assert_eq!(ours, theirs, "{label}: trainable set differs from the golden's parameters");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn prompt_beta_matches_pytorch() {
    for m in common::fixtures::all_models() {
        check_model(&m, Mode::Prompt);
    }
}

#[test]
fn sequence_beta_matches_pytorch() {
    for m in common::fixtures::all_models() {
        check_model(&m, Mode::Sequence);
    }
}

#[test]
fn fixed_beta_matches_pytorch() {
    for m in common::fixtures::all_models() {
        check_model(&m, Mode::Fixed);
    }
}
