//! The objective's reads of the packed layout: answer-token log-probs at explicit positions, and
//! the beta head's context vector as a weighted sum of explicit hidden states.

use crate::dpo::answer_logps::{one_hot, tokens_to_sequences, AnswerTokens, ModelTensors, REF_LOGPS};
use crate::graph::Builder;
use crate::onnx::{attr_ints, dtype, value_info, Dim, ValueInfoProto};

pub const ANSWER_INDEX: &str = "answer_index";
pub const ANSWER_LABELS: &str = "answer_labels";
pub const ANSWER_SEQUENCE: &str = "answer_sequence";
pub const HEAD_INDEX: &str = "head_index";
pub const HEAD_SEQUENCE: &str = "head_sequence";
pub const HEAD_WEIGHT: &str = "head_weight";

/// The objective's packed inputs (the model's own come from [`super::make_packable`]).
pub fn inputs() -> Vec<ValueInfoProto> {
    let d = |s: &str| Dim::Sym(s.into());
    vec![
        value_info(ANSWER_INDEX, dtype::INT64, &[d("answer_tokens"), Dim::Fixed(2)]),
        value_info(ANSWER_LABELS, dtype::INT64, &[d("answer_tokens")]),
        value_info(ANSWER_SEQUENCE, dtype::INT64, &[d("answer_tokens")]),
        value_info(HEAD_INDEX, dtype::INT64, &[d("head_reads"), Dim::Fixed(2)]),
        value_info(HEAD_SEQUENCE, dtype::INT64, &[d("head_reads")]),
        value_info(HEAD_WEIGHT, dtype::FLOAT, &[d("head_reads")]),
    ]
}

/// Per-sequence log-probs `[2B]` of the answer tokens at [`ANSWER_INDEX`].
pub fn sequence_logps(b: &mut Builder, m: &ModelTensors) -> String {
    let tokens = answer_tokens(b);
    tokens_to_sequences(b, m, &tokens)
}

/// The answer tokens the packed batch lists explicitly.
pub fn answer_tokens(b: &mut Builder) -> AnswerTokens {
    let count = b.dim_scalar(REF_LOGPS, 0, "dpo/sequence_count");
    AnswerTokens { at: ANSWER_INDEX.into(), labels: ANSWER_LABELS.into(), seq: ANSWER_SEQUENCE.into(), count }
}

/// `[2B, H]`: per sequence, the weighted sum of the hidden states the head reads.
pub fn head_context(b: &mut Builder, m: &ModelTensors) -> String {
    let read = b.op("GatherND", &[m.hidden, HEAD_INDEX], vec![], "beta/read_hidden");
    let last = b.ints(&[-1]);
    let w = b.op("Unsqueeze", &[HEAD_WEIGHT, &last], vec![], "beta/read_weight");
    let weighted = b.op("Mul", &[&read, &w], vec![], "beta/weighted_reads");
    let count = b.dim_scalar(REF_LOGPS, 0, "beta/sequence_count");
    let onehot = one_hot(b, HEAD_SEQUENCE, &count, "beta/read_sequence");
    let by_sequence = b.op("Transpose", &[&onehot], vec![attr_ints("perm", &[1, 0])], "beta/sequence_reads");
    b.op("MatMul", &[&by_sequence, &weighted], vec![], "beta/hidden")
}
