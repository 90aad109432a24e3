//! `build-graph --model <Hugging Face folder>` against transformers: for every family under
//! tests/fixtures/hf (made by scripts/fixtures/make_hf_import_fixtures.py), the graph betadpo writes from
//! config.json + model.safetensors gives transformers' float64 logits, and the train graph built from the
//! folder gives PyTorch's DPO loss and the gradient of every checkpoint tensor, in the padded and the packed
//! layout. Architectures it does not write, and broken folders, are refused in one line.

mod common;

use common::golden::{diff, golden_train_outputs, load_golden, norm, rel, Golden};

use std::path::{Path, PathBuf};

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BetaSource, BuildOptions, HeadInput, Layout, ObjectiveConfig};
use betadpo::graph::{compute_in_float32, Graph};
use betadpo::runtime::{run, HostTensor, SessionConfig};

const FAMILIES: &[&str] = &["gemma", "gemma2", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3"];

fn folder(family: &str) -> PathBuf {
    common::fixtures::repo().join("tests/fixtures/hf").join(family)
}

/// The imported graph's logits on the golden batch, run by ONNX Runtime.
fn imported_logits(dir: &Path, golden: &Golden) -> ndarray::ArrayD<f32> {
    let loaded = betadpo::model_import::load(dir).unwrap();
    let mut graph = Graph::from_model(loaded.model).unwrap();
    compute_in_float32(&mut graph).unwrap();
    let bytes = prost::Message::encode_to_vec(&graph.into_model());
    let mut session = SessionConfig::default().session_from_bytes(&bytes).unwrap();
    let feeds: Vec<(&str, HostTensor)> =
        ["input_ids", "attention_mask", "position_ids"].iter().map(|n| (*n, HostTensor::I64(golden.i64s[*n].clone()))).collect();
    let out = run(&mut session, &feeds).unwrap();
    out.into_iter().find(|(n, _)| n == "logits").and_then(|(_, t)| t.as_f32().cloned()).unwrap()
}

#[test]
fn logits_match_transformers() {
    for family in FAMILIES {
        let dir = folder(family);
        let golden = load_golden(&dir);
        let logits = imported_logits(&dir, &golden);
        let r = rel(&logits, &golden.f32s["logits"]);
        eprintln!("{family}: logits relative error {r:.2e}");
        assert!(r <= 1e-5, "{family}: logits differ from transformers' by {r:.2e} (relative)");
    }
}

fn objective(fixed: bool) -> ObjectiveConfig {
    ObjectiveConfig {
        beta_source: BetaSource::Prompt,
        beta_min: 0.0,
        beta_max: f64::INFINITY,
        beta_reg: 0.0,
        head_input: HeadInput::Raw,
        detach_head_input: false,
        fixed_beta: fixed.then_some(0.1),
        ..Default::default()
    }
}

/// The train graph built from the folder gives PyTorch's loss and the gradient of every checkpoint tensor.
fn check_gradients(family: &str, fixed: bool, layout: Layout) {
    let dir = folder(family);
    let golden = load_golden(&dir);
    let choice = if layout == Layout::Packed { LayoutChoice::Packed } else { LayoutChoice::Padded };
    let opts = BuildOptions { objective: objective(fixed), layout: choice, ..Default::default() };
    let (m, outs) = golden_train_outputs(&dir, &golden, &opts, &format!("hf-{fixed}")).unwrap_or_else(|e| panic!("{family} {layout:?}: {e}"));
    assert_eq!(m.layout, layout);
    let spec = m.graph("train").unwrap();
    let (loss_key, prefix) = if fixed { ("loss_fixed_beta", "grad_fixed_beta/") } else { ("loss", "grad/") };
    let label = format!("{family} {layout:?} fixed={fixed}");
    let loss = &outs[&spec.output("loss").unwrap().name];
    let r = rel(&loss.clone().into_shape_with_order(ndarray::IxDyn(&[1])).unwrap(), &golden.f32s[loss_key]);
    assert!(r < 1e-4, "{label}: loss {loss} vs {}, relative error {r:.2e}", golden.f32s[loss_key]);
    let largest = golden.f32s.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, g)| norm(g)).fold(0.0, f64::max);
    let mut compared = 0;
    for p in m.trainable() {
        let grad = &outs[&spec.output_for("gradient", &p.name).unwrap().name];
        let key = format!("{prefix}{}", p.name);
        let expected = golden.f32s.get(&key).unwrap_or_else(|| panic!("{label}: no golden gradient {key}"));
        // as tests/golden.rs: gradients that are zero in exact arithmetic hold rounding noise on both sides
        let r = diff(grad, expected) / norm(expected).max(1e-6 * largest);
        assert!(r < 1e-3, "{label}: gradient of {} off by {r:.2e} (relative)", p.name);
        compared += 1;
    }
    let checkpoint_tensors = golden.f32s.keys().filter(|k| k.starts_with(prefix) && !k.contains("beta_head.")).count();
    let expected = if fixed { checkpoint_tensors } else { checkpoint_tensors + 2 };
    assert_eq!(compared, expected, "{label}: every checkpoint tensor (and the beta head) trains");
}

