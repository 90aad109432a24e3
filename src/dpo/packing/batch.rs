//! Laying pairs out in packed rows: each pair is `prompt · chosen · rejected`, written once, with
//! a mask that lets the chosen answer see the prompt and itself, and the rejected answer the prompt
//! and itself, never each other. Positions restart after the prompt for the rejected answer, so
//! each answer sees exactly what it would see in its own padded row: the log-probs are the same
//! numbers, computed from about half the tokens (no padding, the prompt once instead of twice).
//!
//! Sequences are numbered as in the padded layout: pair `i`'s chosen answer is sequence `i` and its
//! rejected answer `B + i`.
//!
//! An answer's last token (EOS) is only a label: nothing attends to it and its logits predict
//! nothing that is scored, so it is not written unless the beta head reads the sequence's hidden
//! states (`beta_source = sequence`).

use ndarray::{Array1, Array2, Array4};

use crate::dpo::{BetaAggregate, BetaSource};

/// One pair's tokens.
#[derive(Clone, Copy, Debug)]
pub struct PairTokens<'a> {
    pub prompt: &'a [u32],
    pub chosen: &'a [u32],
    pub rejected: &'a [u32],
}

impl<'a> PairTokens<'a> {
    /// A pair held as `[prompt, chosen, rejected]`.
    pub fn of(tokens: &'a [Vec<u32>; 3]) -> Self {
        let [prompt, chosen, rejected] = tokens;
        PairTokens { prompt, chosen, rejected }
    }

    /// Tokens written into a row: the prompt, and each answer with or without its last token.
    fn written(&self, last_tokens: bool) -> usize {
        let answer = |a: &[u32]| if last_tokens { a.len() } else { a.len().saturating_sub(1) };
        self.prompt.len() + answer(self.chosen) + answer(self.rejected)
    }
}

/// Where the beta head reads the hidden state (the objective's `beta_source` and `beta_aggregate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadReads {
    pub source: BetaSource,
    pub aggregate: BetaAggregate,
}

impl HeadReads {
    /// Where the head of `objective` reads.
    pub fn of(objective: &crate::dpo::ObjectiveConfig) -> Self {
        HeadReads { source: objective.beta_source, aggregate: objective.beta_aggregate }
    }
}

/// The packed graph inputs of one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedBatch {
    /// `[R, N]` token ids; short rows end in the pad id.
    pub input_ids: Array2<i64>,
    /// `[R, N]` 1 on tokens, 0 on row padding.
    pub attention_mask: Array2<i64>,
    /// `[R, N]` position of each token within its own sequence.
    pub positions: Array2<i64>,
    /// `[R, 1, N, N]` 0 where query `q` may attend to key `k`, `f32::MIN` elsewhere.
    pub attention_bias: Array4<f32>,
    /// `[A, 2]` (row, column) of the position whose logits predict each answer token.
    pub answer_index: Array2<i64>,
    /// `[A]` the answer tokens.
    pub answer_labels: Array1<i64>,
    /// `[A]` the sequence (`0..2B`) each answer token belongs to.
    pub answer_sequence: Array1<i64>,
    /// `[K, 2]` (row, column) of the hidden states the beta head reads.
    pub head_index: Array2<i64>,
    /// `[K]` the sequence each read belongs to.
    pub head_sequence: Array1<i64>,
    /// `[K]` weight of each read in its sequence's context vector.
    pub head_weight: Array1<f32>,
}

/// Tokens the longest of `pairs` writes into its row: the narrowest row that holds every pair.
pub fn widest_pair(pairs: &[PairTokens], head: HeadReads) -> usize {
    let last_tokens = head.source == BetaSource::Sequence;
    pairs.iter().map(|p| p.written(last_tokens)).max().unwrap_or(0)
}

/// Rows of at most `row_tokens` tokens (a longer pair gets a row of its own), filled first-fit in
/// order of decreasing pair length.
fn assign_rows(lengths: &[usize], row_tokens: usize) -> Vec<Vec<usize>> {
    let capacity = lengths.iter().copied().max().unwrap_or(0).max(row_tokens);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let n = lengths[i];
        match rows.iter_mut().find(|(used, _)| used + n <= capacity) {
            Some((used, members)) => {
                *used += n;
                members.push(i);
            }
            None => rows.push((n, vec![i])),
        }
    }
    rows.into_iter()
        .map(|(_, mut m)| {
            m.sort_unstable();
            m
        })
        .collect()
}

/// Which pairs (indices, ascending) each row holds, and the rows' width.
#[derive(Clone, Debug, PartialEq)]
pub struct RowPlan {
    pub rows: Vec<Vec<usize>>,
    pub width: usize,
}

