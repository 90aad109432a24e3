//! `export --hf` against what transformers itself writes and computes (`hf_reference.*`, made by
//! scripts/fixtures/make_hf_reference.py): on untrained artifacts the checkpoint equals `save_pretrained`'s
//! tensor for tensor (SHA-256 of the bytes; tied weights once) with the same config.json, and ORT's
//! logits of `export`'s ONNX model equal transformers' logits of that checkpoint; after a
//! deterministic change of every trained parameter, the checkpoint equals transformers' perturbed
//! one and ORT's logits its logits, and the documented beta-head loader on transformers' hidden
//! state gives ORT's beta. Families: GPT-2 (TorchScript: tied weight stored twice, one transposed),
//! Llama (dynamo: transposed copies), Qwen2 (tied weight stored once), Gemma (norms stored as 1 + w).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use betadpo::dpo::export::export_model;
use betadpo::dpo::export::hf::export_hf;
use betadpo::dpo::{build_artifacts, BuildOptions, Manifest};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use betadpo::store::{read_safetensors, write_safetensors, NamedTensor};
use common::cli::betadpo;
use ndarray::ArrayD;
use serde_json::Value;
use sha2::{Digest, Sha256};

const FAMILIES: &[&str] = &["gpt2", "llama", "qwen2", "gemma"];

fn fixture(family: &str) -> PathBuf {
    common::fixtures::repo().join("tests/fixtures/models").join(family)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Reference {
    json: Value,
    f32s: HashMap<String, ArrayD<f32>>,
    i64s: HashMap<String, ArrayD<i64>>,
}

fn reference(family: &str) -> Reference {
    let dir = fixture(family);
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("hf_reference.json")).unwrap()).unwrap();
    let t = common::fixtures::read_tensors(&dir.join("hf_reference.safetensors"));
    Reference { json, f32s: t.f32s, i64s: t.i64s }
}

/// The perturbation scripts/fixtures/make_hf_reference.py applies, element `k` of a checkpoint tensor.
fn delta(k: usize) -> f32 {
    ((k as i64 * 7919) % 2001 - 1000) as f32 * 1e-5f32
}

/// Checks the checkpoint in `dir` against the reference listing (`sha` names the digest field; the
/// values of tensors stored with an offset are compared to `<prefix>/<name>` within float32
/// rounding of `1 + w`).
fn check_checkpoint(family: &str, dir: &Path, r: &Reference, sha: &str, prefix: &str) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"), "{family}: transformers wants format=pt");
    let listing = r.json["tensors"].as_array().unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let want: Vec<String> = listing.iter().map(|t| t["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, want, "{family}: checkpoint tensor names (tied weights once)");
    for t in listing {
        let name = t["name"].as_str().unwrap();
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{family}: {name}");
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(v.shape(), &shape[..], "{family}: {name}");
        match r.f32s.get(&format!("{prefix}/{name}")) {
            None => assert_eq!(format!("{:x}", Sha256::digest(v.data())), t[sha].as_str().unwrap(), "{family}: {name} differs from transformers'"),
            Some(want) => {
                let got = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
                let worst = got.zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 2.5e-7, "{family}: {name} (stored as offset + w) differs by {worst}");
            }
        }
    }
}

/// ORT's logits and beta of an exported ONNX model on the reference batch.
fn ort_outputs(model: &Path, r: &Reference) -> (ArrayD<f32>, ArrayD<f32>) {
    let mut session = SessionConfig::default().session_from_file(model).unwrap();
    let feeds = vec![("input_ids", HostTensor::I64(r.i64s["input_ids"].clone())), ("attention_mask", HostTensor::I64(r.i64s["attention_mask"].clone()))];
    let mut outs: HashMap<String, ArrayD<f32>> =
        run(&mut session, &feeds).unwrap().into_iter().filter_map(|(n, t)| t.as_f32().cloned().map(|a| (n, a))).collect();
    (outs.remove("logits").unwrap(), outs.remove("beta").unwrap())
}

/// Largest |difference| over attended positions (padding's logits are not part of the contract).
fn logits_diff(got: &ArrayD<f32>, want: &ArrayD<f32>, mask: &ArrayD<i64>) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let mut worst = 0.0f32;
    for ((ix, g), w) in got.indexed_iter().zip(want.iter()) {
        if mask[[ix[0], ix[1]]] == 1 {
            worst = worst.max((g - w).abs());
        }
    }
    worst
}