#[test]
fn gradients_match_pytorch_padded() {
    for family in FAMILIES {
        check_gradients(family, false, Layout::Padded);
        check_gradients(family, true, Layout::Padded);
    }
}

/// Every family trains in the packed layout (sliding windows included: they are computed from the
/// positions) with PyTorch's padded-batch loss and gradients.
#[test]
fn gradients_match_pytorch_packed() {
    for family in FAMILIES {
        check_gradients(family, false, Layout::Packed);
    }
}

fn write_folder(name: &str, config: &str) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir
}

fn build_error(model: &Path) -> String {
    let out = model.parent().unwrap().join(format!("{}-artifacts", model.file_name().unwrap().to_string_lossy()));
    let e = build_artifacts(model, &out, &BuildOptions::default()).err().expect("the build is refused").to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(!out.exists(), "nothing is written");
    e
}

#[test]
fn unsupported_architecture_is_refused_in_one_line() {
    let dir = write_folder("hf-falcon", r#"{"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 64}"#);
    let e = build_error(&dir);
    assert!(e.contains("FalconForCausalLM") && e.contains("scripts/tools/export_hf.py"), "{e}");
}

#[test]
fn broken_folders_are_refused_in_one_line() {
    let llama = std::fs::read_to_string(folder("llama").join("config.json")).unwrap();
    let no_weights = write_folder("hf-no-weights", &llama);
    assert!(build_error(&no_weights).contains("model.safetensors"));
    let wrong_shape = write_folder("hf-wrong-shape", &llama.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"));
    std::fs::copy(folder("llama").join("model.safetensors"), wrong_shape.join("model.safetensors")).unwrap();
    let e = build_error(&wrong_shape);
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]"), "{e}");
    let not_json = write_folder("hf-not-json", "{");
    assert!(build_error(&not_json).contains("not JSON"));
    let empty_dir = common::fixtures::scratch("hf-empty");
    assert!(build_error(&empty_dir).contains("not an ONNX model file"));
}

/// `export --hf` from artifacts built on a folder writes the folder's checkpoint back (untrained
/// parameters: every tensor equal, under its own name) and its config, with no hf_export.json anywhere.
#[test]
fn export_hf_writes_the_folders_checkpoint_back() {
    for family in ["gpt2", "llama"] {
        let dir = folder(family);
        let art = common::fixtures::scratch(&format!("hf-export-art-{family}"));
        let out = art.join("a");
        build_artifacts(&dir, &out, &BuildOptions::default()).unwrap();
        let hf = art.join("hf");
        betadpo::dpo::export::hf::export_hf(&out, &out.join("params.safetensors"), &hf, None, None).unwrap();
        let (ours, _) = betadpo::store::read_safetensors(&hf.join("model.safetensors")).unwrap();
        let (theirs, _) = betadpo::store::read_safetensors(&dir.join("model.safetensors")).unwrap();
        let names = |v: &[betadpo::store::NamedTensor]| v.iter().map(|t| t.name.clone()).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(names(&ours), names(&theirs), "{family}: checkpoint tensor names");
        for t in &theirs {
            assert_eq!(ours.iter().find(|o| o.name == t.name).unwrap(), t, "{family}: {}", t.name);
        }
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], family, "{family}: config.json written back");
    }
}

