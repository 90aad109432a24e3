//! A new user's mistakes (issue 23, findings 3-5) each get one line that names the mistake and
//! what to do; what `infer` and `export --hf` print says what the user needs.

mod common;

use std::path::{Path, PathBuf};

use betadpo::dpo::export::export_model;
use betadpo::dpo::model::lora::LoraOptions;
use betadpo::dpo::{build_artifacts, BuildOptions};
use betadpo::run_layout;
use common::cli::{assert_one_line_error, betadpo};
use common::fixtures::quickstart;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_missing_required_flag_is_named() {
    let err = assert_one_line_error(&["train", "--artifacts", "art"], "the following required arguments were not provided");
    // --tokenizer is optional: artifacts built from a Hugging Face folder know theirs
    for flag in ["--data <DATA>", "--out <OUT>"] {
        assert!(err.contains(flag), "{flag} not named: {err}");
    }
    let err = assert_one_line_error(&["train", "--artifact", "art"], "unexpected argument '--artifact'");
    assert!(err.contains("tip: a similar argument exists: '--artifacts'"), "{err}");
}

#[test]
fn a_folder_given_as_the_model_says_what_it_is() {
    let dir = common::fixtures::scratch("first-hour-model-folder");
    let hf = dir.join("SmolLM2");
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::write(hf.join(f), "{}").unwrap();
    }
    let out = dir.join("art");
    let err = assert_one_line_error(
        &["build-graph", "--model", s(&hf), "--out", s(&out)],
        "architecture (none named) is not one betadpo builds from a Hugging Face folder (supported: llama,",
    );
    assert!(err.contains("scripts/tools/export_hf.py --model DIR"), "{err}");
    let plain = dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("notes.txt"), "").unwrap();
    assert_one_line_error(
        &["build-graph", "--model", s(&plain), "--out", s(&out)],
        "a folder, not an ONNX model file (model.onnx, with model.onnx.data beside it when large); it holds notes.txt",
    );
    let exported = dir.join("exported");
    std::fs::create_dir_all(&exported).unwrap();
    std::fs::write(exported.join("model.onnx"), "").unwrap();
    assert_one_line_error(
        &["build-graph", "--model", s(&exported), "--out", s(&out)],
        &format!("pass the model in it, {}", exported.join("model.onnx").display()),
    );
    assert!(!out.exists());
}

/// One set of artifacts of the bundled model, for the `train` and `infer` cases below.
fn artifacts(dir: &Path, opts: &BuildOptions) -> PathBuf {
    let art = dir.join("art");
    build_artifacts(&quickstart().join("model.onnx"), &art, opts).unwrap();
    art
}

#[test]
fn train_names_data_and_tokenizer_mistakes() {
    let dir = common::fixtures::scratch("first-hour-train");
    let art = artifacts(&dir, &BuildOptions::default());
    let q = quickstart();
    let out = dir.join("run");
    let train = |data: &str, tok: &Path| -> Vec<String> {
        ["train", "--artifacts", s(&art), "--data", data, "--tokenizer", s(tok), "--out", s(&out), "--max-steps", "1"].iter().map(|a| a.to_string()).collect()
    };
    // A folder without tokenizer.json says what it should hold; the folder holding it is taken.
    let no_tok = dir.join("no-tokenizer");
    std::fs::create_dir_all(&no_tok).unwrap();
    std::fs::write(no_tok.join("vocab.txt"), "").unwrap();
    let v = train(s(&q.join("train.jsonl")), &no_tok);
    assert_one_line_error(&args(&v), &format!("invalid value for --tokenizer: {} is a folder without tokenizer.json: --tokenizer takes tokenizer.json or the folder holding it; the folder holds vocab.txt", no_tok.display()));
    // With the tokenizer's folder, the run reaches the data: a Hub name is not a file.
    let v = train("trl-lib/ultrafeedback_binarized", &q);
    assert_one_line_error(
        &args(&v),
        "trl-lib/ultrafeedback_binarized: no such file or folder; if it is a Hugging Face dataset name, betadpo does not download datasets",
    );
    // A typo in a column name is refused, naming file, line and the column meant.
    let typo = dir.join("typo.jsonl");
    std::fs::write(&typo, "{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"promt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n").unwrap();
    let v = train(s(&typo), &q);
    assert_one_line_error(&args(&v), &format!("{}:2: unknown column \"promt\" (did you mean \"prompt\"?)", typo.display()));
    assert!(!out.join(run_layout::FINAL_DIR).exists());
}

#[test]
fn infer_shows_the_user_turn_and_says_when_no_template_was_used() {
    let dir = common::fixtures::scratch("first-hour-infer");
    let art = artifacts(&dir, &BuildOptions::default());
    let (code, out, err) = betadpo(&["validate", s(&art), "--threads", "1"]);
    assert_eq!(code, 0, "validate --threads 1: {err}");
    assert!(out.contains("checks passed"), "{out}");
    let model = dir.join("model.onnx");
    export_model(&art, &art.join("params.safetensors"), &model, &Default::default()).unwrap();
    let q = quickstart();
    let prompts = dir.join("prompts.jsonl");
    let system = "You are a helpful assistant who answers every question briefly and politely.";
    let rows: Vec<String> = ["Describe the lamp.", "Which one, the guitar or the planet?"]
        .iter()
        .map(|u| serde_json::json!({"prompt": [{"role": "system", "content": system}, {"role": "user", "content": u}]}).to_string())
        .collect();
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    let (code, out, err) = betadpo(&["infer", "--model", s(&model), "--tokenizer", s(&q), "--file", s(&prompts), "--threads", "1"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].ends_with("  Describe the lamp.") && lines[1].ends_with("  Which one, the guitar or the planet?"), "{out}");
    assert!(!err.contains("note:"), "message prompts are always templated: {err}");
    // A plain prompt on a tokenizer with a chat template: a note, unless --chat.
    let plain = ["infer", "--model", s(&model), "--tokenizer", s(&q), "--prompt", "Describe the lamp."];
    let (code, _, err) = betadpo(&plain);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("note: plain prompts go to the model as raw text, not through the tokenizer's chat template; pass --chat"), "{err}");
    let (code, _, err) = betadpo(&[&plain[..], &["--chat"]].concat());
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn peft_export_names_its_base_or_says_to() {
    let dir = common::fixtures::scratch("first-hour-peft");
    let lora = Some(LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: None });
    let art = artifacts(&dir, &BuildOptions { lora, ..Default::default() });
    let hf = dir.join("peft");
    let (code, out, err) = betadpo(&["export", "--artifacts", s(&art), "--hf", s(&hf)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("note: adapter_config.json names no base model") && out.contains("pass --base-model"), "{out}");
    assert!(!out.contains("from_pretrained"), "no code that cannot run: {out}");
    let config = |dir: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap() };
    assert!(config(&hf)["base_model_name_or_path"].is_null());
    let hf2 = dir.join("peft2");
    let (code, out, err) = betadpo(&["export", "--artifacts", s(&art), "--hf", s(&hf2), "--base-model", "HuggingFaceTB/SmolLM2-135M"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(config(&hf2)["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M");
    let dir = format!("{:?}", hf2.display().to_string());
    let snippet = format!(
        "load it in Python:\n    from transformers import AutoTokenizer\n    from peft import AutoPeftModelForCausalLM\n    \
         model = AutoPeftModelForCausalLM.from_pretrained({dir})\n    tokenizer = AutoTokenizer.from_pretrained({dir})\n"
    );
    assert!(out.contains(&snippet), "{out}");
}
