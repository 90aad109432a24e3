//! Every count that sizes memory is bounded before it is allocated (issue 24, item 4): flags
//! beyond any real run (`u64::MAX` included), manifest shapes that disagree with
//! `params.safetensors`, a tokenizer's stored padding, prompts beyond the model's positions or
//! the machine's memory. Each is refused in one line, quickly, without a panic or an abort.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::fixtures::quickstart;
use common::timed::{arg as s, assert_refused, betadpo_within, build, peak_child_rss, Outcome};

const LIMIT: Duration = Duration::from_secs(120);
const HUGE: &str = "18446744073709551615";

/// Artifacts of the quickstart model (rotary positions), built once per test process.
fn artifacts() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| build(&quickstart().join("model.onnx"), "bounds-art"))
}

/// Artifacts of the repository's gpt2 fixture, whose `wpe` has 128 positions.
fn gpt2_artifacts() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| build(&common::fixtures::repo().join("tests/fixtures/models/gpt2/model.onnx"), "bounds-gpt2"))
}

/// `train` on the quickstart data with `extra` flags, into a fresh run directory.
fn train(art: &Path, name: &str, extra: &[&str]) -> (Outcome, PathBuf) {
    let out = common::fixtures::scratch(name).join("run");
    let q = quickstart();
    let (data, tok) = (q.join("test.jsonl"), q.join("tokenizer.json"));
    let mut args = vec!["train", "--artifacts", s(art), "--data", s(&data), "--tokenizer", s(&tok)];
    args.extend(["--out", s(&out), "--quiet", "--max-steps", "1"]);
    let args: Vec<&str> = args.into_iter().chain(extra.iter().copied()).collect();
    (betadpo_within(&args, LIMIT), out)
}

fn refused_flag(flag: &str, values: &[&str], needle: &str) {
    for v in values {
        let (o, out) = train(artifacts(), &format!("bounds{flag}-{v}"), &[flag, v]);
        assert_refused(&o, needle, &format!("{flag} {v}"));
        assert!(!out.exists(), "{flag} {v}: a refused run left {}", out.display());
    }
}

#[test]
fn grad_accum_beyond_any_run() {
    refused_flag("--grad-accum", &["1000000000", HUGE], "invalid value for --grad-accum");
}

#[test]
fn batch_size_beyond_any_run() {
    refused_flag("--batch-size", &["1000000000", HUGE], "invalid value for --batch-size");
}

#[test]
fn max_length_beyond_any_model() {
    refused_flag("--max-length", &[HUGE], "invalid value for --max-length");
}

#[test]
fn threads_beyond_the_cores() {
    refused_flag("--threads", &["100000", HUGE], "invalid value for --threads");
}

#[test]
fn rows_and_buckets_beyond_any_run() {
    refused_flag("--bucket-batches", &[HUGE], "invalid value for --bucket-batches");
    refused_flag("--pack-tokens", &[HUGE], "invalid value for --pack-tokens");
}

#[test]
fn lora_rank_beyond_any_model() {
    for (v, needle) in [("1000000000", "--lora-rank"), (HUGE, "--lora-rank"), ("100000", "larger than every targeted weight's smaller side")] {
        let out = common::fixtures::scratch(&format!("bounds-lora-{v}")).join("art");
        let o = betadpo_within(&["build-graph", "--model", s(&quickstart().join("model.onnx")), "--out", s(&out), "--lora-rank", v, "--quiet"], LIMIT);
        assert_refused(&o, needle, &format!("--lora-rank {v}"));
        assert!(!out.exists());
    }
}

/// A copy of the quickstart artifacts whose manifest `edit` changed.
fn tampered(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    for e in std::fs::read_dir(artifacts()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, m.to_string()).unwrap();
    dir
}

#[test]
fn manifest_shapes_are_checked_against_the_parameters_before_the_moments() {
    // 2^40 elements: the Adam moments alone would be 8 TB
    let art = tampered("bounds-shape", |m| m["parameters"][0]["shape"] = serde_json::json!([1048576, 1048576]));
    let (o, out) = train(&art, "bounds-shape-run", &[]);
    assert_refused(&o, "the manifest says [1048576, 1048576]", "train");
    assert!(!out.exists());
    let model = common::fixtures::scratch("bounds-shape-export").join("m.onnx");
    let o = betadpo_within(&["export", "--artifacts", s(&art), "--out", s(&model)], LIMIT);
    assert_refused(&o, "the manifest says [1048576, 1048576]", "export");
    assert!(!model.exists());
    let o = betadpo_within(&["validate", s(&art), "--directions", "0"], LIMIT);
    assert!(o.code == 1 && o.stdout.contains("the manifest says [1048576, 1048576]"), "validate: {}{}", o.stdout, o.stderr);
}

