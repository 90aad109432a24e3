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
    probe_shapes(graph, &batches(layout, sig, vocab, batch_inputs, cfg))
}

/// The two probe batches of the layout, with the inputs the objective's method reads.
fn batches(layout: Layout, sig: &LmSignature, vocab: i64, batch_inputs: &[TensorSpec], cfg: &ObjectiveConfig) -> ProbeBatch {
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
    probes
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
    use crate::dpo::artifacts::adapters::add;
    use crate::dpo::artifacts::layout::LaidOut;
    use crate::dpo::artifacts::recompute::{vocab_chunks, MemoryOptions};
    use crate::dpo::artifacts::{
        append_objective::append,
        layout::choose,
        load::{load, tests::quickstart_model},
    };
    use crate::dpo::model::lora::LoraOptions;
    use crate::dpo::packing::LayoutChoice;
    use crate::graph::{filled_weights, probe_shapes_with, ProbeWeights};

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

    /// Phases 1 to 5 on `model`: with LoRA (rank 2), the chosen layout, and the vocabulary cut in three
    /// slices (the chunked log-probs split the lm_head, where it is a plain product) or whole.
    fn laid_out(
        model: &std::path::Path,
        lora: bool,
        layout: LayoutChoice,
        chunked: bool,
    ) -> (LaidOut, crate::dpo::artifacts::load::LoadedModel, Vec<TensorSpec>, bool) {
        let mut m = load(model, None).unwrap();
        let opts = LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: None };
        add(&mut m.base, &m.sig, lora.then_some(&opts), &Default::default()).unwrap();
        let mut laid = choose(&m.base, &m.sig, layout).unwrap();
        let memory = MemoryOptions { vocab_chunk: if chunked { m.vocab / 3 + 1 } else { 0 }, ..Default::default() };
        let chunks = vocab_chunks(&memory, &laid.graph, &m.sig, m.vocab);
        let sliced = chunks.is_some();
        let a = append(&mut laid, &m.sig, &ObjectiveConfig::default(), chunks).unwrap();
        (laid, m, a.batch_inputs, sliced)
    }

    /// The probe that stands in for the weights (one zero row and column per product and lookup) finds
    /// every tensor's dtype and shape exactly as the probe that fills each weight with zeros at its full
    /// shape, on an exported model and on every family betadpo writes from a Hugging Face folder, padded
    /// and packed, with LoRA and the chunked lm_head; and on the imported models it fills no matrix.
    #[test]
    fn standing_in_for_the_weights_finds_the_shapes_the_full_weights_give() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let families = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2"];
        let mut models: Vec<std::path::PathBuf> = families.iter().map(|f| root.join("tests/fixtures/hf").join(f)).collect();
        models.push(quickstart_model());
        let cfg = ObjectiveConfig::default();
        let mut sliced_models = 0;
        for model in &models {
            for (lora, layout, chunked) in [(true, LayoutChoice::Auto, true), (false, LayoutChoice::Padded, false)] {
                let (laid, m, inputs, sliced) = laid_out(model, lora, layout, chunked);
                sliced_models += usize::from(sliced);
                let batch = batches(laid.layout, &m.sig, m.vocab, &inputs, &cfg);
                let want = probe_shapes_with(&laid.graph, &batch, ProbeWeights::FullFills).unwrap();
                let got = probe_shapes_with(&laid.graph, &batch, ProbeWeights::StandIns).unwrap();
                assert_eq!(got, want, "{} ({lora}, {layout:?}, {chunked})", model.display());
                let full = filled_weights(&laid.graph, ProbeWeights::FullFills).unwrap();
                let filled = filled_weights(&laid.graph, ProbeWeights::StandIns).unwrap();
                let matrices: Vec<&String> = filled.iter().filter(|w| laid.graph.initializer(w).is_some_and(|t| t.dims.len() > 1)).collect();
                assert!(full.len() > filled.len(), "{}: nothing stood in for", model.display());
                if model.is_dir() {
                    assert!(matrices.is_empty(), "{}: {matrices:?} filled", model.display());
                }
            }
        }
        assert!(sliced_models >= 7, "the chunked lm_head was probed on {sliced_models} models");
    }
}
