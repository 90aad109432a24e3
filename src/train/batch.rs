//! Collating tokenized pairs into model inputs, and a resumable, deterministic data loader.
//!
//! The layout is TRL's concatenated forward: rows `0..B` hold prompt+chosen and rows `B..2B`
//! prompt+rejected for the same prompts, right-padded, so one forward pass scores both answers.

use ndarray::{Array1, Array2};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::distributed::share;
use crate::dpo::packing::{lay_out, plan_rows, widest_pair, HeadReads, PackedBatch, PairTokens, RowPlan};
use crate::error::{Error, Result};
use crate::text::RightPadded;
use crate::text::TokenizedPair;

/// One batch of `B` pairs as `2B` rows of width `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[2B, T]` token ids, padded with the pad id.
    pub input_ids: Array2<i64>,
    /// `[2B, T]` 1 on real tokens, 0 on padding.
    pub attention_mask: Array2<i64>,
    /// `[2B, T]` 1 where token `t` is an answer token (incl. EOS); its log-prob is read from the
    /// logits at `t - 1`.
    pub completion_mask: Array2<f32>,
    /// `[2B, T]` `0..T` on every row (right padding needs no offsets).
    pub position_ids: Array2<i64>,
    /// `[B]` index of the last prompt token of pair `i` in its chosen row: the position whose hidden
    /// state the beta head reads. The same in the rejected row, unless `keep_end` truncation cut
    /// the two rows' prompts differently (the graphs find each row's prompt from its masks).
    pub prompt_last_index: Array1<i64>,
    /// `[2B]` index of the last real token of each row.
    pub sequence_last_index: Array1<i64>,
    /// Per pair, the value of the `group_by` column (`None` without grouping or if the row lacks it).
    pub groups: Vec<Option<String>>,
    /// Per pair, its index in the loaded data.
    pub source_indices: Vec<usize>,
    /// Real (non-pad) tokens in the batch.
    pub num_tokens: usize,
    /// The same pairs in the packed layout, when the artifacts take it.
    pub packed: Option<PackedBatch>,
}

impl Batch {
    /// Number of pairs `B`.
    pub fn pairs(&self) -> usize {
        self.prompt_last_index.len()
    }
    /// Padded width `T`.
    pub fn width(&self) -> usize {
        self.input_ids.ncols()
    }
}

/// How pairs are turned into a [`Batch`].
#[derive(Debug, Clone, Default)]
pub struct CollateOptions {
    pub pad_id: u32,
    /// Extra column whose value is reported per pair (for per-group metrics).
    pub group_by: Option<String>,
    /// Round `T` up to a multiple of this (fewer distinct shapes for the runtime to plan).
    pub pad_to_multiple_of: Option<usize>,
    /// Also lay the batch out packed (for artifacts built with `--layout packed`).
    pub packing: Option<Packing>,
    /// The most tokens (rows times their width) one pass of the train graph computes: a batch laid
    /// out wider comes in parts of whole rows (of pairs, without packing), each within it or a single
    /// row (pair). 0: the whole batch at once. See [`collate_parts`].
    pub part_tokens: usize,
}

/// How pairs are packed into rows.
#[derive(Debug, Clone, Copy)]
pub struct Packing {
    /// Tokens per row (a longer pair gets a row of its own). Attention costs grow with the square
    /// of a row's length, the rest of the model does not care how tokens are split into rows.
    pub row_tokens: usize,
    /// Where the beta head reads, from the artifacts' objective.
    pub head: HeadReads,
}

/// Builds the `[chosen rows; rejected rows]` batch from `pairs` (at least one).
pub fn collate(pairs: &[&TokenizedPair], opts: &CollateOptions) -> Result<Batch> {
    let plan = match opts.packing {
        Some(pk) => Some(plan_rows(&packable(pairs)?, pk.row_tokens, pk.head)),
        None => None,
    };
    collate_as(pairs, opts, padded_width(pairs, opts), plan.as_ref())
}

