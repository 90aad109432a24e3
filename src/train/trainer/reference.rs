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
use crate::train::config::TrainConfig;
use crate::train::reference::{cache_key, RefCache, RefModel, RefTable};
use crate::Result;

/// Reference log-probs by source index.
pub struct References {
    pub train: RefTable,
    /// With eval data: every eval pair, when an evaluation will run.
    pub eval: Option<RefTable>,
    /// Pairs computed by this run (the others came from the cache).
    pub computed: usize,
}

pub fn reference(cfg: &TrainConfig, p: &mut Prepared) -> Result<References> {
    let done = p.resume.as_ref().map_or(0, |r| r.state.step);
    let total = p.total_steps(cfg);
    let batches = total.saturating_sub(done) * cfg.grad_accum as u64;
    // A fresh run evaluates at step 0; any run that steps evaluates at its last step.
    let evaluates = p.resume.is_none() || done < total;

    let mut train = RefCache::open(&p.run, "train", &p.train_key);
    let used: HashSet<usize> = p.loader.upcoming(batches).iter().map(|pair| pair.source_index).collect();
    let pairs = p.loader.pairs();
    let first_epoch = p.loader.epoch_batches(0).into_iter().map(|b| b.iter().map(|&i| &pairs[i]).collect());
    let train_missing = train.missing(first_epoch, |pair| used.contains(&pair.source_index));
    let mut eval = match &p.eval_pairs {
        Some(pairs) => Some((RefCache::open(&p.run, "eval", &cache_key(pairs, &cfg.artifacts, &p.manifest)?), pairs)),
        None => None,
    };
    let eval_missing = match &eval {
        Some((cache, pairs)) if evaluates => cache.missing(pairs.chunks(cfg.batch_size).map(|c| c.iter().collect()), |_| true),
        _ => Vec::new(),
    };

    let computed = train_missing.iter().chain(&eval_missing).map(Vec::len).sum::<usize>();
    let bar = progress::bar("reference log-probs", computed as u64, 0, cfg.progress && computed > 0);
    let spec = p.manifest.graph("eval")?;
    let mut model = RefModel { session: &mut p.sessions.eval, spec, params: &p.initial, collate: &p.collate, device: &p.device };
    train.compute(&train_missing, &mut model, |n| bar.inc(n as u64))?;
    if let Some((cache, _)) = &mut eval {
        cache.compute(&eval_missing, &mut model, |n| bar.inc(n as u64))?;
    }
    bar.finish_and_clear();
    Ok(References { train: train.into_table(), eval: eval.map(|(cache, _)| cache.into_table()), computed })
}
