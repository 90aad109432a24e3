//! Deploying LoRA adapters: `export --merge` (folded into the weights), `export --adapter` (ONNX
//! Runtime's adapter file beside a model that takes the adapters as inputs) and `export --hf` on
//! LoRA artifacts (a PEFT directory).
//!
//! Independent truth: the PEFT goldens of tests/fixtures/lora (scripts/fixtures/make_lora_goldens.py: the
//! shared fixture models wrapped by PEFT with non-zero adapters, their policy log-probs computed by
//! PyTorch), the shared golden's base-model logits, and ONNX Runtime's own reading of the adapter
//! file (Python `onnxruntime`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use betadpo::dpo::export::{export_model, AdapterForm};
use betadpo::dpo::model::lora::LoraOptions;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, HeadInput, Manifest, ObjectiveConfig};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use betadpo::store::{read_safetensors, write_safetensors, NamedTensor};
use common::cli::betadpo;
use common::fixtures::{read_tensors, repo, scratch, shared, Tensors};
use common::golden::load_golden;
use ndarray::{ArrayD, Axis, Ix2, Ix3};

struct Built {
    dir: PathBuf,
    art: PathBuf,
    /// The PEFT golden's adapters and the golden beta head, as a parameters file.
    params: PathBuf,
    golden: Tensors,
    peft: Tensors,
    meta: serde_json::Value,
}

/// A copy of the shared fixture model with a Hugging Face name map beside it (from golden.json's
/// initializer -> parameter map), built with LoRA as the PEFT golden has it; the golden's adapters
/// written as the trained parameters.
fn build(family: &str, label: &str) -> Option<Built> {
    let src = shared(family)?;
    let dir = scratch(&format!("lora-export-{family}-{label}"));
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    for f in ["model.onnx", "model.onnx.data"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), model_dir.join(f)).unwrap();
        }
    }
    write_name_map(&src, &model_dir);
    let fixture = repo().join("tests/fixtures/lora");
    let peft = read_tensors(&fixture.join(format!("{family}.safetensors")));
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join(format!("{family}.json"))).unwrap()).unwrap();
    let art = dir.join("art");
    let objective = ObjectiveConfig { beta_min: 0.0, beta_max: f64::INFINITY, beta_reg: 0.0, head_input: HeadInput::Raw, ..Default::default() };
    let lora = LoraOptions { rank: meta["rank"].as_u64().unwrap() as usize, alpha: meta["alpha"].as_f64(), dropout: 0.0, targets: None };
    let opts = BuildOptions { objective, layout: LayoutChoice::Padded, lora: Some(lora), ..Default::default() };
    build_artifacts(&model_dir.join("model.onnx"), &art, &opts).unwrap_or_else(|e| panic!("{family}: {e}"));
    let golden = load_golden(&src);
    let m = Manifest::load(&art).unwrap();
    let mut tensors = Vec::new();
    for a in &m.lora.as_ref().unwrap().adapters {
        let module = a.module.as_deref().expect("the name map gives every adapter its module");
        for (name, which) in [(&a.a, "lora_A"), (&a.b, "lora_B")] {
            let t = peft.f32s[&format!("base_model.model.{module}.{which}.weight")].clone().into_dimensionality::<Ix2>().unwrap();
            let t = t.t().as_standard_layout().into_owned();
            tensors.push(NamedTensor { name: name.clone(), shape: t.shape().to_vec(), data: t.into_raw_vec_and_offset().0 });
        }
    }
    for h in ["beta_head.weight", "beta_head.bias"] {
        let t = &golden.f32s[h];
        tensors.push(NamedTensor { name: h.into(), shape: t.shape().to_vec(), data: t.iter().copied().collect() });
    }
    let params = dir.join("trained.safetensors");
    write_safetensors(&params, &tensors, None).unwrap();
    Some(Built { dir, art, params, golden, peft, meta })
}

/// `hf_export.json` as scripts/tools/export_hf.py writes it, made from golden.json (one tensor per
/// PyTorch parameter: tied copies are left out, they are not adapted).
fn write_name_map(src: &Path, model_dir: &Path) {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("golden.json")).unwrap()).unwrap();
    let model = betadpo::onnx::load_model(&src.join("model.onnx")).unwrap().graph.unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut tensors = Vec::new();
    for (init, p) in meta["initializer_to_parameter"].as_object().unwrap() {
        let name = p["parameter"].as_str().unwrap();
        let transposed = p["transposed"].as_bool().unwrap();
        if !seen.insert(name.to_string()) {
            continue;
        }
        let dims = &model.initializer.iter().find(|t| &t.name == init).unwrap().dims;
        let mut shape: Vec<i64> = dims.clone();
        if transposed {
            shape.reverse();
        }
        tensors.push(serde_json::json!({"name": name, "initializer": init, "transposed": transposed, "shape": shape, "dtype": "F32"}));
    }
    let map = serde_json::json!({
        "format": "betadpo-hf-map", "format_version": 1, "lm_head_input": null,
        "config": {"_name_or_path": "shared-fixture"}, "generation_config": null, "tensors": tensors,
    });
    std::fs::write(model_dir.join("hf_export.json"), serde_json::to_string(&map).unwrap()).unwrap();
}