/// The padded width `T` of a batch of `pairs`.
fn padded_width(pairs: &[&TokenizedPair], opts: &CollateOptions) -> usize {
    let t = pairs.iter().map(|p| p.max_len()).max().unwrap_or(0);
    match opts.pad_to_multiple_of.filter(|&m| m > 1) {
        Some(m) => t.div_ceil(m) * m,
        None => t,
    }
}

/// Rank `rank` of `size`'s share of the batch of `pairs`, in parts of at most `opts.part_tokens`
/// tokens, laid out so that every sequence is computed as in the whole batch: padded rows as wide as
/// the batch's, and with packing whole rows of the batch's packing (a contiguous run of them, with the
/// pairs they hold), so each pair's log-probs are those one process gets from the whole batch (and
/// the reference cache holds). Without packing a part is a contiguous run of pairs. Empty when the
/// share is (fewer pairs or rows than ranks).
///
/// Why parts: the train graph's memory grows with the tokens it computes at once, and on the CPU so
/// does its time per token once its tensors outgrow the caches and the heap's reused blocks
/// (SmolLM2-135M, 8 pairs of 511 tokens with `--gradient-checkpointing`: 74.6 s and 4.20 GiB a step
/// in one pass, 48.0 s and 3.5 GiB in parts of one 891-token row).
pub fn collate_parts(pairs: &[&TokenizedPair], rank: usize, size: usize, opts: &CollateOptions) -> Result<Vec<Batch>> {
    let width = padded_width(pairs, opts);
    let Some(pk) = opts.packing else {
        let mine = &pairs[share(pairs.len(), rank, size)];
        return mine.chunks(units_per_part(opts.part_tokens, 2 * width)).map(|part| collate_as(part, opts, width, None)).collect();
    };
    let plan = plan_rows(&packable(pairs)?, pk.row_tokens, pk.head);
    let rows = &plan.rows[share(plan.rows.len(), rank, size)];
    rows.chunks(units_per_part(opts.part_tokens, plan.width))
        .map(|rows| {
            let mut mine: Vec<usize> = rows.iter().flatten().copied().collect();
            mine.sort_unstable();
            // the plan's rows hold ascending pair indices; renumbered within the part they still do
            let local = |i: &usize| mine.binary_search(i).expect("a pair of these rows");
            let part_plan = RowPlan { rows: rows.iter().map(|r| r.iter().map(local).collect()).collect(), width: plan.width };
            let members: Vec<&TokenizedPair> = mine.iter().map(|&i| pairs[i]).collect();
            collate_as(&members, opts, width, Some(&part_plan))
        })
        .collect()
}

/// Rows (or pairs) of `unit_tokens` each that fit `part_tokens`: at least one, all for 0.
fn units_per_part(part_tokens: usize, unit_tokens: usize) -> usize {
    match part_tokens {
        0 => usize::MAX,
        n => (n / unit_tokens.max(1)).max(1),
    }
}

/// [`collate`] at padded width `t` (at least the longest pair), packed as `plan` says.
fn collate_as(pairs: &[&TokenizedPair], opts: &CollateOptions, t: usize, plan: Option<&RowPlan>) -> Result<Batch> {
    if pairs.is_empty() {
        return Err(Error::Data("cannot collate an empty batch".into()));
    }
    let b = pairs.len();
    // rows 0..b: prompt + chosen answer; rows b..2b: prompt + rejected answer (TRL's concatenated forward)
    let rows = (0..2 * b).map(|row| {
        let (pair, k) = (pairs[row % b], row / b);
        pair.row_prompt(k).iter().chain(answer_of(pair, k)).copied()
    });
    let RightPadded { ids: input_ids, mask: attention_mask, positions: position_ids } = RightPadded::to_width(rows, 2 * b, t, opts.pad_id as i64);
    let mut completion_mask = Array2::zeros((2 * b, t));
    let mut prompt_last_index = Array1::zeros(b);
    let mut sequence_last_index = Array1::zeros(2 * b);
    let mut num_tokens = 0;
    for (i, pair) in pairs.iter().enumerate() {
        prompt_last_index[i] = pair.row_prompt(0).len() as i64 - 1;
        for (k, row) in [i, i + b].into_iter().enumerate() {
            let (p, len) = (pair.row_prompt(k).len(), pair.row_prompt(k).len() + answer_of(pair, k).len());
            completion_mask.slice_mut(ndarray::s![row, p..len]).fill(1.0);
            sequence_last_index[row] = len as i64 - 1;
            num_tokens += len;
        }
    }
    let groups = pairs.iter().map(|p| opts.group_by.as_ref().and_then(|k| p.extras.get(k).cloned())).collect();
    let source_indices = pairs.iter().map(|p| p.source_index).collect();
    let packed = match (opts.packing, plan) {
        (Some(pk), Some(plan)) => Some(lay_out(&packable(pairs)?, plan, opts.pad_id as i64, pk.head)),
        _ => None,
    };
    Ok(Batch { input_ids, attention_mask, completion_mask, position_ids, prompt_last_index, sequence_last_index, groups, source_indices, num_tokens, packed })
}

