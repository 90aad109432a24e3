//! Hostile and careless inputs that once hung, aborted or were silently wrong (issue 24, items
//! 5, 6, 9 and 10): chat templates that loop or grow without end, a 200 MB data row, padding and
//! truncation stored in tokenizer.json, manifests `train` refuses but `validate` passed, broken
//! `hf_export.json` maps, and data with no usable pair. Each is refused in one line under a time
//! limit, or handled as transformers would.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use betadpo::text::{load_preferences, LoadOptions, PairTokenizer, TruncationConfig};
use common::fixtures::quickstart;
use common::timed::{arg as s, assert_refused, betadpo_within, build, peak_child_rss, Outcome};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

fn artifacts() -> &'static Path {
    static ART: OnceLock<PathBuf> = OnceLock::new();
    ART.get_or_init(|| build(&quickstart().join("model.onnx"), "hostile-art"))
}

fn train(art: &Path, data: &Path, tokenizer: &Path, out: &Path, extra: &[&str]) -> Outcome {
    let args = ["train", "--artifacts", s(art), "--data", s(data), "--tokenizer", s(tokenizer), "--out", s(out), "--quiet", "--max-steps", "1"];
    betadpo_within(&[&args[..], extra].concat(), LIMIT)
}

/// A tokenizer directory: the quickstart tokenizer with `template` as its chat template.
fn tokenizer_with_template(name: &str, template: &str) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    std::fs::copy(quickstart().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(quickstart().join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["chat_template"] = json!(template);
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

fn exported_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let model = common::fixtures::scratch("hostile-export").join("m.onnx");
        let o = betadpo_within(&["export", "--artifacts", s(artifacts()), "--out", s(&model)], LIMIT);
        assert_eq!(o.code, 0, "{}", o.stderr);
        model
    })
}

/// `train` on conversational rows and `infer --chat` with `template`: both refused with `needle`
/// naming the template's file, well within the limit.
fn template_refused(name: &str, template: &str, needle: &str) {
    let dir = tokenizer_with_template(name, template);
    let tok = dir.join("tokenizer.json");
    let start = Instant::now();
    let o = train(artifacts(), &quickstart().join("test_conversational.jsonl"), &tok, &dir.join("run"), &[]);
    assert_refused(&o, needle, "train");
    assert!(o.stderr.contains(&format!("{}", dir.join("tokenizer_config.json").display())), "names the file: {}", o.stderr);
    // nothing of a run was written: at most the run folder's lock (the memory guard ends the process
    // at once, before the lock's guard could remove the folder it created)
    let run = dir.join("run");
    let left: Vec<String> = std::fs::read_dir(&run).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    assert!(left.iter().all(|n| n == betadpo::dir_lock::LOCK_FILE), "{}: {left:?}", run.display());
    let o = betadpo_within(&["infer", "--model", s(exported_model()), "--tokenizer", s(&tok), "--chat", "--prompt", "hi"], LIMIT);
    assert_refused(&o, needle, "infer --chat");
    assert!(start.elapsed() < Duration::from_secs(90), "took {:?}", start.elapsed());
}

#[test]
fn a_template_looping_ten_billion_times_runs_out_of_fuel() {
    let template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}";
    template_refused("hostile-fuel", template, "template steps");
}

#[test]
fn a_template_writing_gigabytes_is_cut_at_its_output_limit() {
    let template = "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}";
    template_refused("hostile-output", template, "MB for one row");
}

#[test]
fn a_template_doubling_a_string_forty_times_is_stopped_at_its_memory_budget() {
    let template = "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}";
    template_refused("hostile-double", template, "MB of memory");
    assert!(peak_child_rss() < 2 << 30, "peak RSS {} bytes", peak_child_rss());
}

