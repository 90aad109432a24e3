//! The reference phase: the reference log-probs of the pairs this run will use, from the run's
//! cache, computing the missing ones ahead of the first step (with a progress bar).
//!
//! The pairs used are those of the batches the remaining steps draw (the loader's order for the
//! seed, from where the run continues) and, when an evaluation will run, all eval pairs; each is
//! computed in its batch of the first epoch or of the evaluator (see [`crate::train::reference`]).
//! A `--max-steps` run that trains on 40 pairs of 3000 computes 40.

use std::collections::HashSet;

use super::prepare::Prepared;
use super::progress;
use crate::distributed::wire::{Reader, Writer};
use crate::distributed::Collective;
use crate::text::TokenizedPair;
use crate::train::config::TrainConfig;
use crate::train::reference::{cache_key, RefCache, RefModel, RefTable};
use crate::{Error, Result};

/// Reference log-probs by source index.
pub struct References {
    pub train: RefTable,
    /// With eval data: every eval pair, when an evaluation will run.
    pub eval: Option<RefTable>,
    /// Pairs computed by this run (the others came from the cache).
    pub computed: usize,
}

pub fn reference(cfg: &TrainConfig, p: &mut Prepared, coll: &dyn Collective) -> Result<References> {
    let done = p.resume.as_ref().map_or(0, |r| r.state.step);
    let total = p.total_steps(cfg);
    let batches = total.saturating_sub(done) * cfg.grad_accum as u64;
    // A fresh run evaluates at step 0; any run that steps evaluates at its last step.
    let evaluates = p.resume.is_none() || done < total;

    let open = |name: &str, key: &str| {
        let cache = RefCache::open(&p.run, name, key)?;
        Ok::<_, Error>(if coll.is_root() { cache } else { cache.read_only() })
    };
    let mut train = open("train", &p.train_key)?;
    let used: HashSet<usize> = p.loader.upcoming(batches).iter().map(|pair| pair.source_index).collect();
    let pairs = p.loader.pairs();
    let first_epoch = p.loader.epoch_batches(0).into_iter().map(|b| b.iter().map(|&i| &pairs[i]).collect());
    let train_missing = train.missing(first_epoch, |pair| used.contains(&pair.source_index));
    let mut eval = match &p.eval_pairs {
        Some(pairs) => Some((open("eval", &cache_key(pairs, &cfg.artifacts, &p.manifest)?)?, pairs)),
        None => None,
    };
    let eval_missing = match &eval {
        Some((cache, pairs)) if evaluates => cache.missing(pairs.chunks(cfg.batch_size).map(|c| c.iter().collect()), |_| true),
        _ => Vec::new(),
    };

    let computed = train_missing.iter().chain(&eval_missing).map(Vec::len).sum::<usize>();
    // Every rank has read the caches before rank 0 writes them: they agree on what is missing.
    coll.barrier()?;
    let (train_mine, eval_mine) = (mine(&train_missing, coll), mine(&eval_missing, coll));
    let bar_total = train_mine.iter().chain(&eval_mine).map(Vec::len).sum::<usize>();
    let bar = progress::bar("reference log-probs", bar_total as u64, 0, cfg.progress && coll.is_root() && bar_total > 0);
    let spec = p.manifest.graph("eval")?;
    let mut model = RefModel { session: &mut p.sessions.eval, spec, params: &p.initial, collate: &p.collate, device: &p.device };
    train.compute(&train_mine, &mut model, |n| bar.inc(n as u64))?;
    if let Some((cache, _)) = &mut eval {
        cache.compute(&eval_mine, &mut model, |n| bar.inc(n as u64))?;
    }
    bar.finish_and_clear();
    if coll.size() > 1 {
        share_rows(coll, &mut train, &train_mine)?;
        if let Some((cache, _)) = &mut eval {
            share_rows(coll, cache, &eval_mine)?;
        }
    }
    Ok(References { train: train.into_table(), eval: eval.map(|(cache, _)| cache.into_table()), computed })
}

/// This rank's batches of `missing`: whole batches round-robin, so every pair is computed in the
/// batch one process would compute it in, and the cache holds the same values.
fn mine<'a>(missing: &[Vec<&'a TokenizedPair>], coll: &dyn Collective) -> Vec<Vec<&'a TokenizedPair>> {
    missing.iter().enumerate().filter(|(i, _)| i % coll.size() == coll.rank()).map(|(_, b)| b.clone()).collect()
}

/// Gives every rank the rows the others computed (rank 0 saves them).
fn share_rows(coll: &dyn Collective, cache: &mut RefCache, computed: &[Vec<&TokenizedPair>]) -> Result<()> {
    let rows: Vec<(usize, (f32, f32))> = cache.rows(computed).collect();
    let mut w = Writer::default();
    w.u64(rows.len() as u64);
    for (source, (chosen, rejected)) in &rows {
        w.u64(*source as u64);
        w.f32s(&[*chosen, *rejected]);
    }
    let mut all = Vec::new();
    for bytes in coll.gather(&w.bytes)? {
        let mut r = Reader::new(&bytes);
        for _ in 0..r.u64()? {
            let source = r.u64()? as usize;
            let v = r.f32s()?;
            let [chosen, rejected] = v[..] else {
                return Err(Error::Distributed(format!("a rank sent {} reference log-probs for pair {source}", v.len())));
            };
            all.push((source, (chosen, rejected)));
        }
    }
    cache.insert(all)
}
