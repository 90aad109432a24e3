//! Phase 6: every tensor's dtype and shape, found by running the graph with ONNX Runtime on two
//! small synthetic batches of different sizes (`graph::probe_shapes`): the activity analysis and the
//! gradient rules need them, and two sizes tell fixed dimensions from batch-dependent ones.

use ndarray::{ArrayD, IxDyn};

use crate::dpo::manifest::TensorSpec;
use crate::dpo::model::LmSignature;
use crate::dpo::objective::{beta_dpo, epsilon_dpo};
use crate::dpo::objective::{COMPLETION_MASK, REF_LOGPS};
use crate::dpo::packing::{self, Layout};
use crate::dpo::ObjectiveConfig;
use crate::graph::{probe_shapes, Graph, ProbeBatch, TensorInfos};
use crate::runtime::HostTensor;
use crate::Result;

pub fn probe(graph: &Graph, layout: Layout, sig: &LmSignature, vocab: i64, batch_inputs: &[TensorSpec], cfg: &ObjectiveConfig) -> Result<TensorInfos> {
    let mut probes = match layout {
        Layout::Padded => padded_batches(sig, vocab),
        Layout::Packed => packing::inputs::probe_batch(batch_inputs, vocab, cfg),
    };
    if cfg.beta_dpo.is_some() {
        for (run, pairs) in probes.runs.iter_mut().zip([2, 3]) {
            run.extend(beta_dpo::probe_inputs(pairs));
        }
    }
    if let Some(e) = cfg.epsilon_dpo {
        for run in probes.runs.iter_mut() {
            run.extend(epsilon_dpo::probe_inputs(e.beta0));
        }
    }
    probe_shapes(graph, &probes)
}

/// The padded probes: 2 pairs x 6 tokens, then 3 pairs x 9 tokens; the last row is padded by two
/// tokens and answers start halfway.
fn padded_batches(sig: &LmSignature, vocab: i64) -> ProbeBatch {
    let make = |pairs: usize, t: usize| -> Vec<(String, HostTensor)> {
        let rows = 2 * pairs;
        let ids = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| ((ix[0] * 7 + ix[1] * 3 + 1) as i64) % vocab.max(2));
        let padding = |row: usize, col: usize| row == rows - 1 && col >= t - 2;
        let attn = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| i64::from(!padding(ix[0], ix[1])));
        let comp = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| if ix[1] >= t / 2 && !padding(ix[0], ix[1]) { 1.0f32 } else { 0.0 });
        let mut v = vec![(sig.input_ids.clone(), HostTensor::I64(ids)), (sig.attention_mask.clone(), HostTensor::I64(attn))];
        if let Some(p) = &sig.position_ids {
            v.push((p.clone(), HostTensor::I64(ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| ix[1] as i64))));
        }
        v.push((COMPLETION_MASK.into(), HostTensor::F32(comp)));
        v.push((REF_LOGPS.into(), HostTensor::F32(ArrayD::zeros(IxDyn(&[rows])))));
        v
    };
    ProbeBatch { runs: [make(2, 6), make(3, 9)] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpo::artifacts::{
        append_objective::append,
        layout::choose,
        load::{load, tests::quickstart_model},
    };
    use crate::dpo::packing::LayoutChoice;

    /// The probed shapes are what ONNX Runtime computed on the two batches (4 rows x 6 tokens, then
    /// 6 rows x 9): a scalar loss, one log-prob per row, hidden states [rows, tokens, hidden size].
    #[test]
    fn probed_shapes_are_those_of_the_two_probe_batches() {
        let m = load(&quickstart_model(), None).unwrap();
        let mut laid = choose(&m.base, &m.sig, LayoutChoice::Padded).unwrap();
        let cfg = ObjectiveConfig::default();
        let a = append(&mut laid, &m.sig, &cfg, None).unwrap();
        let infos = probe(&laid.graph, laid.layout, &m.sig, m.vocab, &a.batch_inputs, &cfg).unwrap();
        assert_eq!(infos[&a.obj.loss].dims, [Vec::<i64>::new(), vec![]]);
        assert_eq!(infos[&a.obj.policy_logps].dims, [vec![4], vec![6]]);
        let h = m.sig.hidden_size;
        assert_eq!(infos[&m.sig.hidden].dims, [vec![4, 6, h], vec![6, 9, h]]);
    }
}
