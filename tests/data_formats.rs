//! Preference data in every form `datasets` users have it (JSON array, Parquet with snappy or zstd
//! pages, Hub Parquet shards, `save_to_disk` folders) reads as exactly the rows and token pairs of
//! the JSONL it was made from (tests/fixtures/data/formats, written by scripts/fixtures/make_data_fixtures.py
//! with `datasets` and pyarrow); rows with a mistake are refused in one line naming it.

mod common;

use std::path::{Path, PathBuf};

use betadpo::text::data::parse_preferences;
use betadpo::text::{load_preferences, LoadOptions, PairTokenizer, PreferenceRow, Text, TokenizedPair, TruncationConfig};

fn formats() -> PathBuf {
    common::fixtures::repo().join("tests/fixtures/data/formats")
}

fn read(path: &Path, split: Option<&str>) -> Vec<PreferenceRow> {
    let opts = LoadOptions { split: split.map(str::to_string), ..Default::default() };
    load_preferences(path, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display())).rows
}

fn err(path: &Path, split: Option<&str>) -> String {
    let opts = LoadOptions { split: split.map(str::to_string), ..Default::default() };
    load_preferences(path, &opts).unwrap_err().to_string()
}

fn tokenized(rows: &[PreferenceRow]) -> Vec<TokenizedPair> {
    let tok = PairTokenizer::from_dir(&common::fixtures::quickstart()).unwrap();
    let (pairs, stats) = tok.tokenize_all(rows, &TruncationConfig::default()).unwrap();
    assert_eq!(stats.kept, rows.len());
    pairs
}

fn assert_same_pairs(form: &str, got: &[PreferenceRow], want: &[PreferenceRow]) {
    assert_eq!(got.len(), want.len(), "{form}: row count");
    assert_eq!(got, want, "{form}: rows differ from the JSONL's");
    let (a, b) = (tokenized(got), tokenized(want));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!((&x.prompt, &x.chosen, &x.rejected), (&y.prompt, &y.chosen, &y.rejected), "{form}: pair {i} tokenizes differently");
    }
}

#[test]
fn every_form_reads_the_jsonl_rows() {
    let f = formats();
    let standard = read(&f.join("standard.jsonl"), None);
    assert_eq!(standard.len(), 16);
    assert_eq!(standard[0].extras.get("regime").map(String::as_str), Some("clean"));
    for form in ["standard.json", "standard.parquet", "standard_zstd.parquet", "saved_standard"] {
        assert_same_pairs(form, &read(&f.join(form), None), &standard);
    }
    let conversational = read(&f.join("conversational.jsonl"), None);
    assert!(conversational[0].prompt.is_messages());
    assert_same_pairs("conversational.parquet", &read(&f.join("conversational.parquet"), None), &conversational);
    // The Hub's shards and a DatasetDict: train is rows 0-11 (two shards, in order), test 12-15.
    for folder in ["hub", "saved_dict"] {
        assert_same_pairs(folder, &read(&f.join(folder), None), &conversational[..12]);
        assert_same_pairs(folder, &read(&f.join(folder), Some("train")), &conversational[..12]);
        assert_same_pairs(&format!("{folder} test"), &read(&f.join(folder), Some("test")), &conversational[12..]);
    }
    // One shard named directly is a file like any other.
    assert_same_pairs("one shard", &read(&f.join("hub/data/train-00001-of-00002.parquet"), None), &conversational[8..12]);
}

