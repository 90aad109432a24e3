//! A model's limits applied to token rows before ONNX Runtime sees them: rows no longer than its
//! positions, token ids within its vocabulary, and the logits of a batch within the machine's
//! memory. ONNX Runtime would otherwise fail inside a Gather with a message that names none of
//! the flags the user can change (or abort allocating).

use crate::dpo::Manifest;
use crate::limits::{fits_in_memory, product};
use crate::{Error, Result};

pub use crate::dpo::export::{HIDDEN_SIZE_KEY, MAX_POSITIONS_KEY, VOCAB_SIZE_KEY};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Rows of the model's position table, when it has one.
    pub max_positions: Option<usize>,
    pub vocab_size: usize,
}

impl ModelLimits {
    pub fn of(m: &Manifest) -> Self {
        ModelLimits { max_positions: m.model.max_positions, vocab_size: m.model.vocab_size as usize }
    }

    /// Refuses a row of `longest` tokens beyond the model's positions; `change` says what makes rows shorter.
    pub fn check_length(&self, longest: usize, change: &str) -> Result<()> {
        match self.max_positions {
            Some(p) if longest > p => Err(Error::Data(format!("a row has {longest} tokens, but the model has only {p} positions; {change} to at most {p}"))),
            _ => Ok(()),
        }
    }

    /// Refuses token ids beyond the vocabulary: the tokenizer is not the model's.
    pub fn check_ids(&self, max_id: Option<u32>, tokenizer: &std::path::Path) -> Result<()> {
        match max_id {
            Some(id) if id as usize >= self.vocab_size => Err(Error::Data(format!(
                "{} gives token id {id}, beyond the model's vocabulary of {} tokens; use the tokenizer the model was trained with",
                tokenizer.display(),
                self.vocab_size
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a forward pass over `rows` rows of `width` tokens whose float32 logits and attention
    /// scores exceed the machine's memory. The heads are estimated from the hidden size (64 per
    /// head, 4 at least: SmolLM2-135M has 9, Llama-2-7B 32).
    pub fn check_forward_memory(&self, flag: &str, rows: usize, width: usize, hidden_size: Option<usize>, change: &str) -> Result<()> {
        let heads = (hidden_size.unwrap_or(0) / 64).max(4) as u128;
        let (r, t) = (rows as u128, width as u128);
        let bytes = product(&[r, t, self.vocab_size as u128, 4]).zip(product(&[r, t, t, heads, 4])).and_then(|(a, b)| a.checked_add(b));
        let what = format!("a forward pass over {rows} rows of up to {width} tokens (logits and about {heads} heads of attention scores)");
        fits_in_memory(flag, &what, bytes, change)
    }

    /// Refuses a batch whose float32 logits (`copies` of them: the logits, their gradient...) of
    /// `rows` rows of `width` tokens exceed the machine's memory.
    pub fn check_logits_memory(&self, flag: &str, rows: usize, width: usize, copies: usize, change: &str) -> Result<()> {
        let bytes = product(&[rows as u128, width as u128, self.vocab_size as u128, 4, copies as u128]);
        let what = format!("a batch of {rows} rows of up to {width} tokens ({} logits per token)", self.vocab_size);
        fits_in_memory(flag, &what, bytes, change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_beyond_the_limits_are_refused_naming_what_to_change() {
        let l = ModelLimits { max_positions: Some(128), vocab_size: 512 };
        assert!(l.check_length(128, "x").is_ok());
        let err = l.check_length(129, "lower --max-length").unwrap_err().to_string();
        assert_eq!(err, "a row has 129 tokens, but the model has only 128 positions; lower --max-length to at most 128");
        assert!(ModelLimits { max_positions: None, ..l }.check_length(1 << 20, "x").is_ok());
        assert!(l.check_ids(Some(511), "t".as_ref()).is_ok());
        assert!(l.check_ids(Some(512), "t".as_ref()).unwrap_err().to_string().contains("token id 512, beyond the model's vocabulary of 512 tokens"));
        let err = l.check_logits_memory("--prompt", 1, 1 << 40, 1, "shorten it").unwrap_err().to_string();
        assert!(err.contains("needs about 2.3 PB of memory"), "{err}");
    }
}
