//! Data loading, tokenization, collation and ordering. Exact ids are checked on a word-level
//! tokenizer in `tests/fixtures/data`, and against PyTorch-side ids from `../shared/fixtures`
//! (skipped with a notice when that folder is absent, a failure under `CI=true`).

mod common;

use std::path::{Path, PathBuf};

use betadpo::text::*;
use betadpo::train::*;

fn here(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn shared() -> Option<PathBuf> {
    common::fixtures::shared("")
}

fn load(name: &str) -> LoadedData {
    load_preferences(&here(name), &LoadOptions::default()).unwrap()
}

fn word_tokenizer() -> PairTokenizer {
    PairTokenizer::from_dir(&here("word_tokenizer")).unwrap()
}

fn plain(s: &str) -> Text {
    Text::Plain(s.to_string())
}

fn msgs(list: &[(&str, &str)]) -> Text {
    Text::Messages(list.iter().map(|(r, c)| Message::new(*r, *c)).collect())
}

#[test]
fn standard_rows_and_extras() {
    let d = load("standard.jsonl");
    assert_eq!(d.rows.len(), 2);
    assert_eq!(d.rows[0].prompt, plain("a b"));
    assert_eq!(d.rows[0].chosen, plain(" c d"));
    assert_eq!(d.rows[0].rejected, plain(" e"));
    assert_eq!(d.rows[0].extras["regime"], "clean");
    assert_eq!(d.rows[0].extras["score"], "1.5");
    assert_eq!(d.rows[1].extras["flag"], "true");
    assert!(!d.rows[1].extras.contains_key("note"), "nulls are left out");
}

#[test]
fn json_array_input() {
    let d = load("array.json");
    assert_eq!(d.rows.len(), 2);
    assert_eq!(d.rows[1].chosen, plain("e"));
    assert_eq!(d.rows[1].extras["id"], "7");
}

#[test]
fn conversational_rows() {
    let d = load("conversational.jsonl");
    let row = &d.rows[0];
    assert_eq!(row.prompt, msgs(&[("system", "Be brief."), ("user", "Hi?")]));
    assert_eq!(row.chosen, msgs(&[("assistant", "Hello.")]));
    assert_eq!(row.extras["regime"], "mixed");
}

#[test]
fn implicit_prompt() {
    let d = load("implicit.jsonl");
    assert_eq!(d.rows[0].prompt, plain("Q: is it red? A:"));
    assert_eq!(d.rows[0].chosen, plain(" yes it is"));
    assert_eq!(d.rows[0].rejected, plain(" no"));
    assert_eq!(d.rows[1].prompt, msgs(&[("user", "Hi")]));
    assert_eq!(d.rows[1].chosen, msgs(&[("assistant", "Hello")]));
    assert_eq!(d.rows[1].rejected, msgs(&[("assistant", "Bye")]));
    // TRL's extract_prompt cuts at the first difference, even inside a word...
    let (p, c, r) = split_implicit_prompt(plain("I like cats"), plain("I like cows"));
    assert_eq!((p, c, r), (plain("I like c"), plain("ats"), plain("ows")));
    // ...and one character before the shorter answer ends when one continues the other.
    let (p, c, r) = split_implicit_prompt(plain("Yes"), plain("Yes!"));
    assert_eq!((p, c, r), (plain("Ye"), plain("s"), plain("s!")));
    // Without whitespace the cut is at the first differing character (multi-byte safe).
    let (p, c, _) = split_implicit_prompt(plain("ééa"), plain("ééb"));
    assert_eq!((p, c), (plain("éé"), plain("a")));
    // Identical message lists still leave one message per answer.
    let same = msgs(&[("user", "x"), ("assistant", "y")]);
    let (p, c, _) = split_implicit_prompt(same.clone(), same);
    assert_eq!((p, c), (msgs(&[("user", "x")]), msgs(&[("assistant", "y")])));
}

#[test]
fn malformed_lines_name_file_and_line() {
    let err = load_preferences(&here("bad.jsonl"), &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2: missing field \"rejected\""), "{err}");
    let d = load_preferences(&here("bad.jsonl"), &LoadOptions { skip_bad_rows: true, ..Default::default() }).unwrap();
    assert_eq!((d.rows.len(), d.skipped), (2, 3));
    assert!(d.skipped_examples[1].contains("bad.jsonl:3: invalid JSON"), "{:?}", d.skipped_examples);
    assert!(d.skipped_examples[2].contains("bad.jsonl:5: field \"chosen\" must be"), "{:?}", d.skipped_examples);
    let err = parse_preferences("[{\"prompt\": \"a\"}]", "x.json", &LoadOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "x.json: element 0: missing field \"chosen\"");
    let err = parse_preferences("[1, 2", "y.json", &LoadOptions { skip_bad_rows: true, ..Default::default() }).unwrap_err();
    assert!(err.to_string().starts_with("y.json: invalid JSON array"), "{err}");
}