/// The model's logits on the golden batch, through ONNX Runtime.
fn logits(model: &Path, golden: &Tensors) -> ArrayD<f32> {
    let mut s = SessionConfig::default().session_from_file(model).unwrap();
    let names = betadpo::runtime::input_names(&s);
    let feeds: Vec<(&str, HostTensor)> = ["input_ids", "attention_mask", "position_ids"]
        .into_iter()
        .filter(|n| names.iter().any(|x| x == n))
        .map(|n| (n, HostTensor::I64(golden.i64s[n].clone())))
        .collect();
    assert_eq!(feeds.len(), names.len(), "{}: inputs {names:?}", model.display());
    run(&mut s, &feeds).unwrap().into_iter().find(|(n, _)| n == "logits").unwrap().1.as_f32().unwrap().clone()
}

/// Sum over answer tokens of log softmax(logits[t-1])[id[t]]: the golden's `policy_logps`.
fn policy_logps(logits: &ArrayD<f32>, golden: &Tensors) -> Vec<f64> {
    let l = logits.view().into_dimensionality::<Ix3>().unwrap();
    let (ids, mask) = (&golden.i64s["input_ids"], &golden.f32s["loss_mask"]);
    (0..l.len_of(Axis(0)))
        .map(|r| {
            (1..l.len_of(Axis(1)))
                .filter(|&t| mask[[r, t]] > 0.0)
                .map(|t| {
                    let row = l.index_axis(Axis(0), r);
                    let v = row.index_axis(Axis(0), t - 1);
                    let max = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let lse = max + v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                    v[ids[[r, t]] as usize] as f64 - lse
                })
                .sum()
        })
        .collect()
}

