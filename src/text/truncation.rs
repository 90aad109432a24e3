//! Cutting tokenized pairs to `max_length` the way TRL 1.x does (`DPOConfig.max_length`,
//! `truncation_mode`): each row, prompt + answer, is cut on its own, in the collator.
//!
//! - `keep_start` keeps a row's first `max_length` tokens, so long answers lose their end; a pair whose
//!   prompt alone fills `max_length` is dropped (it would keep no answer token).
//! - `keep_end` keeps a row's last `max_length` tokens, so a long row loses the start of its prompt,
//!   by a different amount in the chosen and the rejected row when the answers differ in length. TRL
//!   keeps a row whose prompt is cut away entirely; betadpo drops that pair, because its beta head
//!   reads the last prompt token and there is none.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::text::tokenized::TokenizedPair;

/// Which end of a row `max_length` keeps (TRL's `truncation_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    #[default]
    KeepStart,
    KeepEnd,
}

impl FromStr for TruncationMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "keep_start" => Ok(TruncationMode::KeepStart),
            "keep_end" => Ok(TruncationMode::KeepEnd),
            other => Err(Error::BadFlag { flag: "--truncation-mode".into(), detail: format!("{other:?}: expected keep_start or keep_end") }),
        }
    }
}

impl fmt::Display for TruncationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TruncationMode::KeepStart => "keep_start",
            TruncationMode::KeepEnd => "keep_end",
        })
    }
}

/// Length limit in tokens; `max_length: None` means unlimited.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TruncationConfig {
    /// Tokens a row (prompt + answer) keeps.
    pub max_length: Option<usize>,
    pub mode: TruncationMode,
}

/// What truncation and tokenization did to a dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenizeStats {
    /// Pairs seen.
    pub pairs: usize,
    /// Pairs kept.
    pub kept: usize,
    /// Rows whose prompt lost its start (`keep_end`); chosen and rejected are counted separately.
    pub truncated_prompts: usize,
    /// Rows whose answer lost its end (`keep_start`); chosen and rejected are counted separately.
    pub truncated_answers: usize,
    /// Pairs dropped because truncation left a row without prompt (`keep_end`) or without answer
    /// (`keep_start`: the prompt fills `max_length`), or because an answer had no token at all.
    pub dropped: usize,
    /// Pairs dropped because the prompt was empty and the tokenizer has no BOS to stand in for it
    /// (the beta head needs a last prompt token to read).
    pub dropped_empty_prompt: usize,
    /// Of `dropped`, the pairs truncation dropped (the rest had an answer of no token).
    pub dropped_by_truncation: usize,
    /// Pairs whose tokenized prompt is not a prefix of the tokenized prompt + answer (TRL warns):
    /// the answer starts where they diverge, and the rest of the prompt is not trained on.
    pub prompt_not_prefix: usize,
    /// The decoded prompt end left out, for the first such pair.
    pub prompt_not_prefix_example: Option<String>,
}

impl TokenizeStats {
    /// Why no pair was kept, for "no usable pairs": what dropped them and what the user can change.
    pub fn why_none(&self, cfg: &TruncationConfig) -> String {
        if self.pairs == 0 {
            return "the data holds no rows".into();
        }
        if self.dropped_by_truncation == self.pairs {
            let max = cfg.max_length.unwrap_or(0);
            return match cfg.mode {
                TruncationMode::KeepStart => format!("every prompt has --max-length ({max}) tokens or more, which leaves no answer token (raise --max-length, or use --truncation-mode keep_end)"),
                TruncationMode::KeepEnd => format!("every answer has --max-length ({max}) tokens or more, which leaves no prompt token (raise --max-length)"),
            };
        }
        let empty = self.dropped - self.dropped_by_truncation;
        if empty + self.dropped_empty_prompt == self.pairs {
            return format!(
                "{} pairs have an answer of no token and {} an empty prompt with no BOS token to stand in: does the tokenizer have a vocabulary?",
                empty, self.dropped_empty_prompt
            );
        }
        format!(
            "of {} pairs, truncation to --max-length dropped {}, {} have an answer of no token and {} an empty prompt with no BOS token to stand in",
            self.pairs, self.dropped_by_truncation, empty, self.dropped_empty_prompt
        )
    }
}

impl TruncationConfig {
    /// Truncates `pair` in place and records it in `stats`; returns false if the pair must be dropped.
    pub fn apply(&self, pair: &mut TokenizedPair, stats: &mut TokenizeStats) -> bool {
        let Some(max) = self.max_length else { return true };
        let p = pair.prompt.len();
        match self.mode {
            TruncationMode::KeepStart => {
                if p >= max {
                    return false;
                }
                for answer in [&mut pair.chosen, &mut pair.rejected] {
                    if p + answer.len() > max {
                        stats.truncated_answers += 1;
                        answer.truncate(max - p);
                    }
                }
            }
            TruncationMode::KeepEnd => {
                for (cut, answer) in pair.prompt_cut.iter_mut().zip([&pair.chosen, &pair.rejected]) {
                    let over = (p + answer.len()).saturating_sub(max);
                    if over >= p {
                        return false;
                    }
                    if over > 0 {
                        stats.truncated_prompts += 1;
                        *cut = over;
                    }
                }
            }
        }
        true
    }
}
