//! `build-graph --lora-rank` against PyTorch + PEFT autograd, and `train` on a LoRA build.
//!
//! Goldens: tests/fixtures/lora/<family>.{safetensors,json}, written by scripts/fixtures/make_lora_goldens.py
//! (PEFT LoRA rank 4, alpha 8 on the shared fixture models, non-zero A and B, float64 autograd of the
//! golden DPO loss). The train graph fed the same adapters and beta head gives the same loss and the
//! same gradient for every A, B and head parameter, and nothing else has a gradient or an optimizer
//! state.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use betadpo::dpo::model::lora::LoraOptions;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, HeadInput, Manifest, ObjectiveConfig};
use betadpo::run_layout;
use betadpo::runtime::{run, HostTensor, SessionConfig};
use betadpo::store::{read_safetensors, NamedTensor};
use common::cli::{assert_absent, assert_one_line_error, betadpo};
use common::fixtures::{read_tensors, repo, scratch, shared, Tensors};
use common::golden::{batch_feed, load_golden};
use ndarray::{ArrayD, Ix2, IxDyn};

fn norm(a: &ArrayD<f32>) -> f64 {
    a.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

fn diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}

/// PEFT's `[r, in]` / `[out, r]` matrices in the product's orientation (`[in, r]` / `[r, out]`).
fn transposed(t: &ArrayD<f32>) -> ArrayD<f32> {
    t.clone().into_dimensionality::<Ix2>().unwrap().t().to_owned().into_dyn()
}

/// Builds `family` with LoRA as the PEFT golden has it, runs its train graph with the golden's
/// adapters and beta head on the golden batch, and compares with PyTorch + PEFT.
fn check_family(family: &str) {
    let Some(dir) = shared(family) else { return };
    let golden = load_golden(&dir);
    let fixture = repo().join("tests/fixtures/lora");
    let peft: Tensors = read_tensors(&fixture.join(format!("{family}.safetensors")));
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join(format!("{family}.json"))).unwrap()).unwrap();
    let out = scratch(&format!("lora-golden-{family}"));
    // the PEFT goldens differentiate through the head's read of the hidden state (the joint head)
    let objective =
        ObjectiveConfig { beta_min: 0.0, beta_max: f64::INFINITY, beta_reg: 0.0, head_input: HeadInput::Raw, detach_head_input: false, ..Default::default() };
    let lora = LoraOptions { rank: meta["rank"].as_u64().unwrap() as usize, alpha: meta["alpha"].as_f64(), dropout: 0.0, targets: None };
    let opts = BuildOptions { objective, layout: LayoutChoice::Padded, lora: Some(lora), ..Default::default() };
    build_artifacts(&dir.join("model.onnx"), &out, &opts).unwrap_or_else(|e| panic!("{family}: {e}"));
    let m = Manifest::load(&out).unwrap();
    let spec = m.graph("train").unwrap();
    let l = m.lora.clone().expect("a lora section in the manifest");

    // the default targets are PEFT's modules: every projection inside the blocks
    let ours: BTreeSet<&str> = l.adapters.iter().map(|a| a.base_weight.as_str()).collect();
    let modules = meta["modules"].as_object().unwrap();
    let theirs: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs, "{family}: adapted weights");

    // parameter name -> PEFT tensor name
    let peft_name: HashMap<&str, String> = l
        .adapters
        .iter()
        .flat_map(|a| {
            let prefix = modules[&a.base_weight]["peft_prefix"].as_str().unwrap();
            [(a.a.as_str(), format!("{prefix}.lora_A.weight")), (a.b.as_str(), format!("{prefix}.lora_B.weight"))]
        })
        .collect();
    let mut feeds: Vec<(&str, HostTensor)> = Vec::new();
    for i in &spec.inputs {
        let t = match (batch_feed(&golden, &i.role), i.role.as_str()) {
            (Some(t), _) => t,
            (None, "parameter") if i.name.starts_with("beta_head.") => HostTensor::F32(golden.f32s[&i.name].clone()),
            (None, "parameter") => HostTensor::F32(transposed(&peft.f32s[&peft_name[i.name.as_str()]])),
            (None, other) => panic!("{family}: unexpected input role {other}"),
        };
        feeds.push((i.name.as_str(), t));
    }
    let mut session = SessionConfig::default().session_from_file(&out.join(&spec.file)).unwrap();
    let outs: HashMap<String, ArrayD<f32>> = run(&mut session, &feeds).unwrap().into_iter().filter_map(|(n, t)| t.as_f32().cloned().map(|a| (n, a))).collect();

    // the golden tolerances of tests/golden.rs
    let loss = outs[&spec.output("loss").unwrap().name].clone().into_shape_with_order(IxDyn(&[1])).unwrap();
    let r = diff(&loss, &peft.f32s["loss"]) / norm(&peft.f32s["loss"]);
    assert!(r < 1e-4, "{family}: loss {loss} vs PEFT {}, relative error {r:.2e}", peft.f32s["loss"]);
    let logps = &outs["policy_logps"];
    assert!(diff(logps, &peft.f32s["policy_logps"]) / norm(&peft.f32s["policy_logps"]) < 1e-4, "{family}: policy log-probs differ");
    let mut compared = BTreeSet::new();
    let mut worst = 0.0f64;
    for o in spec.outputs.iter().filter(|o| o.role == "gradient") {
        let p = o.parameter.as_deref().unwrap();
        let expected = match peft_name.get(p) {
            Some(n) => transposed(&peft.f32s[&format!("grad/{n}")]),
            None => peft.f32s[&format!("grad/{p}")].clone(),
        };
        assert!(norm(&expected) > 0.0, "{family}: the golden gradient of {p} is zero");
        let r = diff(&outs[&o.name], &expected) / norm(&expected);
        assert!(r < 1e-3, "{family}: gradient of {p} off by {r:.2e} (relative)");
        compared.insert(p.to_string());
        worst = worst.max(r);
    }
    eprintln!(
        "{family}: loss relative error {:.2e}, worst gradient relative error {worst:.2e} over {} parameters",
        diff(&loss, &peft.f32s["loss"]) / norm(&peft.f32s["loss"]),
        compared.len()
    );
    // gradients for exactly the adapters and the head: none for the base
    let adapters_and_head: BTreeSet<String> =
        l.adapters.iter().flat_map(|a| [a.a.clone(), a.b.clone()]).chain(["beta_head.weight".into(), "beta_head.bias".into()]).collect();
    assert_eq!(compared, adapters_and_head, "{family}: parameters with a gradient");
    assert_frozen_base(&out, &m, &adapters_and_head, family);
    let _ = std::fs::remove_dir_all(&out);
}