fn max_abs(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_family(family: &str) {
    let Some(b) = build(family, "forms") else { return };
    let out = |f: &str| b.dir.join(f);
    export_model(&b.art, &b.params, &out("unmerged.onnx"), &AdapterForm::Baked).unwrap();
    export_model(&b.art, &b.params, &out("merged.onnx"), &AdapterForm::Merged).unwrap();
    let adapter_file = out("policy.onnx_adapter");
    export_model(&b.art, &b.params, &out("with-inputs.onnx"), &AdapterForm::OrtAdapter(adapter_file.clone())).unwrap();

    let unmerged = logits(&out("unmerged.onnx"), &b.golden);
    let merged = logits(&out("merged.onnx"), &b.golden);
    let d = max_abs(&merged, &unmerged);
    assert!(d < 1e-5, "{family}: merged vs unmerged logits differ by {d}");
    // the merged model is a plain model: no adapter factor, no node reading one
    let g = betadpo::onnx::load_model(&out("merged.onnx")).unwrap().graph.unwrap();
    let factor = |n: &str| n.contains(".lora_A") || n.contains(".lora_B");
    assert!(!g.initializer.iter().any(|t| factor(&t.name)) && !g.input.iter().any(|i| factor(&i.name)), "{family}: factors left in the merged model");
    assert!(!g.node.iter().any(|n| n.input.iter().any(|x| factor(x))), "{family}: a merged node reads a factor");

    // both equal PyTorch + PEFT with these adapters (its policy log-probs, from its logits)
    let theirs: Vec<f64> = b.peft.f32s["policy_logps"].iter().map(|&v| v as f64).collect();
    for (label, l) in [("merged", &merged), ("unmerged", &unmerged)] {
        let ours = policy_logps(l, &b.golden);
        for (o, t) in ours.iter().zip(&theirs) {
            assert!((o - t).abs() <= 1e-4 * t.abs().max(1.0), "{family} {label}: log-prob {o} vs PEFT {t}");
        }
    }
    // the adapters changed the model: not a comparison of two base models
    let base = &b.golden.f32s["logits"];
    assert!(max_abs(&merged, base) > 1e-2, "{family}: the adapters change nothing");
    // without its adapter the input-taking model is the base model (B's default is 0)
    let plain = logits(&out("with-inputs.onnx"), &b.golden);
    let d = max_abs(&plain, base);
    assert!(d < 1e-4, "{family}: the adapter-input model without an adapter is {d} from the base");
    if common::fixtures::python_imports("onnxruntime, numpy", "the adapter-file check") {
        let py = python_with_adapter(&out("with-inputs.onnx"), &adapter_file, &b);
        let d = max_abs(&py, &unmerged);
        assert!(d < 1e-5, "{family}: python onnxruntime with the adapter file vs the unmerged model: {d}");
    }
    let _ = std::fs::remove_dir_all(&b.dir);
}

/// Logits from Python onnxruntime with the adapter file active.
fn python_with_adapter(model: &Path, adapter: &Path, b: &Built) -> ArrayD<f32> {
    let feeds = b.dir.join("feeds.safetensors");
    let ids: Vec<f32> = b.golden.i64s["input_ids"].iter().map(|&v| v as f32).collect();
    let mask: Vec<f32> = b.golden.i64s["attention_mask"].iter().map(|&v| v as f32).collect();
    let shape = b.golden.i64s["input_ids"].shape().to_vec();
    write_safetensors(
        &feeds,
        &[
            NamedTensor { name: "input_ids".into(), shape: shape.clone(), data: ids },
            NamedTensor { name: "attention_mask".into(), shape: shape.clone(), data: mask },
        ],
        None,
    )
    .unwrap();
    let out = b.dir.join("py-logits.npy");
    let script = r#"
import sys, json, numpy as np, onnxruntime as ort
model, adapter, feeds, out = sys.argv[1:5]
import struct
raw = open(feeds, "rb").read(); n = struct.unpack("<Q", raw[:8])[0]; header = json.loads(raw[8:8 + n]); body = raw[8 + n:]
inputs = {}
for k, v in header.items():
    if k == "__metadata__": continue
    a, e = v["data_offsets"]
    inputs[k] = np.frombuffer(body[a:e], dtype=np.float32).reshape(v["shape"]).astype(np.int64)
s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
names = [i.name for i in s.get_inputs()]
if "position_ids" in names:
    inputs["position_ids"] = np.broadcast_to(np.arange(inputs["input_ids"].shape[1]), inputs["input_ids"].shape).astype(np.int64)
a = ort.LoraAdapter(); a.Load(adapter)
ro = ort.RunOptions(); ro.add_active_adapter(a)
logits = s.run(["logits"], inputs, ro)[0]
np.save(out, logits.astype(np.float32))
"#;
    let r = Command::new("python3")
        .args(["-c", script, model.to_str().unwrap(), adapter.to_str().unwrap(), feeds.to_str().unwrap(), out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    read_npy_f32(&out)
}

fn read_npy_f32(path: &Path) -> ArrayD<f32> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape_text = &header[header.find("'shape': (").unwrap() + 10..];
    let shape: Vec<usize> = shape_text[..shape_text.find(')').unwrap()].split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data: Vec<f32> = bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    ArrayD::from_shape_vec(shape, data).unwrap()
}

#[test]
fn llama_merged_unmerged_and_adapter_file_agree_with_peft() {
    check_family("tiny-llama-dynamo");
}

#[test]
fn gpt2_merged_unmerged_and_adapter_file_agree_with_peft() {
    check_family("tiny-gpt2-ts");
}

/// `export --hf` on LoRA artifacts writes PEFT's directory: its tensors are exactly PEFT's own
/// state dict (names, [r, in] / [out, r] shapes, values) for the adapters the golden was made with.
fn check_peft_dir(family: &str, conv1d: bool) {
    let Some(b) = build(family, "peft") else { return };
    let dir = b.dir.join("peft");
    let (code, out, err) = betadpo(&["export", "--artifacts", b.art.to_str().unwrap(), "--hf", dir.to_str().unwrap()]);
    // --artifacts exports the initial parameters: B = 0 and the build's own A
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("adapter_model.safetensors"), "{out}");
    let initial: HashMap<String, NamedTensor> =
        read_safetensors(&dir.join("adapter_model.safetensors")).unwrap().0.into_iter().map(|t| (t.name.clone(), t)).collect();
    assert!(initial.iter().filter(|(n, _)| n.ends_with("lora_B.weight")).all(|(_, t)| t.data.iter().all(|v| *v == 0.0)));
    // the trained parameters: the PEFT golden's adapters come back under PEFT's names
    betadpo::dpo::export::hf::export_hf(&b.art, &b.params, &dir, None, None).unwrap();
    let (written, meta) = read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let peft_names: Vec<&String> = b.peft.f32s.keys().filter(|k| k.starts_with("base_model.") && !k.starts_with("grad/")).collect();
    assert_eq!(written.len(), peft_names.len(), "{family}: tensor count");
    for t in &written {
        let want = b.peft.f32s.get(&t.name).unwrap_or_else(|| panic!("{family}: {} is not a PEFT name", t.name));
        assert_eq!(t.shape, want.shape(), "{family}: {}", t.name);
        assert!(t.data.iter().zip(want.iter()).all(|(a, b)| a == b), "{family}: {} values", t.name);
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"].as_u64(), b.meta["rank"].as_u64());
    assert_eq!(config["lora_alpha"].as_f64(), b.meta["alpha"].as_f64());
    assert_eq!(config["fan_in_fan_out"], conv1d, "{family}");
    let modules: std::collections::BTreeSet<&str> = config["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let golden_modules: std::collections::BTreeSet<&str> = b.meta["modules"].as_object().unwrap().values().map(|m| m["module"].as_str().unwrap()).collect();
    assert_eq!(modules, golden_modules, "{family}");
    assert!(dir.join("beta_head.safetensors").exists() && dir.join("beta_head.json").exists());
    let _ = std::fs::remove_dir_all(&b.dir);
}

#[test]
fn llama_peft_directory_holds_peft_names() {
    check_peft_dir("tiny-llama-dynamo", false);
}

#[test]
fn gpt2_peft_directory_sets_fan_in_fan_out() {
    check_peft_dir("tiny-gpt2-ts", true);
}

#[test]
fn merge_and_adapter_are_refused_without_lora() {
    let Some(src) = shared("tiny-llama-dynamo") else { return };
    let dir = scratch("lora-export-refused");
    let art = dir.join("art");
    build_artifacts(&src.join("model.onnx"), &art, &BuildOptions { layout: LayoutChoice::Padded, ..Default::default() }).unwrap();
    let e = export_model(&art, &art.join("params.safetensors"), &dir.join("m.onnx"), &AdapterForm::Merged).unwrap_err().to_string();
    assert!(e.contains("no LoRA adapters"), "{e}");
    assert!(!dir.join("m.onnx").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `infer --adapter FILE` makes the adapter file active: the betas equal the merged model's, and
/// differ from the same model without the adapter. A file that is not an adapter is one line.
#[test]
fn infer_with_the_adapter_file_equals_the_merged_model() {
    let q = common::fixtures::quickstart();
    let dir = scratch("lora-export-infer");
    let art = dir.join("art");
    let (code, _, err) = betadpo(&["build-graph", "--model", q.join("model.onnx").to_str().unwrap(), "--out", art.to_str().unwrap(), "--lora-rank", "4", "-q"]);
    assert_eq!(code, 0, "{err}");
    // "trained" parameters: every factor and the head moved away from their init
    let (mut tensors, _) = read_safetensors(&art.join("params.safetensors")).unwrap();
    for (k, t) in tensors.iter_mut().enumerate() {
        for (i, v) in t.data.iter_mut().enumerate() {
            *v += 0.05 * (((i * 7 + k * 13) % 17) as f32 / 8.0 - 1.0);
        }
    }
    let params = dir.join("trained.safetensors");
    write_safetensors(&params, &tensors, None).unwrap();
    let (merged, inputs, file) = (dir.join("merged.onnx"), dir.join("inputs.onnx"), dir.join("a.onnx_adapter"));
    export_model(&art, &params, &merged, &AdapterForm::Merged).unwrap();
    export_model(&art, &params, &inputs, &AdapterForm::OrtAdapter(file.clone())).unwrap();
    let tok = q.join("tokenizer.json");
    let infer = |model: &Path, extra: &[&str]| -> Vec<f64> {
        let mut args = vec!["infer", "--json", "--model", model.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
        args.extend(["--prompt", "User: Describe the lamp in one sentence.\nAssistant:", "--prompt", "User: hi"]);
        args.extend_from_slice(extra);
        let (code, out, err) = betadpo(&args);
        assert_eq!(code, 0, "{err}");
        out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["beta"].as_f64().unwrap()).collect()
    };
    let want = infer(&merged, &[]);
    let with = infer(&inputs, &["--adapter", file.to_str().unwrap()]);
    let without = infer(&inputs, &[]);
    for (w, g) in want.iter().zip(&with) {
        assert!((w - g).abs() < 1e-5, "merged {want:?} vs with the adapter file {with:?}");
    }
    assert!(want.iter().zip(&without).any(|(w, g)| (w - g).abs() > 1e-4), "the adapter changes nothing: {want:?} vs {without:?}");
    let not_adapter = dir.join("not.onnx_adapter");
    std::fs::write(&not_adapter, b"TORTnot a flatbuffer").unwrap();
    let (code, _, err) = betadpo(&[
        "infer",
        "--model",
        inputs.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--prompt",
        "hi",
        "--adapter",
        not_adapter.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not an ONNX Runtime adapter file") && err.trim().lines().count() == 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