/// Row `k` of a pair's answer: 0 the chosen, 1 the rejected.
fn answer_of(pair: &TokenizedPair, k: usize) -> &[u32] {
    if k == 0 {
        &pair.chosen
    } else {
        &pair.rejected
    }
}

/// The pairs as the packed layout takes them: one prompt that both answers follow.
/// `--pack-tokens` when it is not given: rows as wide as the data's longest pair needs, so that a long
/// pair shares its row with shorter ones and every batch packs into rows of one width (at least
/// [`DEFAULT_PACK_TOKENS`]; no wider than the model's positions, since a row's attention grows with the
/// square of its width: a pair that needs more still gets a row as wide as itself, see `assign_rows`).
pub fn pack_tokens_from_data(pairs: &[&TokenizedPair], head: HeadReads, max_positions: Option<usize>) -> Result<usize> {
    let widest = widest_pair(&packable(pairs)?, head);
    let cap = max_positions.unwrap_or(usize::MAX).max(DEFAULT_PACK_TOKENS);
    Ok(widest.clamp(DEFAULT_PACK_TOKENS, cap))
}

/// Rows of `--pack-tokens` when the data's pairs are all shorter: what SmolLM2-sized models run fastest with.
pub const DEFAULT_PACK_TOKENS: usize = 512;

fn packable<'a>(pairs: &[&'a TokenizedPair]) -> Result<Vec<PairTokens<'a>>> {
    pairs
        .iter()
        .map(|p| {
            if !p.shares_prompt() {
                return Err(Error::Data(format!(
                    "pair {} of the data (from 0): keep_end truncation cut the prompt differently before its two answers, and packed artifacts write \
                     a prompt once for both (use --truncation-mode keep_start, a larger --max-length, or artifacts built with --layout padded)",
                    p.source_index
                )));
            }
            Ok(PairTokens { prompt: p.row_prompt(0), chosen: &p.chosen, rejected: &p.rejected })
        })
        .collect()
}

/// One rank's share of a batch (the whole batch in one process; see [`collate_parts`]), in the parts
/// the train graph computes one at a time: the ranks' parts together are the batch.
#[derive(Debug)]
pub struct Shard {
    /// Empty when the batch has fewer pairs than there are ranks and this one gets none.
    pub parts: Vec<Batch>,
    /// Pairs in the whole batch: a rank's gradient counts `pairs / batch_pairs` of the batch's.
    pub batch_pairs: usize,
}

/// Order of pairs per epoch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoaderConfig {
    /// Pairs per batch (`B`).
    pub batch_size: usize,
    pub seed: u64,
    /// Shuffle every epoch; without it pairs come in file order.
    pub shuffle: bool,
    /// Length bucketing: sort pairs by length within windows of this many batches, then shuffle the
    /// order of the batches. Pairs of similar length share a batch, which cuts padding; 0 disables it.
    pub bucket_batches: usize,
    /// Drop the last, smaller batch of an epoch.
    pub drop_last: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig { batch_size: 8, seed: 0, shuffle: true, bucket_batches: 0, drop_last: false }
    }
}

