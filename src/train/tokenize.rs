//! Turning preference rows into token ids exactly as TRL's `DPOTrainer.tokenize_row` does.
//!
//! The prompt and each answer are encoded separately with no special tokens added, and EOS is
//! appended to each answer. Encoding separately (rather than encoding prompt+answer) keeps the
//! prompt/answer boundary exact, so the prompt tokens are identical in the chosen and rejected row and
//! the beta head reads the same context for both. Conversational rows are first rendered to text with
//! the tokenizer's chat template ([`ChatTemplate`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::train::chat_template::ChatTemplate;
use crate::train::data::{PreferenceRow, Text};

/// Tokens tried, in order, when `tokenizer_config.json` names no EOS token.
const EOS_FALLBACKS: &[&str] = &["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>"];

/// Length limits in tokens; `None` means unlimited.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TruncationConfig {
    /// Prompts longer than this keep their last tokens (the end of a prompt is what the answer follows).
    pub max_prompt_length: Option<usize>,
    /// Answers (including EOS) longer than this keep their first tokens.
    pub max_completion_length: Option<usize>,
    /// Prompt + answer longer than this lose the end of the answer.
    pub max_length: Option<usize>,
}

/// What truncation did to a dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenizeStats {
    /// Pairs seen.
    pub pairs: usize,
    /// Pairs kept.
    pub kept: usize,
    /// Prompts cut from the left.
    pub truncated_prompts: usize,
    /// Answers cut from the right; chosen and rejected are counted separately.
    pub truncated_answers: usize,
    /// Pairs dropped because an answer had no token left (the prompt filled `max_length`).
    pub dropped: usize,
    /// Pairs dropped because the prompt was empty and the tokenizer has no BOS to stand in for it
    /// (the beta head needs a last prompt token to read).
    pub dropped_empty_prompt: usize,
}

/// One tokenized pair. `chosen` and `rejected` end with EOS unless truncation cut it off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub extras: BTreeMap<String, String>,
    /// Index of the row in the loaded data, to trace a pair back to its source.
    pub source_index: usize,
}

impl TokenizedPair {
    /// Length of the longer of the two rows: what this pair contributes to a batch's padded width.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }
}

