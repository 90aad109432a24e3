//! The exported model is usable from any ONNX Runtime binding: Python `onnxruntime` computes the
//! same beta as `betadpo infer`; and export fails clearly on a run that does not exist.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use betadpo::dpo::export::export_model;
use betadpo::dpo::{build_artifacts, BuildOptions};
use betadpo::text::PairTokenizer;
use betadpo::train::config::TrainConfig;
use betadpo::train::trainer::train;
use common::cli::betadpo;
use common::fixtures::quickstart;

fn trained_export(dir: &Path) -> PathBuf {
    let q = quickstart();
    let art = dir.join("art");
    build_artifacts(&q.join("model.onnx"), &art, &BuildOptions::default()).unwrap();
    let cfg = TrainConfig {
        artifacts: art.clone(),
        data: q.join("train.jsonl"),
        tokenizer: q.join("tokenizer.json"),
        out: dir.join("run"),
        max_steps: Some(12),
        lr: 1e-3,
        progress: false,
        ..Default::default()
    };
    train(&cfg).unwrap();
    let (code, _, err) = betadpo(&["export", "--run", dir.join("run").to_str().unwrap(), "--out", dir.join("model.onnx").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    dir.join("model.onnx")
}

#[test]
fn python_onnxruntime_agrees_with_infer() {
    if !common::fixtures::python_imports("onnxruntime, numpy", "the cross-binding check") {
        return;
    }
    let dir = common::fixtures::scratch("export-py");
    let model = trained_export(&dir);
    let prompts =
        ["User: Describe the lamp in one sentence.\nAssistant:", "User: Which one do you like more, the guitar or the planet?\nAssistant:", "User: hi"];
    let mut args = vec!["infer", "--json", "--model", model.to_str().unwrap(), "--tokenizer"];
    let tok = quickstart().join("tokenizer.json");
    args.push(tok.to_str().unwrap());
    for p in &prompts {
        args.push("--prompt");
        args.push(p);
    }
    let (code, out, err) = betadpo(&args);
    assert_eq!(code, 0, "{err}");
    let rust_betas: Vec<f64> = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["beta"].as_f64().unwrap()).collect();
    assert_eq!(rust_betas.len(), prompts.len());
    // Training moved the head away from its uniform init: betas differ between prompts.
    assert!(rust_betas.iter().any(|&b| (b - rust_betas[0]).abs() > 1e-6), "{rust_betas:?}");

    let t = PairTokenizer::from_files(&tok, None).unwrap();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| t.encode(p).unwrap()).collect();
    let script = r#"
import sys, json, numpy as np, onnxruntime as ort
ids = json.loads(sys.argv[2]); pad = int(sys.argv[3])
T = max(map(len, ids))
x = np.full((len(ids), T), pad, np.int64); m = np.zeros((len(ids), T), np.int64)
for i, r in enumerate(ids):
    x[i, :len(r)] = r; m[i, :len(r)] = 1
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feed = {"input_ids": x, "attention_mask": m}
if any(i.name == "position_ids" for i in s.get_inputs()):
    feed["position_ids"] = np.tile(np.arange(T, dtype=np.int64), (len(ids), 1))
logits, beta = s.run(["logits", "beta"], feed)
print(json.dumps([float(b) for b in beta]))
"#;
    let out =
        Command::new("python3").args(["-c", script, model.to_str().unwrap(), &serde_json::to_string(&ids).unwrap(), &t.pad_id().to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let py: Vec<f64> = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    for (r, p) in rust_betas.iter().zip(&py) {
        assert!((r - p).abs() < 1e-5, "betadpo infer {r} vs python onnxruntime {p}");
    }
}

#[test]
fn export_errors_are_clear() {
    let dir = common::fixtures::scratch("export-errors");
    let (code, _, err) = betadpo(&["export", "--run", dir.join("no-such-run").to_str().unwrap(), "--out", dir.join("m.onnx").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("no such run directory") && err.lines().count() == 1, "{err}");
    assert!(!dir.join("m.onnx").exists());
    // a run directory without any trained parameters
    std::fs::create_dir_all(dir.join("empty-run")).unwrap();
    let (code, _, err) = betadpo(&["export", "--run", dir.join("empty-run").to_str().unwrap(), "--out", dir.join("m.onnx").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("no final parameters"), "{err}");
}

#[test]
fn hidden_state_not_found_is_clear() {
    // logits computed by an elementwise op from the input: no MatMul/Gemm to read a hidden state from
    let dir = common::fixtures::scratch("nohidden");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    let g = m.graph.as_mut().unwrap();
    let last = g.node.last_mut().unwrap();
    last.op_type = "Softmax".into();
    last.input.truncate(1);
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &m);
    let (code, _, err) = betadpo(&["build-graph", "--model", path.to_str().unwrap(), "--out", dir.join("art").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot find the final hidden state") && err.contains("--hidden-state"), "{err}");
}

#[test]
fn exported_model_trained_values_differ_from_initial() {
    let dir = common::fixtures::scratch("export-values");
    let model = trained_export(&dir);
    let art = dir.join("art");
    let initial = dir.join("initial.onnx");
    export_model(&art, &art.join("params.safetensors"), &initial, &Default::default()).unwrap();
    let tok = quickstart().join("tokenizer.json");
    let beta_of = |m: &Path| -> f64 {
        let (code, out, err) = betadpo(&[
            "infer",
            "--json",
            "--model",
            m.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--prompt",
            "User: Describe the lamp in one sentence.\nAssistant:",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(out.lines().next().unwrap()).unwrap()["beta"].as_f64().unwrap()
    };
    // the untrained export reproduces the configured init exactly; the trained one has moved
    assert!((beta_of(&initial) - 0.1).abs() < 1e-6);
    assert!((beta_of(&model) - 0.1).abs() > 1e-4);
}

/// Hugging Face Optimum exports (a KV cache, a merged decoder) export without their cache: the
/// deployable model takes the model's inputs less `past_key_values.*`/`use_cache_branch`, returns
/// `logits` and `beta` only, gives PyTorch's logits on the golden batch (untrained parameters), and
/// `betadpo infer` runs it.
#[test]
fn optimum_exports_export_and_infer_without_their_cache() {
    use betadpo::runtime::{run, HostTensor, SessionConfig};
    let models: Vec<PathBuf> =
        common::fixtures::own_models().into_iter().filter(|m| m.file_name().unwrap().to_string_lossy().starts_with("optimum-")).collect();
    assert!(!models.is_empty(), "tests/fixtures/models/optimum-* are committed fixtures");
    for m in models {
        let name = m.file_name().unwrap().to_string_lossy().to_string();
        let dir = common::fixtures::scratch(&format!("export-{name}"));
        let art = dir.join("art");
        build_artifacts(&m.join("model.onnx"), &art, &BuildOptions::default()).unwrap();
        let exported = dir.join("model.onnx");
        export_model(&art, &art.join("params.safetensors"), &exported, &Default::default()).unwrap();

        let mut session = SessionConfig::default().session_from_file(&exported).unwrap();
        let inputs = betadpo::runtime::input_names(&session);
        let outputs = betadpo::runtime::output_names(&session);
        assert_eq!(outputs, ["logits", "beta"], "{name}");
        let golden = common::golden::load_golden(&m);
        let feeds: Vec<(&str, HostTensor)> = inputs
            .iter()
            .map(|i| match i.as_str() {
                "input_ids" | "attention_mask" | "position_ids" => (i.as_str(), HostTensor::I64(golden.i64s[i].clone())),
                other => panic!("{name}: the exported model takes {other}"),
            })
            .collect();
        let outs = run(&mut session, &feeds).unwrap();
        let logits = outs.iter().find(|(n, _)| n == "logits").unwrap().1.as_f32().unwrap();
        let want = &golden.f32s["logits"];
        let err = logits.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-4, "{name}: exported logits differ from PyTorch's by {err}");
        let beta = outs.iter().find(|(n, _)| n == "beta").unwrap().1.as_f32().unwrap();
        assert!(beta.iter().all(|b| (b - 0.1).abs() < 1e-6), "{name}: an untrained head gives beta_init, got {beta}");

        let tok = quickstart().join("tokenizer.json");
        let (code, out, err) =
            betadpo(&["infer", "--json", "--model", exported.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap(), "--prompt", "User: hi\nAssistant:"]);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(out.contains("\"beta\""), "{name}: {out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