/// Where a loader is: the next batch to produce is batch `index` of epoch `epoch`. Saved in
/// checkpoints; with the same data and config, [`DataLoader::seek`] resumes exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub index: usize,
}

/// Endless iterator of batches over tokenized pairs, epoch after epoch.
#[derive(Debug)]
pub struct DataLoader {
    pairs: Vec<TokenizedPair>,
    config: LoaderConfig,
    collate: CollateOptions,
    position: LoaderPosition,
    /// Batches (pair indices) of `position.epoch`.
    plan: Vec<Vec<usize>>,
}

impl DataLoader {
    pub fn new(pairs: Vec<TokenizedPair>, config: LoaderConfig, collate: CollateOptions) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::Data("batch size must be at least 1".into()));
        }
        if pairs.is_empty() || (config.drop_last && pairs.len() < config.batch_size) {
            return Err(Error::Data(format!("not enough pairs for one batch ({} pairs, batch size {})", pairs.len(), config.batch_size)));
        }
        let plan = epoch_plan(&pairs, &config, 0);
        Ok(DataLoader { pairs, config, collate, position: LoaderPosition::default(), plan })
    }

    pub fn pairs(&self) -> &[TokenizedPair] {
        &self.pairs
    }
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }
    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }
    /// The position of the next batch.
    pub fn position(&self) -> LoaderPosition {
        self.position
    }

    /// Moves to `pos` (normalised if `index` is past the end of its epoch).
    pub fn seek(&mut self, pos: LoaderPosition) {
        let per_epoch = self.plan.len();
        let pos = LoaderPosition { epoch: pos.epoch + (pos.index / per_epoch) as u64, index: pos.index % per_epoch };
        if pos.epoch != self.position.epoch {
            self.plan = epoch_plan(&self.pairs, &self.config, pos.epoch);
        }
        self.position = pos;
    }

    /// The batches of `epoch` as pair indices (for inspection and tests).
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        epoch_plan(&self.pairs, &self.config, epoch)
    }

    /// The pairs of the next `batches` batches, each once, in the order they are first drawn: the
    /// pairs that many more batches will use. The loader does not move.
    pub fn upcoming(&self, batches: u64) -> Vec<&TokenizedPair> {
        let mut drawn = vec![false; self.pairs.len()];
        let mut out = Vec::new();
        let LoaderPosition { mut epoch, mut index } = self.position;
        let mut plan = std::borrow::Cow::Borrowed(&self.plan);
        for _ in 0..batches {
            if out.len() == self.pairs.len() {
                break;
            }
            if index == plan.len() {
                epoch += 1;
                index = 0;
                plan = std::borrow::Cow::Owned(epoch_plan(&self.pairs, &self.config, epoch));
            }
            for &i in &plan[index] {
                if !std::mem::replace(&mut drawn[i], true) {
                    out.push(&self.pairs[i]);
                }
            }
            index += 1;
        }
        out
    }

    /// Produces the batch at the current position and advances.
    pub fn next_batch(&mut self) -> Result<Batch> {
        self.advance_with(collate)
    }

    /// Rank `rank` of `size`'s share of the batch at the current position, in parts (see [`Shard`]),
    /// for every rank the same advance.
    pub fn next_shard(&mut self, rank: usize, size: usize) -> Result<Shard> {
        self.advance_with(|members, opts| Ok(Shard { parts: collate_parts(members, rank, size, opts)?, batch_pairs: members.len() }))
    }

    /// `collate_with` applied to the pairs of the batch at the current position; then moves to the next.
    fn advance_with<T>(&mut self, collate_with: impl FnOnce(&[&TokenizedPair], &CollateOptions) -> Result<T>) -> Result<T> {
        let members: Vec<&TokenizedPair> = self.plan[self.position.index].iter().map(|&i| &self.pairs[i]).collect();
        let out = collate_with(&members, &self.collate)?;
        self.seek(LoaderPosition { epoch: self.position.epoch, index: self.position.index + 1 });
        Ok(out)
    }
}