/// Every trained parameter moved as the reference moved the checkpoint: the test applies the
/// perturbation in the checkpoint's layout and carries it into the ONNX parameter's layout itself
/// (from the committed name map and the manifest), and gives the beta head non-zero values.
fn perturbed_params(art: &Path, family: &str) -> Vec<NamedTensor> {
    let manifest = Manifest::load(art).unwrap();
    let map: Value = serde_json::from_str(&std::fs::read_to_string(fixture(family).join("hf_export.json")).unwrap()).unwrap();
    let (mut params, _) = read_safetensors(&art.join("params.safetensors")).unwrap();
    for t in map["tensors"].as_array().unwrap() {
        let init = t["initializer"].as_str().unwrap();
        let p = manifest.trainable().find(|p| p.initializers.iter().any(|r| r.name == init)).unwrap_or_else(|| panic!("{family}: {init} is not trained"));
        let stored_transposed = p.initializers.iter().find(|r| r.name == init).unwrap().transposed;
        let flip = stored_transposed != t["transposed"].as_bool().unwrap();
        let value = params.iter_mut().find(|x| x.name == p.name).unwrap();
        let cols = value.shape.get(1).copied().unwrap_or(1);
        let rows = value.shape[0];
        for (i, v) in value.data.iter_mut().enumerate() {
            // element i of the parameter is element k of the checkpoint tensor
            let k = if flip { (i % cols) * rows + i / cols } else { i };
            *v += delta(k);
        }
    }
    for p in params.iter_mut().filter(|p| p.name.starts_with("beta_head.")) {
        for (j, v) in p.data.iter_mut().enumerate() {
            *v = 0.5 * ((j * 37 % 17) as f32 - 8.0) / 8.0;
        }
    }
    params
}

/// The loader documented in the README, on transformers' lm_head input: softplus(x . w + b) at the
/// last attended token (x: h, or h at unit RMS scaled by reference_width / H), bounded by beta_max.
fn loader_beta(hidden: &ArrayD<f32>, mask: &ArrayD<i64>, dir: &Path) -> Vec<f32> {
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("beta_head.json")).unwrap()).unwrap();
    assert_eq!(cfg["aggregate"], "last");
    let (head, _) = read_safetensors(&dir.join("beta_head.safetensors")).unwrap();
    let w = &head.iter().find(|t| t.name == "weight").unwrap().data;
    let b = head.iter().find(|t| t.name == "bias").unwrap().data[0] as f64;
    let (min, max) = (cfg["beta_min"].as_f64().unwrap(), cfg["beta_max"].as_f64());
    (0..hidden.shape()[0])
        .map(|row| {
            let last = (0..mask.shape()[1]).filter(|&t| mask[[row, t]] == 1).count() - 1;
            let h: Vec<f64> = (0..w.len()).map(|j| hidden[[row, last, j]] as f64).collect();
            let scale = match cfg["head_input"].as_str() {
                Some("normalized") => {
                    let rms = (h.iter().map(|x| x * x).sum::<f64>() / h.len() as f64 + 1e-6).sqrt();
                    cfg["reference_width"].as_f64().unwrap() / h.len() as f64 / rms
                }
                other => {
                    assert_eq!(other, Some("raw"));
                    1.0
                }
            };
            let z: f64 = w.iter().zip(&h).map(|(&wj, hj)| wj as f64 * hj).sum::<f64>() * scale + b;
            let sp = z.max(0.0) + (-z.abs()).exp().ln_1p();
            (min + max.map_or(sp, |m| (m - min) * (sp / (m - min)).tanh())) as f32
        })
        .collect()
}

