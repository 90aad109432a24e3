//! The step phase: one optimizer step, that is `grad_accum` micro-batches through the train graph,
//! their gradients summed, the AdamW update, and the step's metrics record. With several ranks each
//! runs its share of every micro-batch and one allreduce averages the gradients before the update
//! (see [`super::ranks`]).

use std::path::Path;
use std::time::Instant;

use ort::value::Tensor;
use serde_json::{Map, Value};

use super::allreduce::gradient_reducer;
use super::gradient_reduce::GradientReduce;
use super::prepare::{uses_fused, Prepared, Sessions};
use super::ranks::gather_pairs;
use crate::distributed::Collective;
use crate::dpo::manifest::GraphSpec;
use crate::dpo::EpsilonDpoConfig;
use crate::train::batch::{Batch, DataLoader};
use crate::train::batch_beta::MarginStats;
use crate::train::checkpoint::TrainerState;
use crate::train::config::TrainConfig;
use crate::train::device::Device;
use crate::train::epsilon_beta::{self, StepTally};
use crate::train::fused_adamw::{self, ParamKind};
use crate::train::loss_scale::Verdict;
use crate::train::metrics::{num, summarise, summarise_groups, PairValues};
use crate::train::optimizer_step::{apply, Accumulator, Hyper, State};
use crate::train::reference::{batch_refs, RefTable};
use crate::train::schedule::{factor, warmup_steps};
use crate::train::session_io::{run_graph, GraphBatch};
use crate::{Error, Result};

/// What stays the same from step to step.
pub struct Stepper<'a> {
    cfg: &'a TrainConfig,
    train_spec: GraphSpec,
    opt_spec: GraphSpec,
    /// The train graph's gradient output of each parameter, in the parameters' order.
    grad_names: Vec<String>,
    kinds: Vec<ParamKind>,
    fused: bool,
    /// Sums the gradients of micro-batches and their parts in one process (built on first use).
    accumulator: Option<Accumulator>,
    shapes: Vec<Vec<i64>>,
    session_config: crate::runtime::SessionConfig,
    device: Device,
    /// Sums the ranks' weighted gradients (only with several ranks).
    gradient_sum: Option<Box<dyn GradientReduce>>,
    coll: &'a dyn Collective,
    beta_dpo: bool,
    epsilon_dpo: Option<EpsilonDpoConfig>,
    /// Optimizer steps the run ends at.
    pub total: u64,
    /// Warm-up steps, resolved from `--warmup-steps` or `--warmup-ratio`.
    pub warmup: u64,
    pub per_epoch: f64,
}

