//! Answer-token log-probs summed per sequence, read from the model's tensors: the part of the
//! objective both layouts share (the padded one in [`crate::dpo::objective`], the packed one in
//! [`crate::dpo::packing::objective`]) and epsilon-DPO's perturbed policies reuse, kept below all of
//! them so none imports another.

use crate::dpo::objective::chunked_logps::{token_logps, VocabChunks};
use crate::dpo::packing::Layout;
use crate::graph::Builder;
use crate::onnx::{attr_i, attr_s, attr_t, dtype, zero_value};

/// The objective's input of reference log-probs, one per sequence.
pub const REF_LOGPS: &str = "ref_logps";

/// Where the model's tensors are.
pub struct ModelTensors<'a> {
    pub input_ids: &'a str,
    pub attention_mask: &'a str,
    pub logits: &'a str,
    pub hidden: &'a str,
    pub hidden_size: i64,
    /// When set, answer log-probs apply this lm_head to the answer positions only.
    pub projection: Option<&'a crate::dpo::model::Projection>,
    pub layout: Layout,
    /// The frozen reference copy's tensors, for epsilon-DPO (see `reference_copy`).
    pub reference: Option<&'a ModelTensors<'a>>,
    /// With a plain lm_head, compute the policy's answer log-probs a vocabulary slice at a time.
    pub vocab_chunks: Option<VocabChunks>,
}

impl<'a> ModelTensors<'a> {
    /// The tensors of a recognised model; `answer_positions` lets the objective apply the lm_head
    /// to answer positions only (training), where the deployable graph keeps the full `logits`.
    pub fn of(sig: &'a crate::dpo::model::LmSignature, answer_positions: bool) -> Self {
        ModelTensors {
            input_ids: &sig.input_ids,
            attention_mask: &sig.attention_mask,
            logits: &sig.logits,
            hidden: &sig.hidden,
            hidden_size: sig.hidden_size,
            projection: if answer_positions { sig.projection.as_ref() } else { None },
            layout: Layout::Padded,
            reference: None,
            vocab_chunks: None,
        }
    }
}

/// The answer tokens of a batch: the N positions `at` [N, 2] that predict them, their labels [N],
/// and which of `count` sequences each belongs to (`seq` [N]).
#[derive(Clone, Debug)]
pub struct AnswerTokens {
    pub at: String,
    pub labels: String,
    pub seq: String,
    pub count: String,
}

/// The logits [N, V] at the positions `at` [N, 2]: with a plain lm_head it is applied there only;
/// otherwise the model's logits are gathered.
pub fn answer_logits(b: &mut Builder, m: &ModelTensors, at: &str) -> String {
    match m.projection {
        Some(p) => {
            let h = b.op("GatherND", &[m.hidden, at], vec![], "dpo/answer_hidden");
            let z = if p.trans_b {
                b.op("Gemm", &[&h, &p.weight], vec![attr_i("transB", 1)], "dpo/answer_logits")
            } else {
                b.op("MatMul", &[&h, &p.weight], vec![], "dpo/answer_logits")
            };
            match &p.bias {
                Some(bias) => b.op("Add", &[&z, bias], vec![], "dpo/answer_logits_biased"),
                None => z,
            }
        }
        None => b.op("GatherND", &[m.logits, at], vec![], "dpo/answer_logits"),
    }
}

/// Per-sequence sums [count] of the label log-probs under answer-position logits `z` [N, V].
pub fn logits_to_sequences(b: &mut Builder, z: &str, tokens: &AnswerTokens, name: &str) -> String {
    let logp = b.op("LogSoftmax", &[z], vec![attr_i("axis", -1)], "dpo/logp");
    let last = b.ints(&[-1]);
    let lab2 = b.op("Unsqueeze", &[&tokens.labels, &last], vec![], "dpo/answer_labels2");
    let picked = b.op("GatherElements", &[&logp, &lab2], vec![attr_i("axis", 1)], "dpo/token_logp2");
    let tok = b.op("Squeeze", &[&picked, &last], vec![], "dpo/token_logp");
    sequence_sums(b, &tok, tokens, name)
}

/// Per-sequence sums [count] of the answer tokens' log-probs `tok` [N].
fn sequence_sums(b: &mut Builder, tok: &str, tokens: &AnswerTokens, name: &str) -> String {
    // A segment sum that adds each sequence's tokens in order, from zero: its value depends on the
    // sequence alone, not on what else is in the batch. (A product with a one-hot matrix sums over
    // all the batch's tokens, and where a sequence's tokens fall in the kernel's blocks and lanes
    // changes its last bits: a pair then scores differently in a data-parallel shard than in the
    // whole batch its reference log-probs were computed in.)
    let first = b.ints(&[0]);
    let shape = b.op("Unsqueeze", &[&tokens.count, &first], vec![], "dpo/sequence_count");
    let zeros = b.op("ConstantOfShape", &[&shape], vec![attr_t("value", zero_value(dtype::FLOAT))], "dpo/sequence_zeros");
    b.op("ScatterElements", &[&zeros, &tokens.seq, tok], vec![attr_i("axis", 0), attr_s("reduction", "add")], name)
}

/// Sums of answer-token log-probs per sequence (the policy's `policy_logps`).
pub fn tokens_to_sequences(b: &mut Builder, m: &ModelTensors, tokens: &AnswerTokens) -> String {
    if let (Some(_), Some(chunks)) = (m.projection, &m.vocab_chunks) {
        let h = b.op("GatherND", &[m.hidden, &tokens.at], vec![], "dpo/answer_hidden");
        let tok = token_logps(b, &h, &tokens.labels, chunks);
        return sequence_sums(b, &tok, tokens, "policy_logps");
    }
    let z = answer_logits(b, m, &tokens.at);
    logits_to_sequences(b, &z, tokens, "policy_logps")
}