#[test]
fn tool_calls_pass_to_the_template_as_given() {
    let f = formats();
    let rows = read(&f.join("tool_calls.jsonl"), None);
    assert_eq!(read(&f.join("tool_calls.parquet"), None), rows, "Parquet's null struct fields are the JSONL's absent ones");
    let Text::Messages(chosen) = &rows[0].chosen else { panic!("conversational") };
    assert!(chosen[0].null_content && chosen[0].content.is_empty());
    let call = &chosen[0].extra["tool_calls"][0]["function"];
    assert_eq!((call["name"].as_str(), call["arguments"]["zone"].as_str()), (Some("get_time"), Some("UTC")));
    // The template sees content None (not "") and the calls: the expected strings are what transformers'
    // render_jinja_template (apply_chat_template's renderer) gives for the same rows and template.
    let template = betadpo::text::ChatTemplate::new(
        "{% for m in messages %}[{{ m.role }}|{{ m.content is none }}|{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}]{% endfor %}",
        None,
        None,
        None,
    )
    .unwrap();
    assert_eq!(template.render(chosen, false).unwrap(), r#"[assistant|True|get_time({"zone": "UTC"})]"#);
    let Text::Messages(rejected) = &rows[0].rejected else { panic!("conversational") };
    assert_eq!(template.render(rejected, false).unwrap(), "[assistant|False|]");
}

#[test]
fn rows_with_a_mistake_are_refused_naming_it() {
    let opts = LoadOptions::default();
    let one = |text: &str| parse_preferences(text, "d.jsonl", &opts).unwrap_err().to_string();
    assert_eq!(one(r#"{"promt": "Q", "chosen": "a", "rejected": "b"}"#), r#"d.jsonl:1: unknown column "promt" (did you mean "prompt"?)"#);
    assert_eq!(one(r#"{"prompt": "Q", "choosen": "a", "rejected": "b"}"#), r#"d.jsonl:1: unknown column "choosen" (did you mean "chosen"?)"#);
    assert_eq!(one(r#"{"Prompt": "Q", "chosen": "a", "rejected": "b"}"#), r#"d.jsonl:1: unknown column "Prompt" (did you mean "prompt"?)"#);
    // Answers that share no start have no implicit prompt: refused, not trained with an empty one.
    let e = one("{\"chosen\": \"Q: x? A: yes\", \"rejected\": \"Q: x? A: no\"}\n{\"chosen\": \"Paris.\", \"rejected\": \"Lyon.\"}");
    assert!(e.starts_with("d.jsonl:2: no \"prompt\" column, and \"chosen\" and \"rejected\" share no beginning"), "{e}");
    assert_eq!(
        one(
            r#"{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": null}], "rejected": [{"role": "assistant", "content": "b"}]}"#
        ),
        r#"d.jsonl:1: "chosen"[0]: the assistant message has no content (null) and no tool_calls"#
    );
    let e = one(r#"{"prompt": "Q", "completion": "a", "label": true}"#);
    assert!(e.contains("missing field \"chosen\": this row is in TRL's unpaired preference"), "{e}");
    // Other columns stay columns (group-by), also near-misses of a field the row has.
    let ok = parse_preferences(r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "prompts": 1, "regime": "clean"}"#, "d.jsonl", &opts).unwrap();
    assert_eq!(ok.rows[0].extras.len(), 2);
}

#[test]
fn jsonl_lines_are_numbered_past_blank_lines_and_a_bom() {
    let text = "\u{feff}\n\n{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n\r\n{\"prompt\": \"a\"}\n";
    let e = parse_preferences(text, "x.jsonl", &LoadOptions::default()).unwrap_err().to_string();
    assert_eq!(e, "x.jsonl:5: missing field \"chosen\"");
    let array = "\u{feff}  [{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}]";
    assert_eq!(parse_preferences(array, "x.json", &LoadOptions::default()).unwrap().rows.len(), 1);
}

#[test]
fn what_data_names_is_checked() {
    let f = formats();
    let e = err(&f.join("hub"), Some("validation"));
    assert!(e.contains("no Parquet files of split \"validation\" (found test, train)"), "{e}");
    let e = err(&f.join("saved_dict"), Some("dev"));
    assert!(e.contains("no split \"dev\" (it has train, test)"), "{e}");
    let e = err(&f.join("standard.jsonl"), Some("train"));
    assert!(e.contains("a file has no splits"), "{e}");
    let e = err(Path::new("trl-lib/ultrafeedback_binarized"), None);
    assert!(e.contains("no such file or folder; if it is a Hugging Face dataset name") && e.contains("to_parquet('train.parquet')"), "{e}");
    // A folder of split files: train.jsonl for --data, test.jsonl for --eval-data.
    let splits = common::fixtures::scratch("data-split-files");
    std::fs::copy(f.join("standard.jsonl"), splits.join("train.jsonl")).unwrap();
    std::fs::copy(f.join("conversational.jsonl"), splits.join("test.jsonl")).unwrap();
    assert_eq!(read(&splits, None), read(&f.join("standard.jsonl"), None));
    assert_eq!(read(&splits, Some("test")), read(&f.join("conversational.jsonl"), None));
    let empty = common::fixtures::scratch("data-folder");
    std::fs::write(empty.join("notes.txt"), "x").unwrap();
    let e = err(&empty, None);
    assert!(e.contains("is a folder without data files") && e.ends_with("it holds notes.txt"), "{e}");
}

/// Training from the DatasetDict folder (train split; evaluation on its test split by default) and
/// from the Hub shards gives the very parameters and evaluation that the JSONL rows give.
#[test]
fn folders_train_exactly_as_their_jsonl() {
    use betadpo::dpo::{build_artifacts, BuildOptions};
    use betadpo::train::config::TrainConfig;
    use betadpo::train::trainer::train;
    let f = formats();
    let q = common::fixtures::quickstart();
    let dir = common::fixtures::scratch("data-formats-train");
    let art = dir.join("art");
    build_artifacts(&q.join("model.onnx"), &art, &BuildOptions::default()).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(f.join("conversational.jsonl")).unwrap().lines().map(str::to_string).collect();
    std::fs::write(dir.join("train.jsonl"), lines[..12].join("\n")).unwrap();
    std::fs::write(dir.join("test.jsonl"), lines[12..].join("\n")).unwrap();
    let run = |name: &str, data: PathBuf, eval: PathBuf| {
        let cfg = TrainConfig {
            artifacts: art.clone(),
            data,
            eval_data: Some(eval),
            tokenizer: q.clone(),
            out: dir.join(name),
            max_steps: Some(3),
            batch_size: 4,
            lr: 1e-3,
            threads: Some(1),
            progress: false,
            ..Default::default()
        };
        let summary = train(&cfg).unwrap();
        let params = std::fs::read(dir.join(name).join("final/params.safetensors")).unwrap();
        (summary.final_eval.unwrap(), params)
    };
    let (eval, params) = run("jsonl", dir.join("train.jsonl"), dir.join("test.jsonl"));
    for folder in ["saved_dict", "hub"] {
        let (e, p) = run(folder, f.join(folder), f.join(folder));
        assert_eq!(e, eval, "{folder}: the final evaluation differs from the JSONL run's");
        assert!(p == params, "{folder}: the trained parameters differ from the JSONL run's");
    }
    assert!(eval.get("eval/loss").and_then(|v| v.as_f64()).is_some_and(|l| l != std::f64::consts::LN_2), "{eval:?}");
}
