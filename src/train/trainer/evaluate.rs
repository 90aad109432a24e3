//! The evaluate phase: the eval data through the eval graph with the current parameters, summed
//! up as one metrics record.

use ort::session::Session;
use serde_json::{Map, Value};

use crate::distributed::wire::{Reader, Writer};
use crate::distributed::Collective;
use crate::dpo::Manifest;
use crate::text::TokenizedPair;
use crate::train::batch::{collate_parts, CollateOptions};
use crate::train::checkpoint::TrainerState;
use crate::train::device::Device;
use crate::train::metrics::{num, summarise, summarise_groups, PairValues};
use crate::train::reference::{batch_refs, RefTable};
use crate::train::session_io::{run_graph, BatchBetaInputs, Feeds, GraphBatch};
use crate::{Error, Result};

pub struct Evaluator<'a> {
    pub pairs: &'a [TokenizedPair],
    pub refs: RefTable,
    pub collate: CollateOptions,
    pub batch_size: usize,
}

impl Evaluator<'_> {
    /// The `eval/` record at `step` (`epoch`). `tstate`: beta-DPO's running margin statistics and
    /// epsilon-DPO's beta, read and left unchanged. With several ranks each computes a share of the
    /// chunks and every rank gets the record one process would.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        session: &mut Session,
        m: &Manifest,
        params: &Feeds,
        tstate: &TrainerState,
        device: &Device,
        coll: &dyn Collective,
        step: u64,
        epoch: f64,
    ) -> Result<Map<String, Value>> {
        let prefix = "eval/";
        let spec = m.graph("eval")?;
        let mut mine = Vec::new();
        let stats = tstate.margin_stats;
        let epsilon_beta = tstate.epsilon_beta.unwrap_or_default() as f32;
        let extra = BatchBetaInputs { margin_stats: [stats.mean as f32, stats.std as f32], selection_noise: Vec::new(), epsilon_beta, ..Default::default() };
        // Whole chunks round-robin over the ranks: each chunk is computed as one process would.
        for (i, chunk) in self.pairs.chunks(self.batch_size).enumerate().filter(|(i, _)| i % coll.size() == coll.rank()) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            // in the passes training computes (`--micro-batch-tokens`): the same values, one pass's memory
            let (mut loss_sum, mut values) = (0.0f64, PairValues::default());
            for batch in collate_parts(&refs, 0, 1, &self.collate)? {
                let r = batch_refs(&self.refs, &batch.source_indices)?;
                let (out, _) = run_graph(session, spec, &GraphBatch { batch: &batch, refs: &r, batch_beta: &extra }, params, &[], device)?;
                loss_sum += out.loss as f64 * batch.pairs() as f64;
                values.extend(PairValues::from_outputs(&out.chosen_rewards, &out.rejected_rewards, &out.policy_logps, &r, &out.beta, batch.groups.clone()));
            }
            mine.push((i, (loss_sum / chunk.len() as f64) as f32, values));
        }
        let chunks = if coll.size() > 1 { gather_chunks(coll, &mine)? } else { mine };
        let mut all = PairValues::default();
        let mut loss_sum = 0.0f64;
        for (_, loss, values) in chunks {
            loss_sum += loss as f64 * values.len() as f64;
            all.extend(values);
        }
        let mut rec = Map::new();
        rec.insert(format!("{prefix}loss"), num(loss_sum / self.pairs.len() as f64));
        summarise(&all, prefix, &mut rec);
        summarise_groups(&all, prefix, &mut rec);
        rec.insert("step".into(), Value::from(step));
        rec.insert("epoch".into(), num(epoch));
        Ok(rec)
    }
}

/// Every rank's `(chunk index, loss, values)`, all of them in chunk order.
fn gather_chunks(coll: &dyn Collective, mine: &[(usize, f32, PairValues)]) -> Result<Vec<(usize, f32, PairValues)>> {
    let mut w = Writer::default();
    w.u64(mine.len() as u64);
    for (i, loss, values) in mine {
        w.u64(*i as u64);
        w.f32s(&[*loss]);
        values.write(&mut w);
    }
    let mut all = Vec::new();
    for bytes in coll.gather(&w.bytes)? {
        let mut r = Reader::new(&bytes);
        for _ in 0..r.u64()? {
            let i = r.u64()? as usize;
            let loss = *r.f32s()?.first().ok_or_else(|| Error::Distributed("a rank sent an eval chunk without its loss".into()))?;
            all.push((i, loss, PairValues::read(&mut r)?));
        }
    }
    all.sort_by_key(|c| c.0);
    Ok(all)
}