#[test]
fn checkpoint_and_logits_equal_transformers() {
    for family in FAMILIES {
        let r = reference(family);
        let dir = common::fixtures::scratch(&format!("hf-{family}"));
        let art = dir.join("art");
        build_artifacts(&fixture(family).join("model.onnx"), &art, &BuildOptions::default()).unwrap();
        assert!(art.join("hf_export.json").exists(), "{family}: build-graph carries the name map");

        // untrained: what save_pretrained wrote, and transformers' logits
        let (hf, onnx) = (dir.join("hf"), dir.join("model.onnx"));
        let (code, _, err) = betadpo(&["export", "--artifacts", s(&art), "--out", s(&onnx), "--hf", s(&hf)]);
        assert_eq!(code, 0, "{family}: {err}");
        check_checkpoint(family, &hf, &r, "sha256", "checkpoint");
        let config: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        assert_eq!(config, r.json["config"], "{family}: config.json");
        let mask = &r.i64s["attention_mask"];
        let (logits, _) = ort_outputs(&onnx, &r);
        let d = logits_diff(&logits, &r.f32s["logits"], mask);
        assert!(d <= 1e-4, "{family}: ORT logits differ from transformers' by {d}");

        // every parameter and the head changed
        let params = perturbed_params(&art, family);
        let moved = dir.join("moved.safetensors");
        write_safetensors(&moved, &params, None).unwrap();
        let (hf2, onnx2) = (dir.join("hf-moved"), dir.join("moved.onnx"));
        export_model(&art, &moved, &onnx2, &Default::default()).unwrap();
        export_hf(&art, &moved, &hf2, None, None).unwrap();
        check_checkpoint(family, &hf2, &r, "sha256_perturbed", "perturbed");
        let (logits, beta) = ort_outputs(&onnx2, &r);
        let d2 = logits_diff(&logits, &r.f32s["logits_perturbed"], mask);
        assert!(d2 <= 1e-4, "{family}: perturbed ORT logits differ from transformers' by {d2}");
        let before = logits_diff(&r.f32s["logits"], &r.f32s["logits_perturbed"], mask);
        assert!(before > 1e-2, "{family}: the perturbation must move the logits ({before})");
        let want = loader_beta(&r.f32s["hidden_perturbed"], mask, &hf2);
        for (g, w) in beta.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5, "{family}: ORT beta {g} vs the PyTorch loader's {w}");
        }
        assert!((want[0] - want[1]).abs() > 1e-3, "{family}: the head must tell the rows apart: {want:?}");
        let db = beta.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        eprintln!("{family}: max |logit diff| ORT vs transformers {d:.2e}, perturbed {d2:.2e}; beta ORT vs loader {db:.2e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn refusals_are_one_line_and_touch_nothing() {
    let dir = common::fixtures::scratch("hf-refusals");
    let gpt2 = fixture("gpt2");
    // a model exported without a name map
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(gpt2.join("model.onnx"), bare.join("model.onnx")).unwrap();
    let art = dir.join("art-bare");
    build_artifacts(&bare.join("model.onnx"), &art, &BuildOptions::default()).unwrap();
    let hf = dir.join("hf");
    let (code, _, err) = betadpo(&["export", "--artifacts", s(&art), "--hf", s(&hf)]);
    assert_ne!(code, 0);
    assert!(err.contains("no hf_export.json") && err.contains("scripts/tools/export_hf.py") && err.trim().lines().count() == 1, "{err}");
    assert!(!hf.exists());

    // a map written for another model is not carried into the artifacts
    std::fs::copy(fixture("llama").join("hf_export.json"), bare.join("hf_export.json")).unwrap();
    let (code, out, err) = betadpo(&["build-graph", "--quiet", "--model", s(&bare.join("model.onnx")), "--out", s(&art)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("name map was not copied") && out.contains("does not have"), "{out}");
    assert!(!art.join("hf_export.json").exists());

    // a directory that export --hf did not write is refused and left as it was
    let good = dir.join("art");
    build_artifacts(&gpt2.join("model.onnx"), &good, &BuildOptions::default()).unwrap();
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep").unwrap();
    let (code, _, err) = betadpo(&["export", "--artifacts", s(&good), "--hf", s(&mine)]);
    assert_ne!(code, 0);
    assert!(err.contains("earlier `export --hf` output") && err.contains("--hf") && err.trim().lines().count() == 1, "{err}");
    assert_eq!(std::fs::read_to_string(mine.join("notes.txt")).unwrap(), "keep");
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);

    // an earlier output is replaced whole; one with a file added by someone else is not
    let tok = common::fixtures::quickstart().join("tokenizer.json");
    let (code, out, err) = betadpo(&["export", "--artifacts", s(&good), "--hf", s(&hf)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no tokenizer found") && !hf.join("tokenizer.json").exists(), "{out}");
    let (code, _, err) = betadpo(&["export", "--artifacts", s(&good), "--hf", s(&hf), "--tokenizer", s(&tok)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(hf.join("tokenizer.json")).unwrap(), std::fs::read(&tok).unwrap());
    assert!(hf.join("tokenizer_config.json").exists(), "the config beside tokenizer.json comes along");
    std::fs::write(hf.join("README.md"), "mine").unwrap();
    let (code, _, err) = betadpo(&["export", "--artifacts", s(&good), "--hf", s(&hf)]);
    assert_ne!(code, 0);
    assert!(err.contains("earlier `export --hf` output") && err.trim().lines().count() == 1, "{err}");
    assert!(hf.join("README.md").exists() && hf.join("model.safetensors").exists());
    // flags: something to export, and somewhere to write it
    let (code, _, err) = betadpo(&["export", "--artifacts", s(&good)]);
    assert!(code != 0 && err.contains("--out FILE") && err.contains("--hf DIR"), "{err}");
    let (code, _, err) = betadpo(&["export", "--hf", s(&dir.join("hf-none"))]);
    assert!(code != 0 && err.contains("--run RUN") && err.contains("--artifacts ART"), "{err}");

    // a head that reads another tensor than the lm_head's input: the PyTorch loader could not follow
    let other = dir.join("art-hidden");
    let opts = BuildOptions { hidden_state: Some("/m/transformer/ln_f/LayerNormalization_output_0".into()), ..Default::default() };
    build_artifacts(&gpt2.join("model.onnx"), &other, &opts).unwrap();
    let (code, _, err) = betadpo(&["export", "--artifacts", s(&other), "--hf", s(&dir.join("hf-hidden"))]);
    assert_ne!(code, 0);
    assert!(err.contains("--hidden-state") && err.trim().lines().count() == 1, "{err}");
    assert!(!dir.join("hf-hidden").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
