//! The reference phase: the reference log-probs of the training and eval pairs, from the run's
//! cache or computed with the initial parameters.

use super::prepare::Prepared;
use super::progress;
use crate::train::config::TrainConfig;
use crate::train::reference::{cache_key, reference_logps, RefTable};
use crate::Result;

/// Reference log-probs by source index.
pub struct References {
    pub train: RefTable,
    /// Present with eval data.
    pub eval: Option<RefTable>,
}

pub fn reference(cfg: &TrainConfig, p: &mut Prepared) -> Result<References> {
    let eval_len = p.eval_pairs.as_ref().map(Vec::len).unwrap_or(0);
    let bar = progress::bar("reference log-probs", (p.loader.pairs().len() + eval_len) as u64, 0, cfg.progress);
    let s = &mut p.sessions.eval;
    let (m, run, params, collate, device) = (&p.manifest, &p.run, &p.initial, &p.collate, &p.device);
    let train = reference_logps(run, "train", &p.train_key, p.loader.pairs(), m, s, params, collate, cfg.batch_size, device, |n| bar.inc(n as u64))?;
    let eval = match &p.eval_pairs {
        Some(pairs) => {
            let key = cache_key(pairs, &cfg.artifacts, m)?;
            Some(reference_logps(run, "eval", &key, pairs, m, s, params, collate, cfg.batch_size, device, |n| bar.inc(n as u64))?)
        }
        None => None,
    };
    bar.finish_and_clear();
    Ok(References { train, eval })
}
