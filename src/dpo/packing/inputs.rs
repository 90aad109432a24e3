//! The packed layout's contract in the manifest (each input's name, role and shape) and the two
//! synthetic batches build-graph probes shapes with.

use ndarray::{ArrayD, IxDyn};

use super::objective::{ANSWER_INDEX, ANSWER_LABELS, ANSWER_SEQUENCE, HEAD_INDEX, HEAD_SEQUENCE, HEAD_WEIGHT};
use super::{pack, HeadReads, PairTokens, ATTENTION_BIAS, POSITIONS};
use crate::dpo::manifest::{SpecDim, TensorSpec};
use crate::dpo::model::LmSignature;
use crate::dpo::ObjectiveConfig;
use crate::graph::ProbeBatch;
use crate::runtime::HostTensor;

/// The packed layout's inputs before the reference log-probs: rows of packed pairs, the attention
/// bias and positions that replace the model's own, where answers and head reads are.
pub fn specs(sig: &LmSignature, own_positions: bool) -> Vec<TensorSpec> {
    use SpecDim::{Fixed, Named};
    let row = [Named("packed_rows"), Named("packed_sequence")];
    let mut v = vec![TensorSpec::new(&sig.input_ids, "input_ids", "int64", &row), TensorSpec::new(&sig.attention_mask, "attention_mask", "int64", &row)];
    match (&sig.position_ids, own_positions) {
        (_, true) => v.push(TensorSpec::new(POSITIONS, "positions", "int64", &row)),
        (Some(p), false) => v.push(TensorSpec::new(p, "position_ids", "int64", &row)),
        (None, false) => {}
    }
    let bias = [Named("packed_rows"), Fixed(1), Named("packed_sequence"), Named("packed_sequence")];
    v.push(TensorSpec::new(ATTENTION_BIAS, "attention_bias", "float32", &bias).described("0 where a token may attend, the lowest float elsewhere"));
    let answers = [Named("answer_tokens")];
    let reads = [Named("head_reads")];
    v.push(TensorSpec::new(ANSWER_INDEX, "answer_index", "int64", &[Named("answer_tokens"), Fixed(2)]).described("(row, column) predicting each answer token"));
    v.push(TensorSpec::new(ANSWER_LABELS, "answer_labels", "int64", &answers));
    v.push(
        TensorSpec::new(ANSWER_SEQUENCE, "answer_sequence", "int64", &answers)
            .described("sequence of each answer token: pair i chosen = i, rejected = pairs + i"),
    );
    v.push(
        TensorSpec::new(HEAD_INDEX, "head_index", "int64", &[Named("head_reads"), Fixed(2)])
            .described("(row, column) of each hidden state the beta head reads"),
    );
    v.push(TensorSpec::new(HEAD_SEQUENCE, "head_sequence", "int64", &reads));
    v.push(TensorSpec::new(HEAD_WEIGHT, "head_weight", "float32", &reads));
    v
}

/// The packed probes: 2 pairs in one row, then 3 pairs in two rows, answers of uneven lengths.
pub fn probe_batch(specs: &[TensorSpec], vocab: i64, cfg: &ObjectiveConfig) -> ProbeBatch {
    let make = |pairs: usize, row_tokens: usize| -> Vec<(String, HostTensor)> {
        let tokens: Vec<[Vec<u32>; 3]> = (0..pairs)
            .map(|i| {
                let ids = |n: usize, salt: usize| (0..n).map(|k| ((k * 7 + salt * 3 + i * 5 + 1) as i64 % vocab.max(2)) as u32).collect();
                [ids(3 + i, 1), ids(2 + i % 2, 2), ids(3, 3)]
            })
            .collect();
        let views: Vec<PairTokens> = tokens.iter().map(PairTokens::of).collect();
        let batch = pack(&views, row_tokens, 0, HeadReads::of(cfg));
        batch.feeds(specs, &HostTensor::F32(ArrayD::zeros(IxDyn(&[2 * pairs]))))
    };
    ProbeBatch { runs: [make(2, 64), make(3, 20)] }
}