impl TruncationConfig {
    /// Truncates one pair in place and records it in `stats`; returns false if the pair must be
    /// dropped. `keep_first` is a token (BOS) that stays at the start of a left-truncated prompt.
    pub fn apply(&self, prompt: &mut Vec<u32>, answers: [&mut Vec<u32>; 2], keep_first: Option<u32>, stats: &mut TokenizeStats) -> bool {
        if let Some(max) = self.max_prompt_length {
            if prompt.len() > max {
                stats.truncated_prompts += 1;
                let keep = keep_first.filter(|&t| prompt.first() == Some(&t) && max > 0);
                prompt.drain(..prompt.len() - max);
                if let Some(t) = keep {
                    prompt[0] = t;
                }
            }
        }
        let budget = self.max_length.map(|m| m.saturating_sub(prompt.len()));
        let limit = match (self.max_completion_length, budget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut keep = true;
        for answer in answers {
            if let Some(limit) = limit {
                if answer.len() > limit {
                    stats.truncated_answers += 1;
                    answer.truncate(limit);
                }
            }
            keep &= !answer.is_empty();
        }
        if !keep {
            stats.dropped += 1;
        }
        keep
    }
}

/// The fields of `tokenizer_config.json` that matter here.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_token: Option<String>,
    pub add_bos_token: bool,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`. Tokens may be strings or `AddedToken` objects
    /// (`{"content": ...}`); `chat_template` may be a string or a list of named templates, of which
    /// `default` is used.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: invalid JSON: {e}", path.display())))?;
        let token = |key: &str| match v.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let chat_template = match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        Ok(TokenizerConfig {
            chat_template,
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            bos_token: token("bos_token"),
            add_bos_token: v.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// Reads `tokenizer.json`. The `tokenizers` crate panics on some malformed files (an `expect` in
/// its deserializers, reached by truncated JSON or a bad precompiled charsmap), so the JSON is
/// checked first, for a clear message, and a panic that remains is turned into an error.
fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let cannot = |why: String| Error::Data(format!("{}: cannot load tokenizer: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| cannot(format!("invalid JSON: {e}")))?;
    match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(loaded) => loaded.map_err(|e| cannot(e.to_string())),
        Err(_) => Err(cannot("the tokenizers library rejected its contents".into())),
    }
}

/// A tokenizer plus the special tokens and chat template needed to tokenize preference pairs.
pub struct PairTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    eos_id: u32,
    pad_id: u32,
    bos_id: Option<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for PairTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairTokenizer")
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("bos_id", &self.bos_id)
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

impl PairTokenizer {
    /// Loads `tokenizer.json`, with `config` or else the `tokenizer_config.json` beside it (optional).
    /// A `chat_template.jinja` beside it (newer `transformers` save it there) is used when the
    /// config carries no template.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self> {
        let dir = tokenizer_json.parent().map(Path::to_path_buf).unwrap_or_default();
        let tokenizer = load_tokenizer(tokenizer_json)?;
        let config_path: Option<PathBuf> = match config {
            Some(p) => Some(p.to_path_buf()),
            None => Some(dir.join("tokenizer_config.json")).filter(|p| p.exists()),
        };
        let mut cfg = match &config_path {
            Some(p) => TokenizerConfig::load(p)?,
            None => TokenizerConfig::default(),
        };
        let jinja = dir.join("chat_template.jinja");
        if cfg.chat_template.is_none() && jinja.exists() {
            cfg.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Self::new(tokenizer, cfg)
    }

    /// Loads `dir/tokenizer.json` (and `dir/tokenizer_config.json` if present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_files(&dir.join("tokenizer.json"), None)
    }

    /// Resolves the special tokens: EOS from the config or else the first of the usual names the
    /// vocabulary has; PAD from the config, else `<pad>`, else EOS (pad positions are masked, so
    /// reusing EOS is harmless).
    pub fn new(tokenizer: tokenizers::Tokenizer, cfg: TokenizerConfig) -> Result<Self> {
        let id_of = |tok: &str, what: &str| tokenizer.token_to_id(tok).ok_or_else(|| Error::Data(format!("{what} token {tok:?} is not in the vocabulary")));
        let eos_token = match &cfg.eos_token {
            Some(t) => t.clone(),
            None => EOS_FALLBACKS
                .iter()
                .find(|t| tokenizer.token_to_id(t).is_some())
                .map(|t| t.to_string())
                .ok_or_else(|| Error::Data("no end-of-sequence token: set eos_token in tokenizer_config.json".into()))?,
        };
        let eos_id = id_of(&eos_token, "eos")?;
        let pad_token = cfg.pad_token.clone().or_else(|| Some("<pad>".to_string()).filter(|p| tokenizer.token_to_id(p).is_some()));
        let pad_id = match &pad_token {
            Some(t) => id_of(t, "pad")?,
            None => eos_id,
        };
        let bos_id = cfg.bos_token.as_deref().map(|t| id_of(t, "bos")).transpose()?;
        let template = match &cfg.chat_template {
            Some(src) => Some(ChatTemplate::new(src, cfg.bos_token.clone(), Some(eos_token), pad_token)?),
            None => None,
        };
        Ok(PairTokenizer { tokenizer, template, eos_id, pad_id, bos_id, add_bos: cfg.add_bos_token })
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Encodes `text` without adding special tokens (special tokens written in the text, such as a
    /// chat template's `<|im_start|>`, are still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| Error::Data(format!("tokenizer failed: {e}")))
    }

    /// The prompt, chosen and rejected texts that get encoded; conversational rows are rendered with
    /// the chat template.
    pub fn texts(&self, row: &PreferenceRow) -> Result<(String, String, String)> {
        match (&row.prompt, &row.chosen, &row.rejected) {
            (Text::Plain(p), Text::Plain(c), Text::Plain(r)) => Ok((p.clone(), c.clone(), r.clone())),
            (Text::Messages(p), Text::Messages(c), Text::Messages(r)) => {
                let t =
                    self.template.as_ref().ok_or_else(|| Error::Data("conversational data needs a chat template (tokenizer_config.json has none)".into()))?;
                let r = t.render_pair(p, c, r)?;
                Ok((r.prompt, r.chosen, r.rejected))
            }
            _ => Err(Error::Data("prompt and answers mix plain text and messages".into())),
        }
    }

    /// Tokenizes and truncates one row; `Ok(None)` when the pair is dropped (counted in `stats`).
    pub fn tokenize_pair(&self, index: usize, row: &PreferenceRow, cfg: &TruncationConfig, stats: &mut TokenizeStats) -> Result<Option<TokenizedPair>> {
        let with_row = |e: Error| Error::Data(format!("row {index}: {e}"));
        let (p, c, r) = self.texts(row).map_err(with_row)?;
        let mut prompt = self.encode(&p).map_err(with_row)?;
        let mut chosen = self.encode(&c).map_err(with_row)?;
        let mut rejected = self.encode(&r).map_err(with_row)?;
        chosen.push(self.eos_id);
        rejected.push(self.eos_id);
        stats.pairs += 1;
        if let Some(bos) = self.bos_id {
            if (self.add_bos || prompt.is_empty()) && prompt.first() != Some(&bos) {
                prompt.insert(0, bos);
            }
        }
        if prompt.is_empty() {
            stats.dropped_empty_prompt += 1;
            return Ok(None);
        }
        if !cfg.apply(&mut prompt, [&mut chosen, &mut rejected], self.bos_id.filter(|_| self.add_bos), stats) {
            return Ok(None);
        }
        stats.kept += 1;
        Ok(Some(TokenizedPair { prompt, chosen, rejected, extras: row.extras.clone(), source_index: index }))
    }

    /// Tokenizes all rows, dropping those truncation empties.
    pub fn tokenize_all(&self, rows: &[PreferenceRow], cfg: &TruncationConfig) -> Result<(Vec<TokenizedPair>, TokenizeStats)> {
        let mut stats = TokenizeStats::default();
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            if let Some(pair) = self.tokenize_pair(i, row, cfg, &mut stats)? {
                out.push(pair);
            }
        }
        Ok((out, stats))
    }
}
