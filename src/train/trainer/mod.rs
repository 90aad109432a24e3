//! The training loop, in phases: [`prepare`] (data, sessions, the checkpoint a resumed run
//! continues) → [`reference`] (reference log-probs) → [`step`] after step, with [`evaluate`] and
//! [`save`] (checkpoints) between them, resumable at every checkpoint.

mod allreduce;
mod device_sum;
pub mod evaluate;
mod gradient_reduce;
mod host;
pub mod prepare;
mod progress;
mod ranks;
pub mod reference;
pub mod save;
pub mod step;

use evaluate::Evaluator;
use step::Stepper;

use crate::distributed::{Collective, Single};
use crate::run_layout::{CONFIG_FILE, METRICS_FILE};
use crate::train::config::ReportTo;
use crate::train::config::TrainConfig;
use crate::train::metrics::MetricsLog;
pub use crate::train::summary::TrainSummary;
use crate::train::tensorboard::EventWriter;
use crate::Result;

/// Trains as `betadpo train` does. A process that trains on the CPU should call
/// [`crate::runtime::tune_heap`] first, as the command line does: without it every
/// step faults its activations in afresh (SmolLM2-135M: 2.0 instead of 1.7 s a step).
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    train_with(cfg, &Single)
}

/// [`train`] as one rank of a data-parallel job (`mpirun -np N betadpo train ...`): the ranks
/// share every batch (`--batch-size` is the whole batch, each rank trains on a contiguous share of
/// its pairs) and average their gradients with one allreduce before the update, so all hold the
/// same parameters; reference log-probs and evaluations are computed in whole batches spread over
/// the ranks. Rank 0 alone writes the run directory (metrics, checkpoints, report) and draws
/// progress; every rank reads it, so `--out` must be one directory all ranks see.
pub fn train_with(cfg: &TrainConfig, coll: &dyn Collective) -> Result<TrainSummary> {
    cfg.validate()?;
    let root = coll.is_root();
    // ONNX Runtime's pool threads get the flag from the session; the caller's thread runs work too.
    let _ftz = cfg.flush_denormals.then(crate::train::denormals::FlushGuard::new);
    let mut p = prepare::prepare(cfg, coll)?;
    let refs = reference::reference(cfg, &mut p, coll)?;
    let (mut tstate, mut state) = prepare::start_state(&mut p, cfg)?;
    let resumed_from = p.resume.as_ref().map(|r| r.step);
    let (mut log, mut events) = if root { open_outputs(cfg, &p.run, resumed_from)? } else { (None, None) };
    let mut stepper = Stepper::new(cfg, &p, &state, coll)?;
    if root && cfg.progress {
        eprintln!("{}", progress::header(cfg, &p.manifest, stepper.total, stepper.warmup, stepper.per_epoch));
        if let Some(e) = &events {
            eprintln!("TensorBoard: {}", e.path().display());
        }
    }
    let mut write = |rec: &serde_json::Map<String, serde_json::Value>| -> Result<()> {
        if let Some(e) = events.as_mut() {
            e.write_record(rec)?;
        }
        log.as_mut().map_or(Ok(()), |l| l.write(rec))
    };
    let evaluator = match (&p.eval_pairs, refs.eval) {
        (Some(pairs), Some(refs)) => Some(Evaluator { pairs, refs, collate: p.collate.clone(), batch_size: cfg.batch_size }),
        _ => None,
    };

    let mut initial_eval = None;
    if let (Some(ev), None) = (&evaluator, resumed_from) {
        let rec = ev.run(&mut p.sessions.eval, &p.manifest, &state.params, &tstate, &p.device, coll, 0, 0.0)?;
        write(&rec)?;
        initial_eval = Some(rec);
    }
    let total = stepper.total;
    let plain = progress::PlainLines::new(cfg, total, tstate.step, root);
    let pb = progress::bar("train", total, tstate.step, cfg.progress && root && plain.is_none());
    let mut last_train = None;
    let mut final_eval = None;
    while tstate.step < total {
        let rec = stepper.step(&mut p.sessions, &mut p.loader, &refs.train, &mut state, &mut tstate, &p.device, &p.run).inspect_err(|_| pb.abandon())?;
        write(&rec)?;
        pb.set_message(progress::step_message(&rec));
        if let Some(line) = plain.as_ref().and_then(|p| p.line(&rec)) {
            eprintln!("{line}");
        }
        let step = tstate.step;
        pb.set_position(step);
        last_train = Some(rec);

        let is_last = step == total;
        if let Some(ev) = &evaluator {
            if is_last || (cfg.eval_every > 0 && step % cfg.eval_every == 0) {
                let rec = ev.run(&mut p.sessions.eval, &p.manifest, &state.params, &tstate, &p.device, coll, step, stepper.epoch(&tstate))?;
                write(&rec)?;
                match &plain {
                    Some(_) => eprintln!("{}", progress::eval_line(step, &rec)),
                    None => pb.println(progress::eval_line(step, &rec)),
                }
                if is_last {
                    final_eval = Some(rec);
                }
            }
        }
        if is_last || (cfg.save_every > 0 && step % cfg.save_every == 0) {
            if root {
                save::checkpoint(&p.run, &tstate, &state, &p.device, cfg.save_total_limit)?;
            }
            // The others wait here, not in the next step's allreduce, whose NCCL timeout would
            // otherwise count a long save as a hung rank.
            coll.barrier()?;
        }
    }
    pb.finish_and_clear();
    let report = if root {
        save::final_params(&p.run, &cfg.artifacts, tstate.step, &state, &p.device)?;
        crate::train::report::write_report(&p.run)?
    } else {
        p.run.join(crate::run_layout::REPORT_FILE)
    };
    Ok(TrainSummary {
        run: p.run,
        steps: tstate.step,
        initial_eval,
        final_eval,
        last_train,
        resumed_from,
        reference_pairs_computed: refs.computed,
        stats: p.stats,
        report,
    })
}

/// The run's own files, written by rank 0: its configuration, the metrics log (appended to on a
/// resume) and, with `--report-to tensorboard`, the event file.
fn open_outputs(cfg: &TrainConfig, run: &std::path::Path, resumed_from: Option<u64>) -> Result<(Option<MetricsLog>, Option<EventWriter>)> {
    let cfg_text = serde_json::to_string_pretty(cfg).expect("config serialises");
    crate::temp_files::write_atomic(&run.join(CONFIG_FILE), |w| w.write_all(cfg_text.as_bytes()))?;
    let log = MetricsLog::open(&run.join(METRICS_FILE), resumed_from)?;
    let events = if cfg.report_to == ReportTo::Tensorboard { Some(EventWriter::create(run)?) } else { None };
    Ok((Some(log), events))
}