/// The base weights are frozen: no optimizer state, not parameter inputs of the train graph, no
/// node computing a gradient for them (the autodiff names a gradient `<tensor>_grad`). How the
/// frozen weights are stored (initializers, external data) is left open.
fn assert_frozen_base(art: &Path, m: &Manifest, trainable: &BTreeSet<String>, label: &str) {
    let l = m.lora.as_ref().unwrap();
    let with_state: BTreeSet<String> = m.graph("optimizer").unwrap().inputs.iter().filter(|i| i.role == "adam_m").filter_map(|i| i.parameter.clone()).collect();
    assert_eq!(&with_state, trainable, "{label}: AdamW state");
    let manifest_trainable: BTreeSet<String> = m.trainable().map(|p| p.name.clone()).collect();
    assert_eq!(&manifest_trainable, trainable, "{label}: trainable parameters");
    let spec = m.graph("train").unwrap();
    let fed: BTreeSet<String> = spec.inputs.iter().filter(|i| i.role == "parameter").map(|i| i.name.clone()).collect();
    assert_eq!(&fed, trainable, "{label}: parameters the train graph takes");
    let train = betadpo::onnx::load_model(&art.join(&spec.file)).unwrap().graph.unwrap();
    for a in &l.adapters {
        let grad = format!("{}_grad", a.base_weight);
        assert!(!train.node.iter().flat_map(|n| &n.output).any(|o| o.starts_with(&grad)), "{label}: a node computes {grad}");
    }
}

#[test]
fn gpt2_lora_matches_peft() {
    check_family("tiny-gpt2-ts");
}

#[test]
fn llama_lora_matches_peft() {
    check_family("tiny-llama-dynamo");
}