#[test]
fn special_token_fallbacks() {
    let t = word_tokenizer();
    assert_eq!((t.eos_id(), t.pad_id(), t.bos_id()), (0, 1, None), "</s> and <pad> found by name");
    let dir = tempfile::tempdir().unwrap();
    let json = std::fs::read_to_string(here("word_tokenizer/tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json.replace("</s>", "<end>")).unwrap();
    let err = PairTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no end-of-sequence token"), "{err}");
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": {"content": "<end>"}}"#).unwrap();
    assert_eq!(PairTokenizer::from_dir(dir.path()).unwrap().eos_id(), 0);
}

#[test]
fn tokenize_and_collate_exact_ids() {
    let t = word_tokenizer();
    let (pairs, stats) = t.tokenize_all(&load("standard.jsonl").rows, &TruncationConfig::default()).unwrap();
    assert_eq!((stats.pairs, stats.kept, stats.truncated_prompts, stats.dropped), (2, 2, 0, 0));
    assert_eq!((pairs[0].prompt.as_slice(), pairs[0].chosen.as_slice()), (&[4, 5][..], &[6, 7, 0][..]));
    let opts = CollateOptions { pad_id: t.pad_id(), group_by: Some("regime".into()), pad_to_multiple_of: None, packing: None, part_tokens: 0 };
    let b = collate(&[&pairs[0], &pairs[1]], &opts).unwrap();
    let ids: Vec<Vec<i64>> = b.input_ids.rows().into_iter().map(|r| r.to_vec()).collect();
    assert_eq!(ids, vec![vec![4, 5, 6, 7, 0], vec![6, 7, 8, 9, 0], vec![4, 5, 8, 0, 1], vec![6, 10, 0, 1, 1]]);
    let att: Vec<Vec<i64>> = b.attention_mask.rows().into_iter().map(|r| r.to_vec()).collect();
    assert_eq!(att, vec![vec![1; 5], vec![1; 5], vec![1, 1, 1, 1, 0], vec![1, 1, 1, 0, 0]]);
    let comp: Vec<Vec<f32>> = b.completion_mask.rows().into_iter().map(|r| r.to_vec()).collect();
    assert_eq!(comp, vec![vec![0., 0., 1., 1., 1.], vec![0., 1., 1., 1., 1.], vec![0., 0., 1., 1., 0.], vec![0., 1., 1., 0., 0.]]);
    assert_eq!(b.prompt_last_index.to_vec(), vec![1, 0]);
    assert_eq!(b.sequence_last_index.to_vec(), vec![4, 4, 3, 2]);
    assert_eq!(b.position_ids.row(3).to_vec(), vec![0, 1, 2, 3, 4]);
    assert_eq!(b.groups, vec![Some("clean".to_string()), Some("noise".to_string())]);
    assert_eq!((b.num_tokens, b.pairs(), b.width()), (17, 2, 5));
    let padded = collate(&[&pairs[0]], &CollateOptions { pad_to_multiple_of: Some(8), ..opts }).unwrap();
    assert_eq!(padded.input_ids.row(1).to_vec(), vec![4, 5, 8, 0, 1, 1, 1, 1]);
}

#[test]
fn truncation() {
    let t = word_tokenizer();
    let rows = load("standard.jsonl").rows;
    let run = |max_length, mode| t.tokenize_all(&rows, &TruncationConfig { max_length: Some(max_length), mode }).unwrap();
    // keep_start: rows keep their first max_length tokens, so answers lose their end.
    let (pairs, stats) = run(3, TruncationMode::KeepStart);
    assert_eq!((pairs[0].prompt.clone(), pairs[0].chosen.clone(), pairs[0].rejected.clone()), (vec![4, 5], vec![6], vec![8]));
    assert_eq!((pairs[1].chosen.clone(), pairs[1].rejected.clone()), (vec![7, 8], vec![10, 0]));
    assert_eq!((stats.truncated_prompts, stats.truncated_answers, stats.dropped, stats.kept), (0, 3, 0, 2));
    // A prompt that fills max_length leaves no answer: the pair is dropped.
    let (pairs, stats) = run(2, TruncationMode::KeepStart);
    assert_eq!((pairs.len(), pairs[0].source_index, stats.dropped), (1, 1, 1));
    assert_eq!(pairs[0].chosen, vec![7]);
    // keep_end: rows keep their last max_length tokens, so prompts lose their start, each row by
    // its own amount; a row left without prompt drops the pair.
    let (pairs, stats) = run(4, TruncationMode::KeepEnd);
    assert_eq!((pairs.len(), stats.truncated_prompts, stats.dropped), (1, 1, 1));
    assert_eq!((pairs[0].prompt_cut, pairs[0].row_prompt(0), pairs[0].row_prompt(1)), ([1, 0], &[5][..], &[4, 5][..]));
    let b = collate(&[&pairs[0]], &CollateOptions { pad_id: t.pad_id(), ..Default::default() }).unwrap();
    assert_eq!(b.input_ids.row(0).to_vec(), vec![5, 6, 7, 0]);
    assert_eq!(b.input_ids.row(1).to_vec(), vec![4, 5, 8, 0]);
    assert_eq!((b.prompt_last_index[0], b.completion_mask.row(0).to_vec()), (0, vec![0., 1., 1., 1.]));
    assert!("keep_middle".parse::<TruncationMode>().unwrap_err().to_string().contains("--truncation-mode"));
}

#[test]
fn add_bos_token_from_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(here("word_tokenizer/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let cfg = r#"{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "add_bos_token": true}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
    let t = PairTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!((t.bos_id(), t.pad_id()), (Some(3), 0));
    let rows = load("standard.jsonl").rows;
    let (pairs, _) = t.tokenize_all(&rows, &TruncationConfig::default()).unwrap();
    assert_eq!((pairs[0].prompt.as_slice(), pairs[0].chosen.as_slice()), (&[3, 4, 5][..], &[6, 7, 0][..]));
    // "c" + "d" reads as the unknown word "cd": the prompt's "c" is not a prefix of the joint
    // tokens, so only the BOS they share stays prompt (TRL's common prefix, counted for the warning).
    let merged = parse_preferences(r#"{"prompt": "c", "chosen": "d", "rejected": "e"}"#, "m.jsonl", &LoadOptions::default()).unwrap().rows;
    let (pairs, stats) = t.tokenize_all(&merged, &TruncationConfig::default()).unwrap();
    assert_eq!((pairs[0].prompt.as_slice(), pairs[0].chosen.as_slice()), (&[3][..], &[2, 0][..]));
    assert_eq!((stats.prompt_not_prefix, stats.prompt_not_prefix_example.as_deref()), (1, Some("c")));
    // Without BOS nothing is left of that prompt and the pair is dropped (the beta head reads a
    // prompt token); with a BOS that the tokenizer does not add, the BOS stands in for it.
    let (pairs, stats) = word_tokenizer().tokenize_all(&merged, &TruncationConfig::default()).unwrap();
    assert_eq!((pairs.len(), stats.dropped_empty_prompt), (0, 1));
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<s>", "eos_token": "</s>"}"#).unwrap();
    let (pairs, _) = PairTokenizer::from_dir(dir.path()).unwrap().tokenize_all(&merged, &TruncationConfig::default()).unwrap();
    assert_eq!((pairs[0].prompt.as_slice(), pairs[0].chosen.as_slice()), (&[3][..], &[2, 0][..]));
}

#[path = "data_cases/loader.rs"]
mod loader;
#[path = "data_cases/shared.rs"]
mod shared_fixtures;
#[path = "data_cases/templates.rs"]
mod templates;