#[test]
fn a_200_mb_prompt_line_is_refused_naming_file_and_line() {
    let dir = common::fixtures::scratch("hostile-long-row");
    let data = dir.join("data.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
        writeln!(f, "{}", json!({"prompt": "hello", "chosen": " a", "rejected": " b"})).unwrap();
        write!(f, "{{\"prompt\": \"").unwrap();
        let chunk = "a".repeat(1 << 20);
        for _ in 0..200 {
            f.write_all(chunk.as_bytes()).unwrap();
        }
        writeln!(f, "\", \"chosen\": \" a\", \"rejected\": \" b\"}}").unwrap();
    }
    let o = train(artifacts(), &data, &quickstart().join("tokenizer.json"), &dir.join("run"), &[]);
    assert_refused(&o, &format!("{}:2: row is longer than --max-row-bytes (16777216 bytes)", data.display()), "train");
    // skipped, the other row trains
    let o = train(artifacts(), &data, &quickstart().join("tokenizer.json"), &dir.join("run2"), &["--skip-bad-rows", "--batch-size", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(peak_child_rss() < 2 << 30, "peak RSS {} bytes: the row was read whole", peak_child_rss());
    let o = train(artifacts(), &data, &quickstart().join("tokenizer.json"), &dir.join("run3"), &["--max-row-bytes", "0"]);
    assert_refused(&o, "--max-row-bytes", "--max-row-bytes 0");
}

#[test]
fn padding_and_truncation_stored_in_tokenizer_json_are_turned_off_as_transformers_does() {
    let dir = common::fixtures::scratch("hostile-stored-padding");
    let plain = PairTokenizer::from_files(&quickstart().join("tokenizer.json"), Some(&quickstart().join("tokenizer_config.json"))).unwrap();
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(quickstart().join("tokenizer.json")).unwrap()).unwrap();
    t["padding"] =
        json!({"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"});
    t["truncation"] = json!({"direction": "Right", "max_length": 20, "strategy": "LongestFirst", "stride": 0});
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    let mut raw: tokenizers::Tokenizer = t.to_string().parse().unwrap();
    let notice = betadpo::text::tokenize::without_stored_padding_and_truncation(&mut raw).unwrap();
    assert_eq!(
        notice,
        "the padding (Fixed 64) and truncation (max_length 20) stored in tokenizer.json are turned off, as transformers does per call (rows are cut by --max-length)"
    );
    let stored = PairTokenizer::from_files(&dir.join("tokenizer.json"), Some(&quickstart().join("tokenizer_config.json"))).unwrap();
    let rows = load_preferences(&quickstart().join("test.jsonl"), &LoadOptions::default()).unwrap().rows;
    let cfg = TruncationConfig { max_length: Some(1024), ..Default::default() };
    let (want, want_stats) = plain.tokenize_all(&rows, &cfg).unwrap();
    let (got, got_stats) = stored.tokenize_all(&rows, &cfg).unwrap();
    assert_eq!(got, want, "the stored settings changed the tokens");
    assert_eq!((got_stats.truncated_answers, got_stats.kept), (want_stats.truncated_answers, want_stats.kept));
    assert!(want.iter().any(|p| p.prompt.len() + p.chosen.len() > 20), "some row is longer than the stored max_length 20");
}

/// A copy of the artifacts with `edit` applied to `file` (JSON).
fn tampered(name: &str, file: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = common::fixtures::scratch(name);
    for e in std::fs::read_dir(artifacts()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join(file);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

/// `validate`, `train` and `export` all refuse the tampered manifest, with the same reason.
fn refused_everywhere(name: &str, edit: impl Fn(&mut serde_json::Value), needle: &str) {
    let art = tampered(name, "manifest.json", edit);
    let o = betadpo_within(&["validate", s(&art)], LIMIT);
    assert_refused(&o, needle, &format!("validate, {name}"));
    let q = quickstart();
    let o = train(&art, &q.join("test.jsonl"), &q.join("tokenizer.json"), &art.join("run"), &[]);
    assert_refused(&o, needle, &format!("train, {name}"));
    let model = art.join("m.onnx");
    let o = betadpo_within(&["export", "--artifacts", s(&art), "--out", s(&model)], LIMIT);
    assert_refused(&o, needle, &format!("export, {name}"));
    assert!(!model.exists() && !art.join("run").exists());
}

#[test]
fn validate_refuses_a_dropped_parameter() {
    refused_everywhere(
        "hostile-dropped",
        |m| drop(m["parameters"].as_array_mut().unwrap().remove(0)),
        "which is not among the manifest's trainable parameters",
    );
}

#[test]
fn validate_refuses_a_parameter_listed_twice() {
    refused_everywhere(
        "hostile-twice",
        |m| {
            let first = m["parameters"][0].clone();
            m["parameters"].as_array_mut().unwrap().push(first);
        },
        "is listed twice",
    );
}

#[test]
fn validate_refuses_artifacts_with_nothing_to_train() {
    refused_everywhere(
        "hostile-frozen",
        |m| m["parameters"].as_array_mut().unwrap().iter_mut().for_each(|p| p["trainable"] = json!(false)),
        "no parameter is trainable",
    );
}

#[test]
fn validate_refuses_no_room_for_a_sequence() {
    refused_everywhere("hostile-seq0", |m| m["max_sequence_tokens"] = json!(0), "max_sequence_tokens 0 leaves no room");
}

/// `export --hf` on artifacts whose map `edit` broke: refused before anything is written.
fn hf_map_refused(name: &str, edit: impl Fn(&mut serde_json::Value), needle: &str) {
    let art = tampered(name, "hf_export.json", edit);
    let out = art.join("hf");
    let o = betadpo_within(&["export", "--artifacts", s(&art), "--hf", s(&out), "--tokenizer", s(&quickstart().join("tokenizer.json"))], LIMIT);
    assert_refused(&o, needle, name);
    assert!(!out.exists(), "{name}: a refused export wrote {}", out.display());
}

#[test]
fn hf_map_transposing_a_vector_is_refused() {
    hf_map_refused(
        "hostile-hf-transposed",
        |m| {
            let t = m["tensors"].as_array_mut().unwrap().iter_mut().find(|t| t["shape"].as_array().unwrap().len() == 1).unwrap();
            t["transposed"] = json!(true);
        },
        "only a 2-D tensor can be `transposed`",
    );
}

#[test]
fn hf_map_with_a_duplicated_entry_is_refused() {
    hf_map_refused(
        "hostile-hf-dup",
        |m| {
            let first = m["tensors"][0].clone();
            m["tensors"].as_array_mut().unwrap().push(first);
        },
        "is listed twice",
    );
}

#[test]
fn hf_map_whose_config_is_not_an_object_is_refused() {
    hf_map_refused("hostile-hf-config", |m| m["config"] = json!([1, 2]), "`config` must be an object");
}

#[test]
fn hf_map_without_tensors_is_refused() {
    hf_map_refused("hostile-hf-empty", |m| m["tensors"] = json!([]), "`tensors` is empty");
}

#[test]
fn no_usable_pairs_says_that_every_prompt_is_too_long() {
    let dir = common::fixtures::scratch("hostile-no-pairs");
    let q = quickstart();
    let o = train(artifacts(), &q.join("test.jsonl"), &q.join("tokenizer.json"), &dir.join("run"), &["--max-length", "2"]);
    assert_refused(&o, "no usable pairs: every prompt has --max-length (2) tokens or more", "train --max-length 2");
}

#[test]
fn no_usable_pairs_says_that_the_vocabulary_is_empty() {
    let dir = common::fixtures::scratch("hostile-empty-vocab");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(quickstart().join("tokenizer.json")).unwrap()).unwrap();
    t["model"]["vocab"] = json!({});
    t["model"]["merges"] = json!([]);
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    std::fs::copy(quickstart().join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
    let o = train(artifacts(), &quickstart().join("test.jsonl"), &dir.join("tokenizer.json"), &dir.join("run"), &[]);
    assert_refused(&o, "does the tokenizer have a vocabulary?", "train with an empty vocabulary");
}

#[test]
fn a_hidden_state_after_the_lm_head_is_refused_at_build_time() {
    let out = common::fixtures::scratch("hostile-hidden-logits").join("art");
    let o = betadpo_within(&["build-graph", "--model", s(&quickstart().join("model.onnx")), "--out", s(&out), "--hidden-state", "logits", "--quiet"], LIMIT);
    assert_refused(&o, "invalid value for --hidden-state: logits comes after the lm_head", "--hidden-state logits");
    assert!(!out.exists());
}
