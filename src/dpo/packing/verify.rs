//! A numerical check of the packed layout against the model itself. The packed graphs replace the
//! model's attention mask and positions; build-graph verifies that structurally. This runs the
//! artifacts' `eval` graph (packed) and `infer` graph (the model's own forward on padded rows, with
//! its own mask and positions) on the same random pairs and parameters, and compares each
//! sequence's answer log-prob and beta.

use ndarray::{ArrayD, Axis, IxDyn};
use ort::session::Session;
use rand::Rng;

use super::{pack, HeadReads, PairTokens};
use crate::dpo::manifest::{GraphSpec, Manifest};
use crate::dpo::BetaSource;
use crate::runtime::{f32_output, run, HostTensor};
use crate::text::RightPadded;
use crate::{Error, Result};

/// Relative tolerance on log-probs (and on betas), floored at 1: float32 sums in a different order
/// stay below 1e-6 (SmolLM2: 5e-7), while rejected answers positioned after the chosen ones instead
/// of after the prompt already differ by 1e-4 on the tiny random Llama fixture.
const TOLERANCE: f64 = 2e-5;

/// Compares packed and padded forwards; `sessions` are the `eval` and `infer` sessions, `theta` gives
/// the parameters both take. Returns the largest relative differences.
//
// `!(x < tol)` on purpose: a NaN difference must fail.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn packed_matches_model(
    m: &Manifest,
    sessions: (&mut Session, &mut Session),
    theta: &dyn Fn(&str) -> Result<ArrayD<f32>>,
    rng: &mut impl Rng,
) -> Result<String> {
    let (eval_s, infer_s) = sessions;
    let vocab = m.model.vocab_size.max(2) as u32;
    // Two pairs in one row (so the mask must keep them apart), prompts and answers of uneven lengths.
    let lengths = [(5, 4, 3), (7, 2, 5)];
    let tokens: Vec<[Vec<u32>; 3]> = lengths
        .iter()
        .map(|&(p, c, r)| {
            let mut ids = |n: usize| (0..n).map(|_| rng.random_range(0..vocab)).collect::<Vec<u32>>();
            [ids(p), ids(c), ids(r)]
        })
        .collect();
    let views: Vec<PairTokens> = tokens.iter().map(PairTokens::of).collect();
    let row_tokens = tokens.iter().map(|t| t.iter().map(Vec::len).sum::<usize>()).sum();
    let batch = pack(&views, row_tokens, 0, HeadReads::of(&m.objective));
    let sequences = 2 * tokens.len();

    let eval = m.graph("eval")?;
    let batch_feeds = batch.feeds(&eval.inputs, &HostTensor::F32(ArrayD::zeros(IxDyn(&[sequences]))));
    let mut batch_feeds = batch_feeds;
    if m.objective.beta_dpo.is_some() {
        batch_feeds.extend(crate::dpo::objective::beta_dpo::probe_inputs(tokens.len()));
    }
    if let Some(e) = m.objective.epsilon_dpo {
        batch_feeds.extend(crate::dpo::objective::epsilon_dpo::probe_inputs(e.beta0));
    }
    // beta-DPO's and epsilon-DPO's betas are training quantities; the deployed model has beta_0.
    let training_beta = m.objective.beta_dpo.is_some() || m.objective.epsilon_dpo.is_some();
    let mut feeds: Vec<(&str, HostTensor)> = batch_feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    feeds.extend(eval.parameter_feeds(theta)?);
    let outs = run(eval_s, &feeds)?;
    let packed_logps = f32_output(&outs, "policy_logps")?.iter().copied().collect::<Vec<_>>();
    let packed_beta = f32_output(&outs, "beta")?.iter().copied().collect::<Vec<_>>();

    // Padded rows as TRL lays them out: chosen rows, then rejected rows.
    let rows: Vec<(&[u32], &[u32])> = (0..2).flat_map(|side| tokens.iter().map(move |t| (t[0].as_slice(), t[1 + side].as_slice()))).collect();
    let full: Vec<Vec<u32>> = rows.iter().map(|(p, a)| [*p, *a].concat()).collect();
    let infer = m.graph("infer")?;
    let (logits, full_beta) = forward(infer_s, infer, &full, theta)?;
    let padded_logps: Vec<f32> = rows
        .iter()
        .enumerate()
        .map(|(r, (p, a))| a.iter().enumerate().map(|(k, &label)| log_prob(&logits, r, p.len() + k - 1, label as usize)).sum())
        .collect();
    // At inference the head reads everything it is given: the prompt alone, or the whole sequence.
    let padded_beta = match m.objective.beta_source {
        BetaSource::Prompt => forward(infer_s, infer, &rows.iter().map(|(p, _)| p.to_vec()).collect::<Vec<_>>(), theta)?.1,
        BetaSource::Sequence => full_beta,
    };

    // One beta per pair (read from the prompt, or fixed) or one per sequence: chosen rows come first.
    let pairs = tokens.len();
    if packed_logps.len() != sequences || !(packed_beta.len() == pairs || packed_beta.len() == sequences) {
        return Err(Error::Validation(format!(
            "the packed eval graph returned {} log-probs and {} betas for {pairs} pairs",
            packed_logps.len(),
            packed_beta.len()
        )));
    }
    let padded_beta = &padded_beta[..packed_beta.len()];
    let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs() / (y as f64).abs().max(1.0)).fold(0.0, f64::max);
    let db = if training_beta { 0.0 } else { worst(&packed_beta, padded_beta) };
    let dl = worst(&packed_logps, &padded_logps);
    if !(dl < TOLERANCE && db < TOLERANCE) {
        return Err(Error::Validation(format!(
            "the packed graphs do not reproduce the model's forward: answer log-probs {packed_logps:?} (packed) against \
             {padded_logps:?} (the model on padded rows), betas {packed_beta:?} against {padded_beta:?}; rebuild with --layout padded"
        )));
    }
    let betas = if training_beta { "the training beta not compared".to_string() } else { format!("betas within {db:.1e}") };
    Ok(format!("{pairs} pairs in one packed row: log-probs within {dl:.1e}, {betas} of the model on padded rows"))
}

/// The model's forward on right-padded `rows`: logits `[rows, T, V]` and one beta per row.
fn forward(session: &mut Session, spec: &GraphSpec, rows: &[Vec<u32>], theta: &dyn Fn(&str) -> Result<ArrayD<f32>>) -> Result<(ArrayD<f32>, Vec<f32>)> {
    let RightPadded { ids, mask, positions } = RightPadded::of(rows, 0);
    let mut feeds = Vec::new();
    for i in &spec.inputs {
        let v = match i.role.as_str() {
            "input_ids" => &ids,
            "attention_mask" => &mask,
            "position_ids" => &positions,
            _ => continue,
        };
        feeds.push((i.name.as_str(), HostTensor::I64(v.clone().into_dyn())));
    }
    feeds.extend(spec.parameter_feeds(theta)?);
    let outs = run(session, &feeds)?;
    let logits_name = &spec.outputs.iter().find(|o| o.role == "logits").ok_or_else(|| Error::Artifacts("infer has no logits output".into()))?.name;
    Ok((f32_output(&outs, logits_name)?.clone(), f32_output(&outs, "beta")?.iter().copied().collect()))
}

/// `log softmax(logits[row, pos])[label]`, in double precision.
fn log_prob(logits: &ArrayD<f32>, row: usize, pos: usize, label: usize) -> f32 {
    let z = logits.index_axis(Axis(0), row);
    let z = z.index_axis(Axis(0), pos);
    let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    (z[label] as f64 - lse) as f32
}