#[test]
fn a_tokenizer_padding_everything_to_a_hundred_million_is_turned_off() {
    let dir = common::fixtures::scratch("bounds-padding");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(quickstart().join("tokenizer.json")).unwrap()).unwrap();
    t["padding"] = serde_json::json!({"strategy": {"Fixed": 100000000}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    std::fs::copy(quickstart().join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
    let out = dir.join("run");
    let (data, tok) = (quickstart().join("test.jsonl"), dir.join("tokenizer.json"));
    let args = ["train", "--artifacts", s(artifacts()), "--data", s(&data), "--tokenizer", s(&tok)];
    let o = betadpo_within(&[&args[..], &["--out", s(&out), "--quiet", "--max-steps", "1", "--batch-size", "2"]].concat(), LIMIT);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("padding (Fixed 100000000) stored in tokenizer.json is turned off"), "{}", o.stderr);
    // 100M pad tokens per row would take gigabytes
    assert!(peak_child_rss() < 2 << 30, "peak RSS {} bytes", peak_child_rss());
}

/// The quickstart model exported (its HF config gives 128 positions), built once per process.
fn exported(art: &Path, name: &str) -> PathBuf {
    let model = common::fixtures::scratch(name).join("m.onnx");
    let o = betadpo_within(&["export", "--artifacts", s(art), "--out", s(&model)], LIMIT);
    assert_eq!(o.code, 0, "{}", o.stderr);
    model
}

#[test]
fn a_twenty_thousand_word_prompt_is_refused_before_its_buffers() {
    let model = exported(artifacts(), "bounds-infer-long");
    let prompt = "word ".repeat(20_000);
    let tok = quickstart().join("tokenizer.json");
    let o = betadpo_within(&["infer", "--model", s(&model), "--tokenizer", s(&tok), "--prompt", &prompt], LIMIT);
    assert_refused(&o, "but the model has only 128 positions; shorten the prompt to at most 128", "infer --prompt");
    assert!(peak_child_rss() < 2 << 30, "peak RSS {} bytes", peak_child_rss());
}

#[test]
fn generating_past_gpt2s_positions_is_refused() {
    let model = exported(gpt2_artifacts(), "bounds-infer-gpt2");
    let tok = quickstart().join("tokenizer.json");
    let o = betadpo_within(&["infer", "--model", s(&model), "--tokenizer", s(&tok), "--prompt", "hello there", "--generate", "200"], LIMIT);
    assert_refused(&o, "positions; shorten the prompt or lower --generate", "infer --generate 200");
    let o = betadpo_within(&["infer", "--model", s(&model), "--tokenizer", s(&tok), "--prompt", "hello", "--generate", HUGE], LIMIT);
    assert_refused(&o, "--generate", "infer --generate u64::MAX");
    let o = betadpo_within(&["infer", "--model", s(&model), "--tokenizer", s(&tok), "--prompt", "hello there", "--generate", "20"], LIMIT);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn gpt2_artifacts_record_its_positions() {
    let m = betadpo::dpo::Manifest::load(gpt2_artifacts()).unwrap();
    assert_eq!(m.model.max_positions, Some(128), "wpe has 128 rows");
    assert!(m.max_sequence_tokens.is_none_or(|n| n <= 128), "{:?}", m.max_sequence_tokens);
    let q = betadpo::dpo::Manifest::load(artifacts()).unwrap();
    assert_eq!(q.model.max_positions, None, "rotary positions have no table");
    assert_eq!(q.model.context_length, Some(128), "max_position_embeddings of its config");
}

#[test]
fn rows_over_gpt2s_positions_are_refused_before_onnx_runtime() {
    let dir = common::fixtures::scratch("bounds-gpt2-rows");
    let data = dir.join("long.jsonl");
    let row = serde_json::json!({"prompt": "the cat sat on the mat ".repeat(40), "chosen": " yes", "rejected": " no"});
    std::fs::write(&data, format!("{row}\n{row}\n")).unwrap();
    let (tok, run) = (quickstart().join("tokenizer.json"), dir.join("run"));
    let args = ["train", "--artifacts", s(gpt2_artifacts()), "--data", s(&data), "--tokenizer", s(&tok)];
    let o = betadpo_within(&[&args[..], &["--out", s(&run), "--quiet", "--max-steps", "1"]].concat(), LIMIT);
    assert_refused(&o, "positions; lower --max-length to at most 128", "train, rows over 128 tokens");
    assert!(!dir.join("run").exists());
}

#[test]
fn token_ids_beyond_the_vocabulary_are_refused_before_onnx_runtime() {
    let dir = common::fixtures::scratch("bounds-vocab");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(quickstart().join("tokenizer.json")).unwrap()).unwrap();
    t["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 512, "content": "<beyond>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true
    }));
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    let data = dir.join("d.jsonl");
    let row = serde_json::json!({"prompt": "hello <beyond>", "chosen": " yes", "rejected": " no"});
    std::fs::write(&data, format!("{row}\n")).unwrap();
    let (tok, run) = (dir.join("tokenizer.json"), dir.join("run"));
    let args = ["train", "--artifacts", s(artifacts()), "--data", s(&data), "--tokenizer", s(&tok)];
    let o = betadpo_within(&[&args[..], &["--out", s(&run), "--quiet", "--max-steps", "1"]].concat(), LIMIT);
    assert_refused(&o, "gives token id 512, beyond the model's vocabulary of 512 tokens", "train");
}

#[test]
fn onnx_runtime_errors_come_out_on_one_line_naming_the_node() {
    // an export without the limits in its metadata (as exports made before them): nothing stops
    // --generate 200 before ONNX Runtime's Gather on gpt2's 128 positions does
    let model = exported(gpt2_artifacts(), "bounds-ort-error");
    let mut m = betadpo::onnx::load_model(&model).unwrap();
    m.metadata_props.clear();
    betadpo::onnx::save_model(&m, &model, &Default::default()).unwrap();
    let tok = quickstart().join("tokenizer.json");
    let o = betadpo_within(&["infer", "--model", s(&model), "--tokenizer", s(&tok), "--prompt", "hello there", "--generate", "200"], LIMIT);
    assert_refused(&o, "ONNX Runtime: ", "infer --generate 200 on an export without limits");
    assert!(o.stderr.contains("Gather node. Name:"), "names the node: {}", o.stderr);
}
