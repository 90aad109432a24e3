//! Agreement with the PyTorch-side fixtures: the project's own in `tests/fixtures/models`, and those
//! in `../shared/fixtures` (skipped when absent).

use super::*;

fn golden_i64(st: &safetensors::SafeTensors, name: &str) -> Vec<i64> {
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::I64, "{name}");
    v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The golden batch of a PyTorch fixture (the first 4 rows of `data`, prompt and answer encoded
/// separately) is what betadpo's TRL-style joint tokenization and collation give: on these rows
/// (answers that start with a space) the two tokenizations agree.
fn check_golden_ids(tokenizer: &Path, data: &Path, golden: &Path) {
    let t = PairTokenizer::from_dir(tokenizer).unwrap();
    let rows = load_preferences(data, &LoadOptions::default()).unwrap().rows;
    let (pairs, _) = t.tokenize_all(&rows[..4], &TruncationConfig::default()).unwrap();
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let b = collate(&refs, &CollateOptions { pad_id: t.pad_id(), ..Default::default() }).unwrap();
    let bytes = std::fs::read(golden).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("input_ids").unwrap().shape(), b.input_ids.shape());
    assert_eq!(golden_i64(&st, "input_ids"), b.input_ids.iter().copied().collect::<Vec<_>>());
    assert_eq!(golden_i64(&st, "attention_mask"), b.attention_mask.iter().copied().collect::<Vec<_>>());
    assert_eq!(golden_i64(&st, "position_ids"), b.position_ids.iter().copied().collect::<Vec<_>>());
    assert_eq!(golden_i64(&st, "prompt_last_index"), b.prompt_last_index.to_vec());
    assert_eq!(golden_i64(&st, "sequence_last_index"), b.sequence_last_index.to_vec());
    let mask = st.tensor("loss_mask").unwrap();
    let mask: Vec<f32> = mask.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(mask, b.completion_mask.iter().copied().collect::<Vec<_>>());
}

#[test]
fn tokenization_matches_pytorch_golden_ids() {
    let Some(dir) = shared() else { return };
    check_golden_ids(&dir.join("tokenizer"), &dir.join("prefs/test.jsonl"), &dir.join("tiny-gpt2-ts/golden.safetensors"));
}

#[test]
fn tokenization_matches_the_projects_golden_ids() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let quickstart = root.join("graphs/quickstart");
    check_golden_ids(&quickstart, &quickstart.join("test.jsonl"), &root.join("tests/fixtures/models/llama/golden.safetensors"));
}

#[test]
fn shared_conversational_rows_tokenize() {
    let Some(dir) = shared() else { return };
    let t = PairTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
    let rows = load_preferences(&dir.join("prefs/test_conversational.jsonl"), &LoadOptions::default()).unwrap().rows;
    assert_eq!(rows.len(), 60);
    let (gen, end) = (t.encode("<|im_start|>assistant\n").unwrap(), t.encode("<|im_end|>\n").unwrap());
    for row in &rows {
        let texts = t.texts(row).unwrap();
        assert!(texts.prompt.ends_with("<|im_start|>assistant\n"), "{:?}", texts.prompt);
        let Text::Messages(c) = &row.chosen else { panic!("messages expected") };
        assert_eq!(texts.prompt_chosen, format!("{}{}<|im_end|>\n", texts.prompt, c[0].content));
    }
    let (pairs, stats) = t.tokenize_all(&rows, &TruncationConfig::default()).unwrap();
    assert_eq!((pairs.len(), stats.dropped, stats.prompt_not_prefix), (60, 0, 0));
    for p in &pairs {
        assert!(p.prompt.ends_with(&gen));
        // An answer ends as the template closes a turn; TRL adds no EOS to conversations.
        assert!(p.chosen.ends_with(&end) && p.rejected.ends_with(&end));
    }
}