/// LoRA adapters sit on the checkpoint's projections under their Hugging Face module names (PEFT's
/// `base_model.model.<module>`), and `--lora-targets` matches those names.
#[test]
fn lora_adapters_carry_hugging_face_module_names() {
    let dir = folder("qwen2");
    let out = common::fixtures::scratch("hf-lora").join("a");
    let lora = betadpo::dpo::model::lora::LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: Some(regex::Regex::new(r"q_proj|v_proj").unwrap()) };
    let report = build_artifacts(&dir, &out, &BuildOptions { lora: Some(lora), ..Default::default() }).unwrap();
    let modules: Vec<String> = report.manifest.lora.unwrap().adapters.iter().map(|a| a.module.clone().unwrap()).collect();
    let expected: Vec<String> = (0..2).flat_map(|l| ["q_proj", "v_proj"].map(|p| format!("model.layers.{l}.self_attn.{p}"))).collect();
    let mut sorted = modules.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
}

/// `infer` on a model built from a folder follows the generation_config.json beside the tokenizer: it stops
/// at any of its `eos_token_id` (here the list of tokens that could begin the plain greedy continuation:
/// nothing is generated), a bare `--generate` continues for its `max_new_tokens` exactly as `--generate N`
/// does, a number given to `--generate` overrides it, and sampling it asks for is named as not followed.
#[test]
fn infer_follows_the_generation_config_beside_the_tokenizer() {
    let dir = folder("llama");
    let work = common::fixtures::scratch("hf-generation-config");
    let art = work.join("a");
    build_artifacts(&dir, &art, &BuildOptions::default()).unwrap();
    let model = work.join("m.onnx");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (code, _, err) = common::cli::betadpo(&["export", "--artifacts", &path(&art), "--out", &path(&model)]);
    assert_eq!(code, 0, "{err}");
    let tok = work.join("tok");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), tok.join(f)).unwrap();
    }
    let infer = |generation: Option<&str>, generate: &[&str]| -> (i32, String, String) {
        let config = tok.join("generation_config.json");
        match generation {
            Some(text) => std::fs::write(&config, text).unwrap(),
            None => std::fs::remove_file(&config).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }).unwrap(),
        }
        let mut args = vec!["infer", "--json", "--model", model.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap(), "--prompt", "hello there"];
        args.push("--generate");
        args.extend(generate);
        common::cli::betadpo(&args)
    };
    let completion = |generation: Option<&str>, generate: &[&str]| -> String {
        let (code, out, err) = infer(generation, generate);
        assert_eq!(code, 0, "{err}");
        let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        row["completion"].as_str().unwrap().to_string()
    };
    let greedy = completion(None, &["6"]);
    let tokenizer = tokenizers::Tokenizer::from_file(tok.join("tokenizer.json")).unwrap();
    let starts = |id: &u32| tokenizer.decode(&[*id], false).is_ok_and(|t| !t.is_empty() && greedy.starts_with(&t));
    let firsts: Vec<u32> = (0..tokenizer.get_vocab_size(true) as u32).filter(starts).collect();
    assert!(!firsts.is_empty(), "no token begins {greedy:?}");
    assert_eq!(completion(Some(&format!(r#"{{"eos_token_id": {firsts:?}}}"#)), &["6"]), "", "greedy continuation {greedy:?}");
    let three = completion(None, &["3"]);
    assert!(!three.is_empty() && greedy.starts_with(&three) && three != greedy, "{three:?} of {greedy:?}");
    assert_eq!(completion(Some(r#"{"max_new_tokens": 3}"#), &[]), three);
    assert_eq!(completion(Some(r#"{"max_new_tokens": 3}"#), &["6"]), greedy);
    let (_, _, note) = infer(Some(r#"{"do_sample": true, "temperature": 0.6}"#), &["2"]);
    assert!(note.contains("sampling (temperature 0.6); betadpo continues greedily"), "{note}");
    let (code, _, err) = infer(None, &[]);
    assert!(code != 0 && err.contains("--generate") && err.lines().count() == 1, "{err}");
}