/// How [`pack`] lays `pairs` out in rows of about `row_tokens` tokens.
pub fn plan_rows(pairs: &[PairTokens], row_tokens: usize, head: HeadReads) -> RowPlan {
    let last_tokens = head.source == BetaSource::Sequence;
    let lengths: Vec<usize> = pairs.iter().map(|p| p.written(last_tokens)).collect();
    let rows = assign_rows(&lengths, row_tokens);
    let width = rows.iter().map(|r| r.iter().map(|&i| lengths[i]).sum::<usize>()).max().unwrap_or(0).max(1);
    RowPlan { rows, width }
}

/// Packs `pairs` (at least one) into rows of about `row_tokens` tokens.
pub fn pack(pairs: &[PairTokens], row_tokens: usize, pad_id: i64, head: HeadReads) -> PackedBatch {
    lay_out(pairs, &plan_rows(pairs, row_tokens, head), pad_id, head)
}

/// Writes `pairs` into rows as `plan` says (every pair in one row; a part of another batch's plan
/// gives the rows that batch has, bit for bit).
pub fn lay_out(pairs: &[PairTokens], plan: &RowPlan, pad_id: i64, head: HeadReads) -> PackedBatch {
    let b = pairs.len();
    let last_tokens = head.source == BetaSource::Sequence;
    let (rows, width) = (&plan.rows, plan.width);
    let mut input_ids = Array2::from_elem((rows.len(), width), pad_id);
    let mut attention_mask = Array2::zeros((rows.len(), width));
    let mut positions = Array2::zeros((rows.len(), width));
    let mut bias = Array4::from_elem((rows.len(), 1, width, width), f32::MIN);
    let (mut answers, mut labels, mut answer_seq) = (Vec::new(), Vec::new(), Vec::new());
    let (mut reads, mut read_seq, mut read_weight) = (Vec::new(), Vec::new(), Vec::new());
    for (r, members) in rows.iter().enumerate() {
        let mut at = 0;
        for &i in members {
            let pair = pairs[i];
            let p = pair.prompt.len();
            let prompt_cols = at..at + p;
            let mut col = at;
            for (k, &t) in pair.prompt.iter().enumerate() {
                input_ids[[r, col]] = t as i64;
                positions[[r, col]] = k as i64;
                col += 1;
            }
            for (seq, answer) in [(i, pair.chosen), (b + i, pair.rejected)] {
                let start = col;
                for (k, &t) in answer.iter().enumerate() {
                    // predicted from the previous token of this sequence: the prompt's last for k = 0
                    let from = if k == 0 { (p > 0).then(|| at + p - 1) } else { Some(col - 1) };
                    if let Some(from) = from {
                        answers.push([r as i64, from as i64]);
                        labels.push(t as i64);
                        answer_seq.push(seq as i64);
                    }
                    if k + 1 < answer.len() || last_tokens {
                        input_ids[[r, col]] = t as i64;
                        positions[[r, col]] = (p + k) as i64;
                        col += 1;
                    }
                }
                let answer_cols = start..col;
                for q in prompt_cols.clone().chain(answer_cols.clone()) {
                    for k in prompt_cols.clone().chain(answer_cols.clone()).filter(|&k| k <= q) {
                        bias[[r, 0, q, k]] = 0.0;
                    }
                }
                let region: Vec<usize> = match head.source {
                    BetaSource::Prompt => prompt_cols.clone().collect(),
                    BetaSource::Sequence => prompt_cols.clone().chain(answer_cols).collect(),
                };
                let chosen: Vec<usize> = match head.aggregate {
                    BetaAggregate::Last => region.last().copied().into_iter().collect(),
                    BetaAggregate::Mean => region,
                };
                let w = 1.0 / chosen.len().max(1) as f32;
                for c in chosen {
                    reads.push([r as i64, c as i64]);
                    read_seq.push(seq as i64);
                    read_weight.push(w);
                }
            }
            for c in at..col {
                attention_mask[[r, c]] = 1;
            }
            at = col;
        }
        // row padding attends to itself only, so its softmax stays finite
        for c in at..width {
            bias[[r, 0, c, c]] = 0.0;
        }
    }
    let index = |v: Vec<[i64; 2]>| Array2::from_shape_vec((v.len(), 2), v.into_iter().flatten().collect()).expect("pairs of indices");
    PackedBatch {
        input_ids,
        attention_mask,
        positions,
        attention_bias: bias,
        answer_index: index(answers),
        answer_labels: Array1::from(labels),
        answer_sequence: Array1::from(answer_seq),
        head_index: index(reads),
        head_sequence: Array1::from(read_seq),
        head_weight: Array1::from(read_weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAST_PROMPT: HeadReads = HeadReads { source: BetaSource::Prompt, aggregate: BetaAggregate::Last };

    const LAST_OF_SEQUENCE: HeadReads = HeadReads { source: BetaSource::Sequence, aggregate: BetaAggregate::Last };

    #[test]
    fn one_pair_shares_its_prompt_and_restarts_positions() {
        let pair = PairTokens { prompt: &[10, 11], chosen: &[20, 21], rejected: &[30] };
        let p = pack(&[pair], 64, 0, LAST_OF_SEQUENCE);
        assert_eq!(p.input_ids.row(0).to_vec(), vec![10, 11, 20, 21, 30]);
        assert_eq!(p.positions.row(0).to_vec(), vec![0, 1, 2, 3, 2]);
        // the rejected token sees the prompt and itself, not the chosen answer
        let allowed: Vec<bool> = (0..5).map(|k| p.attention_bias[[0, 0, 4, k]] == 0.0).collect();
        assert_eq!(allowed, vec![true, true, false, false, true]);
        // chosen tokens are predicted from the prompt's last token, then from each other
        assert_eq!(p.answer_index.outer_iter().map(|r| r[1]).collect::<Vec<_>>(), vec![1, 2, 1]);
        assert_eq!(p.answer_labels.to_vec(), vec![20, 21, 30]);
        assert_eq!(p.answer_sequence.to_vec(), vec![0, 0, 1]);
        // each sequence's beta reads its last token
        assert_eq!(p.head_index.outer_iter().map(|r| r[1]).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(p.head_sequence.to_vec(), vec![0, 1]);
    }

    #[test]
    fn answers_last_tokens_are_labels_only_when_the_head_reads_the_prompt() {
        let pair = PairTokens { prompt: &[10, 11], chosen: &[20, 21], rejected: &[30] };
        let p = pack(&[pair], 64, 0, LAST_PROMPT);
        assert_eq!(p.input_ids.row(0).to_vec(), vec![10, 11, 20]);
        assert_eq!(p.positions.row(0).to_vec(), vec![0, 1, 2]);
        // every answer token is still scored, from the same positions as above
        assert_eq!(p.answer_index.outer_iter().map(|r| r[1]).collect::<Vec<_>>(), vec![1, 2, 1]);
        assert_eq!(p.answer_labels.to_vec(), vec![20, 21, 30]);
        // both sequences' beta reads the prompt's last token
        assert_eq!(p.head_index.outer_iter().map(|r| r[1]).collect::<Vec<_>>(), vec![1, 1]);
        assert_eq!(p.head_sequence.to_vec(), vec![0, 1]);
    }

    #[test]
    fn rows_fill_first_fit_and_pad_attends_to_itself() {
        let a = PairTokens { prompt: &[1, 2, 3], chosen: &[4], rejected: &[5] };
        let b = PairTokens { prompt: &[6], chosen: &[7], rejected: &[8] };
        let c = PairTokens { prompt: &[9, 9], chosen: &[9], rejected: &[9] };
        let p = pack(&[a, b, c], 7, 0, LAST_OF_SEQUENCE);
        // longest first: a (5) alone, then c (4) and b (3) share the second row
        assert_eq!(p.input_ids.dim(), (2, 7));
        assert_eq!(p.attention_mask.row(0).sum(), 5);
        assert_eq!(p.attention_bias[[0, 0, 6, 6]], 0.0);
        assert_eq!(p.attention_bias[[0, 0, 6, 5]], f32::MIN);
        // sequences keep batch numbering: pair 1's rejected answer is sequence 3 + 1
        let seqs: Vec<i64> = p.answer_sequence.to_vec();
        assert!(seqs.contains(&4) && seqs.contains(&5) && seqs.contains(&3));
    }

    #[test]
    fn mean_over_the_sequence_weights_every_token() {
        let pair = PairTokens { prompt: &[1, 2], chosen: &[3], rejected: &[4, 5, 6] };
        let p = pack(&[pair], 64, 0, HeadReads { source: BetaSource::Sequence, aggregate: BetaAggregate::Mean });
        let of = |s: i64| -> Vec<f32> { p.head_sequence.iter().zip(p.head_weight.iter()).filter(|(q, _)| **q == s).map(|(_, w)| *w).collect() };
        assert_eq!(of(0), vec![1.0 / 3.0; 3]);
        assert_eq!(of(1), vec![0.2; 5]);
    }
}