#[test]
fn lora_flags_are_checked() {
    let q = common::fixtures::quickstart();
    let model = q.join("model.onnx");
    let model = model.to_str().unwrap();
    let dir = scratch("lora-flags");
    let out = dir.join("art");
    let out_s = out.to_str().unwrap();
    let err =
        assert_one_line_error(&["build-graph", "--model", model, "--out", out_s, "--lora-rank", "4", "--lora-targets", "no_such_module"], "--lora-targets");
    assert!(err.contains("matches no weight") && err.contains("model.layers.0.self_attn.q_proj"), "candidates are listed with their module names: {err}");
    assert_absent(&out);
    assert_one_line_error(&["build-graph", "--model", model, "--out", out_s, "--lora-rank", "4", "--lora-dropout", "0.1"], "not supported yet");
    assert_one_line_error(&["build-graph", "--model", model, "--out", out_s, "--lora-rank", "0"], "--lora-rank");
    assert_one_line_error(&["build-graph", "--model", model, "--out", out_s, "--lora-alpha", "8"], "needs --lora-rank");
    assert_one_line_error(&["build-graph", "--model", model, "--out", out_s, "--lora-rank", "4", "--trainable", "head"], "--lora-rank");
    assert_absent(&out);
    // a narrower target set: only the attention queries
    let (code, _, err) = betadpo(&["build-graph", "--model", model, "--out", out_s, "--lora-rank", "2", "--lora-targets", r"q_proj$", "-q"]);
    assert_eq!(code, 0, "{err}");
    let m = Manifest::load(&out).unwrap();
    let l = m.lora.unwrap();
    assert!(!l.adapters.is_empty() && l.adapters.iter().all(|a| a.module.as_deref().is_some_and(|m| m.ends_with("q_proj"))), "{l:?}");
    assert_eq!((l.rank, l.alpha), (2, 4.0), "alpha defaults to 2 x rank");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tensors(path: &Path) -> HashMap<String, NamedTensor> {
    read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).0.into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// The reference log-probs a run computed (its cache file), by pair.
fn reference_logps(run: &Path) -> Vec<f32> {
    let dir = run.join("reference");
    let file = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "safetensors")).unwrap();
    tensors(&file)["ref_logps"].data.clone()
}

fn train(art: &Path, data: &Path, tokenizer: &Path, run: &Path, steps: &str, lr: &str) {
    train_with(art, data, tokenizer, run, steps, lr, &[]);
}