/// Batches of one epoch. The random stream is ChaCha8 seeded with `seed` on stream `epoch`, so each
/// epoch's order depends only on (seed, epoch) and can be rebuilt when resuming.
fn epoch_plan(pairs: &[TokenizedPair], cfg: &LoaderConfig, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    if cfg.shuffle {
        shuffle(&mut order, &mut rng);
    }
    let b = cfg.batch_size;
    let mut batches: Vec<Vec<usize>> = if cfg.bucket_batches > 0 {
        let mut out = Vec::new();
        for window in order.chunks(cfg.bucket_batches * b) {
            let mut window = window.to_vec();
            window.sort_by_key(|&i| std::cmp::Reverse(pairs[i].max_len()));
            out.extend(window.chunks(b).map(<[usize]>::to_vec));
        }
        if cfg.shuffle {
            shuffle(&mut out, &mut rng);
        }
        out
    } else {
        order.chunks(b).map(<[usize]>::to_vec).collect()
    };
    if cfg.drop_last {
        batches.retain(|batch| batch.len() == b);
    }
    batches
}

/// Fisher-Yates with our own index draw, so the order does not change with the `rand` version
/// (a checkpoint's position must keep meaning the same batches).
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::{BetaAggregate, BetaSource};

    fn pairs(n: usize) -> Vec<TokenizedPair> {
        (0..n)
            .map(|i| {
                let len = |k: usize| 1 + (i * 7 + k * 3) % 9;
                let tokens = |k: usize, base: u32| (0..len(k)).map(|t| base + t as u32).collect::<Vec<u32>>();
                TokenizedPair {
                    prompt: tokens(0, 10),
                    chosen: tokens(1, 30),
                    rejected: tokens(2, 50),
                    prompt_cut: [0, 0],
                    extras: Default::default(),
                    source_index: 100 + i,
                }
            })
            .collect()
    }

    fn pair_of(prompt: usize, chosen: usize, rejected: usize) -> TokenizedPair {
        let ids = |n: usize| (0..n as u32).collect::<Vec<u32>>();
        TokenizedPair { prompt: ids(prompt), chosen: ids(chosen), rejected: ids(rejected), prompt_cut: [0, 0], extras: Default::default(), source_index: 0 }
    }

    /// Without `--pack-tokens`, rows are as wide as the longest pair writes (its prompt once, each
    /// answer without its last token, which is only a label), 512 at least, the model's positions at most.
    #[test]
    fn pack_tokens_follow_the_longest_pair() {
        let head = HeadReads { source: BetaSource::Prompt, aggregate: BetaAggregate::Last };
        let short = [pair_of(30, 40, 50), pair_of(100, 200, 150)];
        let long = [pair_of(30, 40, 50), pair_of(200, 400, 390), pair_of(100, 200, 150)];
        fn refs(ps: &[TokenizedPair]) -> Vec<&TokenizedPair> {
            ps.iter().collect()
        }
        assert_eq!(pack_tokens_from_data(&refs(&short), head, Some(2048)).unwrap(), DEFAULT_PACK_TOKENS);
        assert_eq!(pack_tokens_from_data(&refs(&long), head, Some(2048)).unwrap(), 200 + 399 + 389);
        assert_eq!(pack_tokens_from_data(&refs(&long), head, None).unwrap(), 988);
        assert_eq!(pack_tokens_from_data(&refs(&long), head, Some(900)).unwrap(), 900, "within the model's positions");
        assert_eq!(pack_tokens_from_data(&refs(&long), head, Some(128)).unwrap(), DEFAULT_PACK_TOKENS, "never below the default");
        let sequence = HeadReads { source: BetaSource::Sequence, aggregate: BetaAggregate::Last };
        assert_eq!(pack_tokens_from_data(&refs(&long), sequence, None).unwrap(), 990, "the head reads the last tokens");

        // every batch packs into rows as wide as the data's longest pair: a batch of the two shorter pairs
        // (118 and 448 tokens) shares one row, where rows of 512 tokens gave each a row of its own
        let packed = |batch: Vec<&TokenizedPair>, row_tokens: usize| {
            let opts = CollateOptions { pad_id: 0, packing: Some(Packing { row_tokens, head }), ..Default::default() };
            let p = collate(&batch, &opts).unwrap().packed.unwrap();
            (p.input_ids.nrows(), p.input_ids.ncols())
        };
        let from_data = pack_tokens_from_data(&refs(&long), head, None).unwrap();
        assert_eq!(packed(vec![&long[0], &long[2]], DEFAULT_PACK_TOKENS), (2, 448));
        assert_eq!(packed(vec![&long[0], &long[2]], from_data), (1, 118 + 448));
        assert_eq!(packed(refs(&long), from_data), (2, 988), "the longest pair fills its row");
    }

    /// Each rank's parts hold rows of the whole batch, bit for bit, every pair once, and within
    /// `part_tokens` unless a part is a single row (pair).
    #[test]
    fn shares_are_parts_of_the_whole_batch() {
        let data = pairs(11);
        let all: Vec<&TokenizedPair> = data.iter().collect();
        let head = HeadReads { source: BetaSource::Prompt, aggregate: BetaAggregate::Last };
        for (packing, part_tokens) in [None, Some(Packing { row_tokens: 24, head })].into_iter().flat_map(|p| [(p, 0), (p, 1), (p, 60)]) {
            let opts = CollateOptions { pad_id: 0, packing, part_tokens, ..Default::default() };
            let whole = collate(&all, &CollateOptions { part_tokens: 0, ..opts.clone() }).unwrap();
            for size in [1, 2, 3, 5] {
                let by_rank: Vec<Vec<Batch>> = (0..size).map(|r| collate_parts(&all, r, size, &opts).unwrap()).collect();
                if part_tokens == 0 {
                    assert!(by_rank.iter().all(|parts| parts.len() <= 1), "no budget: one part per rank");
                }
                let shares: Vec<Batch> = by_rank.into_iter().flatten().collect();
                for s in &shares {
                    let (rows, width) = match &s.packed {
                        Some(p) => (p.input_ids.nrows(), p.input_ids.ncols()),
                        None => (s.pairs(), 2 * s.width()),
                    };
                    assert!(part_tokens == 0 || rows == 1 || rows * width <= part_tokens, "{rows} units of {width} tokens");
                }
                if part_tokens == 1 {
                    assert!(shares.len() > size, "a budget of one token: a part per row");
                }
                let mut sources: Vec<usize> = shares.iter().flat_map(|s| s.source_indices.clone()).collect();
                sources.sort_unstable();
                assert_eq!(sources, (100..111).collect::<Vec<_>>(), "size {size}: every pair once");
                let row_of = |b: &Batch, source: usize| b.source_indices.iter().position(|&s| s == source).unwrap();
                for s in &shares {
                    assert_eq!(s.width(), whole.width(), "padded rows as wide as the batch's");
                    for &src in &s.source_indices {
                        let (i, j) = (row_of(s, src), row_of(&whole, src));
                        assert_eq!(s.input_ids.row(i), whole.input_ids.row(j));
                        assert_eq!(s.input_ids.row(s.pairs() + i), whole.input_ids.row(whole.pairs() + j));
                    }
                }
                if let Some(w) = &whole.packed {
                    // the shares' packed rows, in rank order, are the batch's packed rows
                    let rows: Vec<Vec<i64>> =
                        shares.iter().flat_map(|s| s.packed.as_ref().unwrap().input_ids.outer_iter().map(|r| r.to_vec()).collect::<Vec<_>>()).collect();
                    assert_eq!(rows, w.input_ids.outer_iter().map(|r| r.to_vec()).collect::<Vec<_>>(), "size {size}, parts of {part_tokens}");
                    assert!(w.input_ids.nrows() > 2, "the test packs into several rows");
                }
            }
        }
    }
}
