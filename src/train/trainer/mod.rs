//! The training loop, in phases: [`prepare`] (data, sessions, the checkpoint a resumed run
//! continues) → [`reference`] (reference log-probs) → [`step`] after step, with [`evaluate`] and
//! [`save`] (checkpoints) between them, resumable at every checkpoint.

pub mod evaluate;
mod host;
pub mod prepare;
mod progress;
pub mod reference;
pub mod save;
pub mod step;

use evaluate::Evaluator;
use step::Stepper;

use crate::train::config::TrainConfig;
use crate::train::metrics::MetricsLog;
pub use crate::train::summary::{TrainSummary, CONFIG_FILE, FINAL_DIR, METRICS_FILE};
use crate::Result;

/// Trains as `betadpo train` does. A process that trains on the CPU should call
/// [`crate::runtime::keep_freed_memory_for_reuse`] first, as the command line does: without it every
/// step faults its activations in afresh (SmolLM2-135M: 2.0 instead of 1.7 s a step).
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    cfg.validate()?;
    // ONNX Runtime's pool threads get the flag from the session; the caller's thread runs work too.
    let _ftz = cfg.flush_denormals.then(crate::train::denormals::FlushGuard::new);
    let mut p = prepare::prepare(cfg)?;
    let refs = reference::reference(cfg, &mut p)?;
    let (mut tstate, mut state) = prepare::start_state(&mut p, cfg)?;
    let resumed_from = p.resume.as_ref().map(|r| r.step);
    let cfg_text = serde_json::to_string_pretty(cfg).expect("config serialises");
    crate::onnx::write_atomic(&p.run.join(CONFIG_FILE), |w| w.write_all(cfg_text.as_bytes()))?;
    let mut log = MetricsLog::open(&p.run.join(METRICS_FILE), resumed_from)?;
    let mut stepper = Stepper::new(cfg, &p, &state)?;
    let evaluator = match (&p.eval_pairs, refs.eval) {
        (Some(pairs), Some(refs)) => Some(Evaluator { pairs, refs, collate: p.collate.clone(), batch_size: cfg.batch_size }),
        _ => None,
    };

    let mut initial_eval = None;
    if let (Some(ev), None) = (&evaluator, resumed_from) {
        let rec = ev.run(&mut p.sessions.eval, &p.manifest, &state.params, &tstate, &p.device, 0, 0.0)?;
        log.write(&rec)?;
        initial_eval = Some(rec);
    }
    let total = stepper.total;
    let pb = progress::bar("train", total, tstate.step, cfg.progress);
    let mut last_train = None;
    let mut final_eval = None;
    while tstate.step < total {
        let rec = stepper.step(&mut p.sessions, &mut p.loader, &refs.train, &mut state, &mut tstate, &p.device, &p.run).inspect_err(|_| pb.abandon())?;
        log.write(&rec)?;
        pb.set_message(progress::step_message(&rec));
        let step = tstate.step;
        pb.set_position(step);
        last_train = Some(rec);

        let is_last = step == total;
        if let Some(ev) = &evaluator {
            if is_last || (cfg.eval_every > 0 && step % cfg.eval_every == 0) {
                let rec = ev.run(&mut p.sessions.eval, &p.manifest, &state.params, &tstate, &p.device, step, stepper.epoch(&tstate))?;
                log.write(&rec)?;
                pb.println(progress::eval_line(step, &rec));
                if is_last {
                    final_eval = Some(rec);
                }
            }
        }
        if is_last || (cfg.save_every > 0 && step % cfg.save_every == 0) {
            save::checkpoint(&p.run, &tstate, &state, &p.device, cfg.save_total_limit)?;
        }
    }
    pb.finish_and_clear();
    save::final_params(&p.run, &cfg.artifacts, tstate.step, &state, &p.device)?;
    let report = crate::train::report::write_report(&p.run)?;
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
