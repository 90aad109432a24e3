//! betadpo's token ids against TRL's own. `tests/fixtures/tokens/*.json` were written by
//! `scripts/fixtures/make_trl_token_fixtures.py`, which runs TRL 1.16's DPO preprocessing
//! (`DPOTrainer._prepare_dataset`) and collator (`DataCollatorForPreference`) on the project's
//! tokenizer and data and on `../shared/fixtures`: prompt, chosen and rejected ids per pair, each
//! row as the collator cuts it to `max_length`, and TRL's warning when the prompt is not a prefix.

use std::path::{Path, PathBuf};

use betadpo::dpo::packing::HeadReads;
use betadpo::dpo::{BetaAggregate, BetaSource};
use betadpo::text::*;
use betadpo::train::batch::Packing;
use betadpo::train::*;

#[derive(serde::Deserialize)]
struct Case {
    trl: String,
    tokenizer: String,
    tokenizer_config: Option<String>,
    data: String,
    rows: usize,
    max_length: Option<usize>,
    truncation_mode: String,
    examples: Vec<Example>,
    source_index: Vec<usize>,
    not_prefix_tail: Option<String>,
}

#[derive(serde::Deserialize)]
struct Example {
    prompt_ids: Vec<u32>,
    chosen_ids: Vec<u32>,
    rejected_ids: Vec<u32>,
    chosen_input_ids: Vec<i64>,
    chosen_completion_mask: Vec<u8>,
    rejected_input_ids: Vec<i64>,
    rejected_completion_mask: Vec<u8>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn case(name: &str) -> Case {
    let path = root().join("tests/fixtures/tokens").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The case's tokenizer, rows and TRL's output; `None` (after a notice) when it reads a
/// `../shared` that is absent, which CI does not allow.
fn load(name: &str) -> Option<(Case, PairTokenizer, Vec<PreferenceRow>)> {
    let c = case(name);
    assert_eq!(c.trl, "1.16.0", "fixtures record the TRL version they came from");
    let path = |p: &str| root().join(p);
    let paths: Vec<PathBuf> = [Some(&c.tokenizer), c.tokenizer_config.as_ref(), Some(&c.data)].into_iter().flatten().map(|p| path(p)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        assert!(std::env::var_os("CI").is_none(), "CI must provide {}", missing.display());
        eprintln!("NOTICE: {} is absent; skipping case {name}", missing.display());
        return None;
    }
    let tok = PairTokenizer::from_files(&path(&c.tokenizer), c.tokenizer_config.as_deref().map(path).as_deref()).unwrap();
    let mut rows = load_preferences(&path(&c.data), &LoadOptions::default()).unwrap().rows;
    rows.truncate(c.rows);
    Some((c, tok, rows))
}

fn config(c: &Case) -> TruncationConfig {
    TruncationConfig { max_length: c.max_length, mode: c.truncation_mode.parse().unwrap() }
}

/// A row's tokens and completion mask as collated, without the padding.
fn row(b: &Batch, r: usize) -> (Vec<i64>, Vec<u8>) {
    let n = b.attention_mask.row(r).sum() as usize;
    (b.input_ids.row(r).to_vec()[..n].to_vec(), b.completion_mask.row(r).iter().take(n).map(|&m| m as u8).collect())
}

/// Ids per pair before truncation, rows after it, the pairs kept and TRL's warning.
fn check(name: &str) {
    let Some((c, tok, rows)) = load(name) else { return };
    // Before truncation: every kept example's prompt, chosen and rejected ids.
    let (pairs, _) = tok.tokenize_all(&rows, &TruncationConfig::default()).unwrap();
    assert_eq!(pairs.len(), rows.len(), "{name}: every row tokenizes");
    for (ex, &i) in c.examples.iter().zip(&c.source_index) {
        let p = &pairs[i];
        assert_eq!((&p.prompt, &p.chosen, &p.rejected), (&ex.prompt_ids, &ex.chosen_ids, &ex.rejected_ids), "{name}: row {i}");
    }
    // After truncation: the pairs kept and each row as TRL's collator cuts it. betadpo also drops a
    // pair that keep_end leaves without a prompt token in a row (its beta head reads one there).
    let (pairs, stats) = tok.tokenize_all(&rows, &config(&c)).unwrap();
    let has_prompt = |mask: &[u8]| mask.first() == Some(&0);
    let expected: Vec<(usize, &Example)> = c
        .source_index
        .iter()
        .copied()
        .zip(&c.examples)
        .filter(|(_, ex)| has_prompt(&ex.chosen_completion_mask) && has_prompt(&ex.rejected_completion_mask))
        .collect();
    assert_eq!(pairs.iter().map(|p| p.source_index).collect::<Vec<_>>(), expected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), "{name}: pairs kept");
    assert_eq!((stats.pairs, stats.kept, stats.dropped), (rows.len(), pairs.len(), rows.len() - pairs.len()), "{name}");
    for (pair, (i, ex)) in pairs.iter().zip(expected) {
        let b = collate(&[pair], &CollateOptions { pad_id: tok.pad_id(), ..Default::default() }).unwrap();
        assert_eq!(row(&b, 0), (ex.chosen_input_ids.clone(), ex.chosen_completion_mask.clone()), "{name}: chosen row of {i}");
        assert_eq!(row(&b, 1), (ex.rejected_input_ids.clone(), ex.rejected_completion_mask.clone()), "{name}: rejected row of {i}");
        assert_eq!(b.prompt_last_index[0], ex.chosen_completion_mask.iter().take_while(|&&m| m == 0).count() as i64 - 1);
    }
    assert_eq!(stats.prompt_not_prefix_example, c.not_prefix_tail, "{name}: TRL's not-a-prefix warning");
    assert_eq!(stats.prompt_not_prefix > 0, c.not_prefix_tail.is_some());
}

#[test]
fn standard_rows() {
    check("quickstart_standard");
    check("shared_standard");
}

#[test]
fn conversational_rows() {
    check("quickstart_conversational");
    check("shared_conversational");
}

#[test]
fn implicit_prompts() {
    check("quickstart_implicit");
    check("implicit_edge");
    check("implicit_conversational");
}

#[test]
fn prompts_that_are_not_a_prefix() {
    // A space at the end of the prompt merges into the answer's first word; one answer already ends with EOS.
    check("trailing_space");
    // The generation prompt opens an empty thought block that a finished turn does not have.
    check("nonprefix_template");
}

#[test]
fn tools_and_template_kwargs_reach_the_template() {
    // `tools` (JSON text, absent on odd rows) and `chat_template_kwargs` (thinking off on every third row).
    check("tools_and_template_kwargs");
}

#[test]
fn truncation_modes() {
    for name in ["standard_keep_start_16", "standard_keep_end_16", "conversational_keep_start_20", "conversational_keep_end_24", "nonprefix_keep_end_24"] {
        check(name);
    }
}

#[test]
fn keep_end_pairs_with_unequal_prompts_are_refused_by_packed_artifacts() {
    let Some((c, tok, rows)) = load("standard_keep_end_16") else { return };
    let (pairs, _) = tok.tokenize_all(&rows, &config(&c)).unwrap();
    let head = HeadReads { source: BetaSource::Prompt, aggregate: BetaAggregate::Last };
    let opts = CollateOptions { pad_id: tok.pad_id(), packing: Some(Packing { row_tokens: 512, head }), ..Default::default() };
    let (equal, unequal): (Vec<&TokenizedPair>, Vec<&TokenizedPair>) = pairs.iter().partition(|p| p.shares_prompt());
    assert!(!equal.is_empty() && !unequal.is_empty(), "the fixture has both kinds");
    let packed = collate(&equal, &opts).unwrap().packed.unwrap();
    assert_eq!(packed.answer_sequence.len(), equal.iter().map(|p| p.chosen.len() + p.rejected.len()).sum::<usize>());
    let err = collate(&unequal[..1], &opts).unwrap_err().to_string();
    assert!(err.contains("keep_end truncation cut the prompt differently") && err.contains("--layout padded"), "{err}");
}
