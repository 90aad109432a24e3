//! The objective's reads of the packed layout: answer-token log-probs at explicit positions, and
//! the beta head's context vector as a weighted sum of explicit hidden states.

use crate::dpo::objective::answer_logps::{tokens_to_sequences, AnswerTokens, ModelTensors, REF_LOGPS};
use crate::graph::Builder;
use crate::onnx::{attr_i, attr_s, attr_t, dtype, value_info, zero_value, Dim, ValueInfoProto};

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
    // A segment sum (as the answer log-probs'): each sequence's reads added in order from zero, so
    // a sequence's context is the same bits in a data-parallel shard as in its whole batch, which a
    // product with a one-hot matrix does not give when a sequence has several reads (`--beta-aggregate mean`).
    let count = b.dim_scalar(REF_LOGPS, 0, "beta/sequence_count");
    let first = b.ints(&[0]);
    let count1 = b.op("Unsqueeze", &[&count, &first], vec![], "beta/sequence_count1");
    let read_shape = b.op("Shape", &[&weighted], vec![], "beta/read_shape");
    let (one, two) = (b.ints(&[1]), b.ints(&[2]));
    let width = b.op("Slice", &[&read_shape, &one, &two], vec![], "beta/hidden_width");
    let shape = b.op("Concat", &[&count1, &width], vec![attr_i("axis", 0)], "beta/hidden_shape");
    let zeros = b.op("ConstantOfShape", &[&shape], vec![attr_t("value", zero_value(dtype::FLOAT))], "beta/hidden_zeros");
    let seq = b.op("Unsqueeze", &[HEAD_SEQUENCE, &last], vec![], "beta/read_sequence");
    let seq = b.op("Expand", &[&seq, &read_shape], vec![], "beta/read_sequence_wide");
    b.op("ScatterElements", &[&zeros, &seq, &weighted], vec![attr_i("axis", 0), attr_s("reduction", "add")], "beta/hidden")
}