impl<'a> Stepper<'a> {
    pub fn new(cfg: &'a TrainConfig, p: &Prepared, state: &State, coll: &'a dyn Collective) -> Result<Self> {
        let manifest = &p.manifest;
        let shapes: Vec<Vec<i64>> = manifest.trainable().map(|t| t.shape.clone()).collect();
        let gradient_sum = gradient_reducer(cfg, &shapes, coll, p.device, &p.session_config)?;
        let train_spec = manifest.graph("train")?.clone();
        let opt_spec = manifest.graph("optimizer")?.clone();
        let grad_names: Vec<String> = state
            .params
            .names
            .iter()
            .map(|p| train_spec.output_for("gradient", p).map(|o| o.name.clone()).ok_or_else(|| Error::Artifacts(format!("no gradient output for {p}"))))
            .collect::<Result<_>>()?;
        let kinds: Vec<ParamKind> = state
            .params
            .names
            .iter()
            .map(|n| {
                let p = manifest.parameters.iter().find(|p| &p.name == n).expect("trainable parameter in the manifest");
                ParamKind { beta_head: p.beta_head, weight_decay: p.weight_decay }
            })
            .collect();
        Ok(Stepper {
            cfg,
            train_spec,
            opt_spec,
            grad_names,
            kinds,
            fused: uses_fused(cfg),
            accumulator: None,
            shapes,
            session_config: p.session_config.clone(),
            device: p.device,
            gradient_sum,
            coll,
            beta_dpo: manifest.objective.beta_dpo.is_some(),
            epsilon_dpo: manifest.objective.epsilon_dpo,
            total: p.total_steps(cfg),
            warmup: warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, p.total_steps(cfg)),
            per_epoch: p.loader.batches_per_epoch() as f64,
        })
    }

    /// Runs step `tstate.step + 1`, updating `state` and `tstate`, and returns its metrics record:
    /// micro-batches → reduce (across ranks) → update → record.
    /// A non-finite loss or gradient is an error naming the last intact checkpoint in `run`,
    /// unless `--skip-nonfinite` skips the update.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        sessions: &mut Sessions,
        loader: &mut DataLoader,
        train_refs: &RefTable,
        state: &mut State,
        tstate: &mut TrainerState,
        device: &Device,
        run: &Path,
    ) -> Result<Map<String, Value>> {
        let started = Instant::now();
        let micro = self.micro_batches(sessions, loader, train_refs, state, tstate, device)?;
        let (grads, pairs, totals, allreduce_time) = self.reduce(micro, device)?;
        let loss = totals.loss_sum / totals.pairs as f64;
        let step = tstate.step + 1;
        let update = self.update(sessions, state, tstate, &grads, loss, step, device, run)?;
        tstate.step = step;
        tstate.tokens += totals.tokens as u64;
        tstate.position = loader.position();
        let mut rec = Map::new();
        rec.insert("loss".into(), num(loss));
        summarise(&pairs, "", &mut rec);
        summarise_groups(&pairs, "", &mut rec);
        rec.insert("grad_norm".into(), num(update.norm as f64));
        let times = Times { step: started.elapsed().as_secs_f64(), graph: totals.graph_time, optimizer: update.optimizer_time, allreduce: allreduce_time };
        self.record(&mut rec, tstate, &totals, &update, times);
        Ok(rec)
    }

    /// The step's `grad_accum` micro-batches through the train graph: their gradients summed (here, or
    /// weighted into the ranks' sum) and their pairs' values and totals kept.
    fn micro_batches(
        &mut self,
        sessions: &mut Sessions,
        loader: &mut DataLoader,
        train_refs: &RefTable,
        state: &State,
        tstate: &mut TrainerState,
        device: &Device,
    ) -> Result<MicroBatches> {
        let cfg = self.cfg;
        let mut m = MicroBatches { acc: None, pairs: Vec::with_capacity(cfg.grad_accum.min(1024)), totals: Totals::default() };
        if let Some(sum) = self.gradient_sum.as_mut() {
            sum.clear();
        }
        for micro in 0..cfg.grad_accum {
            let shard = loader.next_shard(self.coll.rank(), self.coll.size())?;
            if shard.parts.is_empty() {
                // fewer pairs than ranks: this rank adds nothing to this micro-batch
                m.pairs.push(PairValues::default());
                continue;
            }
            // one entry per micro-batch, as the ranks' gather expects, whatever the parts
            let mut values = PairValues::default();
            for batch in &shard.parts {
                values.extend(self.part(sessions, batch, shard.batch_pairs, train_refs, state, tstate, device, &mut m, micro)?);
            }
            m.pairs.push(values);
        }
        Ok(m)
    }

    /// One part of a micro-batch (the whole micro-batch unless `--micro-batch-tokens` cuts it) through
    /// the train graph: its gradients, weighted by its share of the micro-batch's `batch_pairs`, added
    /// to the step's sum (a micro-batch's gradient is the mean over its pairs, and so is the parts' sum).
    #[allow(clippy::too_many_arguments)]
    fn part(
        &mut self,
        sessions: &mut Sessions,
        batch: &Batch,
        batch_pairs: usize,
        train_refs: &RefTable,
        state: &State,
        tstate: &mut TrainerState,
        device: &Device,
        m: &mut MicroBatches,
        micro: usize,
    ) -> Result<PairValues> {
        let cfg = self.cfg;
        let refs = batch_refs(train_refs, &batch.source_indices)?;
        let micro_batch = tstate.step * cfg.grad_accum as u64 + micro as u64;
        let mut extra = tstate.margin_stats.inputs(cfg.seed, micro_batch, batch.pairs());
        extra.epsilon_beta = tstate.epsilon_beta.unwrap_or_default() as f32;
        extra.loss_scale = tstate.loss_scale.map_or(1.0, |s| s.scale as f32);
        let graph_started = Instant::now();
        let fed = GraphBatch { batch, refs: &refs, batch_beta: &extra };
        let (out, grads) = run_graph(&mut sessions.train, &self.train_spec, &fed, &state.params, &self.grad_names, device)?;
        if let Some(s) = out.margin_stats {
            tstate.margin_stats = MarginStats::of(s);
        }
        let t = &mut m.totals;
        t.kept += out.kept.iter().filter(|&&k| k > 0.5).count();
        t.epsilon_steps.add(&out.epsilon_steps);
        t.graph_time += graph_started.elapsed().as_secs_f64();
        t.loss_sum += out.loss as f64 * batch.pairs() as f64;
        t.pairs += batch.pairs();
        t.tokens += batch.num_tokens;
        let values = PairValues::from_outputs(&out.chosen_rewards, &out.rejected_rewards, &out.policy_logps, &refs, &out.beta, batch.groups.clone());
        let weight = batch.pairs() as f32 / batch_pairs as f32;
        if let Some(sum) = self.gradient_sum.as_mut() {
            sum.add(grads, weight, device)?;
        } else {
            m.acc = Some(match (m.acc.take(), weight == 1.0) {
                (None, true) => grads,
                (acc, _) => self.accumulator()?.add_weighted(acc.as_deref(), &grads, weight)?,
            });
        }
        Ok(values)
    }

    /// Sums micro-batch gradients in one process (built on first use).
    fn accumulator(&mut self) -> Result<&mut Accumulator> {
        if self.accumulator.is_none() {
            self.accumulator = Some(Accumulator::new(&self.shapes, &self.session_config, self.device)?);
        }
        Ok(self.accumulator.as_mut().expect("just built"))
    }

    /// The step's gradients, pair values and totals: this process's own, or summed over the ranks
    /// (one allreduce of the gradients, one of the totals); with the allreduce's time.
    fn reduce(&mut self, m: MicroBatches, device: &Device) -> Result<(Vec<Tensor<f32>>, PairValues, Totals, Option<f64>)> {
        let MicroBatches { acc, pairs, mut totals } = m;
        let Some(sum) = self.gradient_sum.as_mut() else {
            let all = pairs.into_iter().fold(PairValues::default(), |mut all, v| {
                all.extend(v);
                all
            });
            return Ok((acc.expect("at least one micro-batch"), all, totals, None));
        };
        let allreduce_time = sum.allreduce(self.coll)?;
        let [up, down, stepped] = totals.epsilon_steps.counts();
        let mut t = [totals.loss_sum, totals.pairs as f64, totals.tokens as f64, totals.kept as f64, up, down, stepped];
        self.coll.sum_f64(&mut t)?;
        (totals.loss_sum, totals.pairs, totals.tokens, totals.kept) = (t[0], t[1] as usize, t[2] as usize, t[3] as usize);
        totals.epsilon_steps = StepTally::from_counts([t[4], t[5], t[6]]);
        Ok((sum.take(device)?, gather_pairs(self.coll, &pairs)?, totals, Some(allreduce_time)))
    }

    /// The AdamW update (fused on the host, or the optimizer graph), unless the loss or gradients are
    /// not finite: float16's loss scale then skips the step and halves, `--skip-nonfinite` skips it,
    /// and otherwise the run stops naming its last checkpoint.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        sessions: &mut Sessions,
        state: &mut State,
        tstate: &mut TrainerState,
        grads: &[Tensor<f32>],
        loss: f64,
        step: u64,
        device: &Device,
        run: &Path,
    ) -> Result<Update> {
        let cfg = self.cfg;
        let mut hyper = self.hyper(step, tstate.updates);
        if let Some(s) = tstate.loss_scale {
            // the optimizer unscales before the norm, clipping and AdamW read the gradients
            hyper.gradient_scale *= s.unscale() as f32;
        }
        let scale_used = tstate.loss_scale.map(|s| s.scale);
        let optimizer_started = Instant::now();
        let norm = match (loss.is_finite(), self.fused) {
            (false, _) => None,
            (true, true) => fused_adamw::step(state, grads, &self.kinds, &hyper, cfg.threads, cfg.flush_denormals)?,
            (true, false) => apply(sessions.optimizer.as_mut().expect("optimizer session"), &self.opt_spec, state, grads, &hyper, device)?,
        };
        let optimizer_time = optimizer_started.elapsed().as_secs_f64();
        // float16: gradients that overflowed at this scale skip the step and halve it (a finite loss only)
        let overflowed = match tstate.loss_scale.as_mut() {
            Some(s) if loss.is_finite() && (norm.is_some() || !s.at_minimum()) => s.after_step(norm.is_some()) == Verdict::Skip,
            _ => false,
        };
        let norm = match norm {
            Some(n) => n,
            None if overflowed => f32::NAN,
            None if cfg.skip_nonfinite => {
                tstate.skipped_nonfinite += 1;
                f32::NAN
            }
            None => {
                let last = crate::run_layout::list_checkpoints(run)
                    .last()
                    .map(|(s, p)| format!("; the last checkpoint, {} (step {s}), was written from finite state", p.display()))
                    .unwrap_or_default();
                return Err(Error::NonFiniteState(format!(
                    "non-finite loss or gradient at step {step} (loss {loss}){last}; --skip-nonfinite skips such steps"
                )));
            }
        };
        if norm.is_finite() {
            tstate.updates += 1;
        }
        Ok(Update { norm, optimizer_time, scale_used, overflowed })
    }

    /// The step's record beyond loss, pair metrics and norm: rates, progress, timings and each
    /// method's own values (beta-DPO's filter, epsilon-DPO's global beta, float16's loss scale).
    fn record(&self, rec: &mut Map<String, Value>, tstate: &mut TrainerState, totals: &Totals, update: &Update, times: Times) {
        let cfg = self.cfg;
        // the rates in double precision, as transformers logs them (the optimizer gets them as float32)
        let f = factor(cfg.lr_schedule, tstate.step, self.warmup, self.total);
        rec.insert("learning_rate".into(), num(cfg.lr * f));
        rec.insert("head_learning_rate".into(), num(cfg.head_lr * f));
        rec.insert("step".into(), Value::from(tstate.step));
        rec.insert("epoch".into(), num(self.epoch(tstate)));
        rec.insert("tokens".into(), Value::from(tstate.tokens));
        rec.insert("step_time_s".into(), num(times.step));
        rec.insert("train_graph_time_s".into(), num(times.graph));
        rec.insert("optimizer_time_s".into(), num(times.optimizer));
        if let Some(t) = times.allreduce {
            rec.insert("allreduce_time_s".into(), num(t));
        }
        if self.beta_dpo {
            rec.insert("beta_dpo/kept_fraction".into(), num(totals.kept as f64 / totals.pairs as f64));
            rec.insert("beta_dpo/margin_mean".into(), num(tstate.margin_stats.mean));
            rec.insert("beta_dpo/margin_std".into(), num(tstate.margin_stats.std));
        }
        if let (Some(beta), Some(e)) = (tstate.epsilon_beta, self.epsilon_dpo) {
            epsilon_beta::record(rec, beta, &totals.epsilon_steps);
            tstate.epsilon_beta = Some(epsilon_beta::next_beta(beta, e.epsilon, &totals.epsilon_steps));
        }
        if let Some(scale) = update.scale_used {
            rec.insert("loss_scale".into(), num(scale));
            if update.overflowed {
                rec.insert("loss_scale_overflow".into(), Value::from(true));
            }
        }
        if tstate.skipped_nonfinite > 0 {
            rec.insert("skipped_nonfinite".into(), Value::from(tstate.skipped_nonfinite));
        }
    }

    /// Epochs completed at the loader's position, fractional.
    pub fn epoch(&self, tstate: &TrainerState) -> f64 {
        (tstate.position.epoch as f64) + tstate.position.index as f64 / self.per_epoch
    }

    /// Step `step`'s hyper-parameters after `updates` applied updates.
    fn hyper(&self, step: u64, updates: u64) -> Hyper {
        let cfg = self.cfg;
        let f = factor(cfg.lr_schedule, step, self.warmup, self.total);
        Hyper {
            learning_rate: (cfg.lr * f) as f32,
            head_learning_rate: (cfg.head_lr * f) as f32,
            // Adam's bias correction counts the updates applied, not the skipped steps.
            step: (updates + 1) as f32,
            adam_beta1: cfg.adam_beta1 as f32,
            adam_beta2: cfg.adam_beta2 as f32,
            adam_epsilon: cfg.adam_epsilon as f32,
            weight_decay: cfg.weight_decay as f32,
            max_grad_norm: cfg.max_grad_norm as f32,
            gradient_scale: 1.0 / cfg.grad_accum as f32,
        }
    }
}

/// What a step's micro-batches summed.
#[derive(Default)]
struct Totals {
    loss_sum: f64,
    pairs: usize,
    tokens: usize,
    /// Pairs beta-DPO's filter kept.
    kept: usize,
    epsilon_steps: StepTally,
    graph_time: f64,
}

/// A step's micro-batches: the summed gradients (in one process), each micro-batch's pair values, totals.
struct MicroBatches {
    acc: Option<Vec<Tensor<f32>>>,
    pairs: Vec<PairValues>,
    totals: Totals,
}

/// What the update did.
struct Update {
    /// The gradients' norm; NaN when the step was skipped.
    norm: f32,
    optimizer_time: f64,
    /// float16's loss scale during this step.
    scale_used: Option<f64>,
    overflowed: bool,
}

/// Seconds spent in the step, its train-graph runs, the optimizer and the allreduce.
struct Times {
    step: f64,
    graph: f64,
    optimizer: f64,
    allreduce: Option<f64>,
}