fn train_with(art: &Path, data: &Path, tokenizer: &Path, run: &Path, steps: &str, lr: &str, extra: &[&str]) {
    let mut args = vec![
        "train",
        "--artifacts",
        art.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        steps,
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--lr",
        lr,
        "--max-length",
        "128",
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = betadpo(&args);
    assert_eq!(code, 0, "train {}: {err}", art.display());
}

/// `betadpo train` on a LoRA build of the quickstart Llama: at step 0 the adapters are off (B = 0),
/// so the policy is the base model: the reference log-probs equal a full build's and the first
/// loss is ln 2; training moves A and B, lowers the loss, and leaves the base weights untouched
/// (the exported model carries them bit for bit, and the adapters as trained).
#[test]
fn train_runs_on_a_lora_build() {
    let q = common::fixtures::quickstart();
    let dir = scratch("lora-train");
    let text = std::fs::read_to_string(q.join("train.jsonl")).unwrap();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, text.lines().take(24).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let (art, full) = (dir.join("art"), dir.join("full"));
    let (code, _, err) = betadpo(&["build-graph", "--model", q.join("model.onnx").to_str().unwrap(), "--out", art.to_str().unwrap(), "--lora-rank", "4", "-q"]);
    assert_eq!(code, 0, "{err}");
    build_artifacts(&q.join("model.onnx"), &full, &BuildOptions::default()).unwrap();
    let tok = q.join("tokenizer.json");
    let (run, full_run) = (dir.join("run"), dir.join("full-run"));
    train(&art, &data, &tok, &run, "12", "1e-2");
    // One epoch (24 pairs, batches of 4), so the full build computes every pair's reference log-probs too.
    train(&full, &data, &tok, &full_run, "6", "1e-3");

    let (lora_ref, base_ref) = (reference_logps(&run), reference_logps(&full_run));
    assert_eq!(lora_ref.len(), base_ref.len());
    let worst = lora_ref.iter().zip(&base_ref).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("LoRA build vs full build reference log-probs: max |difference| {worst:e} over {} values", lora_ref.len());
    assert!(worst < 1e-4, "reference log-probs of the LoRA build differ from the base model's by {worst}");

    let log = betadpo::train::metrics::read_log(&run.join(run_layout::METRICS_FILE)).unwrap();
    let losses: Vec<f64> = log.iter().filter_map(|r| r.get("loss")?.as_f64()).collect();
    assert!(losses.len() >= 12, "{losses:?}");
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-5, "step 0 loss {} is not ln 2: the adapters are not off", losses[0]);
    let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    eprintln!("LoRA train losses: {losses:?}");
    assert!(last < losses[0] - 0.01, "the loss did not go down: {losses:?}");

    let m = Manifest::load(&art).unwrap();
    let l = m.lora.as_ref().unwrap();
    assert!(l.adapters.iter().all(|a| a.module.is_some()), "module names from hf_export.json");
    let initial = tensors(&art.join(&m.parameters_file));
    let trained = tensors(&run.join("final/params.safetensors"));
    let names: BTreeSet<&String> = trained.keys().collect();
    let expected: BTreeSet<String> = m.trainable().map(|p| p.name.clone()).collect();
    assert_eq!(names, expected.iter().collect(), "only adapters and the head are trained parameters");
    for a in &l.adapters {
        for p in [&a.a, &a.b] {
            assert!(trained[p].data != initial[p].data, "{p} did not change");
        }
        assert!(initial[&a.b].data.iter().all(|v| *v == 0.0), "{} starts at zero", a.b);
    }

    // export the run (adapters unmerged): base weights as in the model, adapters as trained
    let exported = dir.join("exported.onnx");
    let (code, _, err) = betadpo(&["export", "--run", run.to_str().unwrap(), "--out", exported.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let g = betadpo::onnx::load_model(&exported).unwrap().graph.unwrap();
    let source = betadpo::onnx::load_model(&q.join("model.onnx")).unwrap().graph.unwrap();
    let by_name = |g: &betadpo::onnx::GraphProto, n: &str| g.initializer.iter().find(|t| t.name == n).map(|t| betadpo::onnx::tensor_to_f32(t).unwrap());
    for a in &l.adapters {
        assert_eq!(by_name(&g, &a.base_weight), by_name(&source, &a.base_weight), "{} changed", a.base_weight);
        assert_eq!(by_name(&g, &a.b).as_ref(), Some(&trained[&a.b].data), "{} in the exported model", a.b);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Resuming a LoRA run is exact: 8 steps straight equal 4 steps, then `--resume` to 8, bit for bit
/// (constant learning rate: a linear schedule depends on --max-steps; the adapters carry no
/// randomness of their own, dropout is refused).
#[test]
fn lora_resume_is_exact() {
    let q = common::fixtures::quickstart();
    let dir = scratch("lora-resume");
    let text = std::fs::read_to_string(q.join("train.jsonl")).unwrap();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, text.lines().take(20).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let art = dir.join("art");
    let (code, _, err) = betadpo(&["build-graph", "--model", q.join("model.onnx").to_str().unwrap(), "--out", art.to_str().unwrap(), "--lora-rank", "2", "-q"]);
    assert_eq!(code, 0, "{err}");
    let tok = q.join("tokenizer.json");
    let (straight, split) = (dir.join("straight"), dir.join("split"));
    train_with(&art, &data, &tok, &straight, "8", "1e-2", &["--save-every", "2", "--lr-schedule", "constant"]);
    train_with(&art, &data, &tok, &split, "4", "1e-2", &["--save-every", "2", "--lr-schedule", "constant"]);
    // (without --resume, train refuses a run directory that holds checkpoints)
    train_with(&art, &data, &tok, &split, "8", "1e-2", &["--save-every", "2", "--lr-schedule", "constant", "--resume"]);
    let (a, b) = (tensors(&straight.join("final/params.safetensors")), tensors(&split.join("final/params.safetensors")));
    assert_eq!(a.keys().collect::<BTreeSet<_>>(), b.keys().collect::<BTreeSet<_>>());
    for (name, t) in &a {
        let same = t.data.iter().zip(&b[name].data).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name}: 8 straight steps and 4 + resume to 8 differ");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
