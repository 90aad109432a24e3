//! Turning preference rows into token ids exactly as TRL 1.x's `DPOTrainer` does.
//!
//! The prompt and prompt + answer are tokenized as wholes, and the answer is what prompt + answer has
//! beyond the tokens the two share (TRL's `common_prefix_length`). Tokenizing them jointly keeps the
//! tokens at the boundary what the model sees at inference (a space that merges into the answer's
//! first word, a template that closes the answer with `<|im_end|>\n`), and the prompt is the same
//! tokens in the chosen and the rejected row, so the beta head reads the same context for both.
//! - Standard rows: EOS is appended to each answer's text unless it ends with it already, and the
//!   texts are encoded with the tokenizer's special tokens (its post-processor, e.g. a BOS).
//! - Conversational rows: the prompt is rendered with the generation prompt, prompt + answer as a
//!   finished conversation, both by the tokenizer's chat template ([`ChatTemplate`]), and encoded
//!   as rendered; the answer ends with whatever the template closes a turn with, no EOS is added.
//!
//! When the prompt's tokens are not all a prefix of prompt + answer (a template that renders the
//! generation prompt differently from the start of a finished turn, or tokens merging across the
//! boundary), the answer starts where they diverge and the rest of the prompt is left out, as in TRL;
//! [`TokenizeStats::prompt_not_prefix`] counts it and keeps the first left-out text for a warning.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;

use crate::error::{Error, Result};
use crate::text::chat_template::{ChatTemplate, TemplateVars};
use crate::text::data::{Message, PreferenceRow, Text};
use crate::text::tokenized::TokenizedPair;
use crate::text::truncation::{TokenizeStats, TruncationConfig};

/// Tokens tried, in order, when `tokenizer_config.json` names no EOS token.
const EOS_FALLBACKS: &[&str] = &["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>"];

/// The fields of `tokenizer_config.json` that matter here.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_token: Option<String>,
    /// `None` when the config does not say (then `tokenizer.json`'s post-processor decides).
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    /// The file the chat template was read from, named in its errors.
    pub template_origin: Option<PathBuf>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`. Tokens may be strings or `AddedToken` objects
    /// (`{"content": ...}`); `chat_template` may be a string or a list of named templates, of which
    /// `default` is used.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fs_guard::read_to_string(path)?;
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
            add_bos_token: v.get("add_bos_token").and_then(Value::as_bool),
            add_eos_token: v.get("add_eos_token").and_then(Value::as_bool),
            template_origin: Some(path.to_path_buf()),
        })
    }
}

/// Reads `tokenizer.json`. The `tokenizers` crate panics on some malformed files (an `expect` in
/// its deserializers, reached by truncated JSON or a bad precompiled charsmap), so the JSON is
/// checked first, for a clear message, and a panic that remains is turned into an error.
fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let cannot = |why: String| Error::Data(format!("{}: cannot load tokenizer: {why}", path.display()));
    let text = crate::fs_guard::read_to_string(path)?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| cannot(format!("invalid JSON: {e}")))?;
    let mut tokenizer = match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(loaded) => loaded.map_err(|e| cannot(e.to_string()))?,
        Err(_) => return Err(cannot("the tokenizers library rejected its contents".into())),
    };
    if let Some(notice) = without_stored_padding_and_truncation(&mut tokenizer) {
        eprintln!("note: {}: {notice}", path.display());
    }
    Ok(tokenizer)
}

/// Turns off the padding and truncation a `tokenizer.json` may store, as `transformers` does on
/// every call (`__call__` sets both per call, to nothing for TRL's tokenization): `Fixed: 64`
/// padding would add pad tokens to every row, a stored `max_length` would cut rows silently.
/// Returns the one-line notice when either was set.
pub fn without_stored_padding_and_truncation(tokenizer: &mut tokenizers::Tokenizer) -> Option<String> {
    let mut turned_off = Vec::new();
    if let Some(p) = tokenizer.get_padding() {
        let strategy = match p.strategy {
            tokenizers::PaddingStrategy::Fixed(n) => format!("Fixed {n}"),
            tokenizers::PaddingStrategy::BatchLongest => "BatchLongest".into(),
        };
        turned_off.push(format!("padding ({strategy})"));
    }
    if let Some(t) = tokenizer.get_truncation() {
        turned_off.push(format!("truncation (max_length {})", t.max_length));
    }
    if turned_off.is_empty() {
        return None;
    }
    tokenizer.with_padding(None);
    // only fails on a stride longer than max_length, which None cannot have
    let _ = tokenizer.with_truncation(None);
    Some(format!(
        "the {} stored in tokenizer.json {} turned off, as transformers does per call (rows are cut by --max-length)",
        turned_off.join(" and "),
        if turned_off.len() > 1 { "are" } else { "is" }
    ))
}

/// What TRL tokenizes for one row: the prompt alone and the prompt followed by each answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JointTexts {
    pub prompt: String,
    pub prompt_chosen: String,
    pub prompt_rejected: String,
    /// Plain text is encoded with the tokenizer's special tokens; a rendered chat already holds its own.
    pub special_tokens: bool,
}

/// A tokenizer plus the special tokens and chat template needed to tokenize preference pairs.
pub struct PairTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    eos_token: String,
    eos_id: u32,
    pad_id: u32,
    bos_id: Option<u32>,
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
    /// `tokenizer_json` may also be the folder holding it (as `export --tokenizer` takes), and
    /// `config` the folder holding `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self> {
        let tokenizer_json = &crate::paths::file_or_in_folder(tokenizer_json, "tokenizer.json", "--tokenizer")?;
        let dir = tokenizer_json.parent().map(Path::to_path_buf).unwrap_or_default();
        let tokenizer = load_tokenizer(tokenizer_json)?;
        let config_path: Option<PathBuf> = match config {
            Some(p) => Some(crate::paths::file_or_in_folder(p, "tokenizer_config.json", "--tokenizer-config")?),
            None => Some(dir.join("tokenizer_config.json")).filter(|p| p.exists()),
        };
        let mut cfg = match &config_path {
            Some(p) => TokenizerConfig::load(p)?,
            None => TokenizerConfig::default(),
        };
        let jinja = dir.join("chat_template.jinja");
        if cfg.chat_template.is_none() && jinja.exists() {
            cfg.chat_template = Some(crate::fs_guard::read_to_string(&jinja)?);
            cfg.template_origin = Some(jinja);
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
    pub fn new(mut tokenizer: tokenizers::Tokenizer, cfg: TokenizerConfig) -> Result<Self> {
        let id_of = |tokenizer: &tokenizers::Tokenizer, tok: &str, what: &str| {
            tokenizer.token_to_id(tok).ok_or_else(|| Error::Data(format!("{what} token {tok:?} is not in the vocabulary")))
        };
        let eos_token = match &cfg.eos_token {
            Some(t) => t.clone(),
            None => EOS_FALLBACKS
                .iter()
                .find(|t| tokenizer.token_to_id(t).is_some())
                .map(|t| t.to_string())
                .ok_or_else(|| Error::Data("no end-of-sequence token: set eos_token in tokenizer_config.json".into()))?,
        };
        let eos_id = id_of(&tokenizer, &eos_token, "eos")?;
        let pad_token = cfg.pad_token.clone().or_else(|| Some("<pad>".to_string()).filter(|p| tokenizer.token_to_id(p).is_some()));
        let pad_id = match &pad_token {
            Some(t) => id_of(&tokenizer, t, "pad")?,
            None => eos_id,
        };
        let bos_id = cfg.bos_token.as_deref().map(|t| id_of(&tokenizer, t, "bos")).transpose()?;
        set_special_tokens_like_transformers(&mut tokenizer, &cfg, bos_id, (&eos_token, eos_id))?;
        let template = match &cfg.chat_template {
            Some(src) => {
                let t = ChatTemplate::new(src, cfg.bos_token.clone(), Some(eos_token.clone()), pad_token)?;
                Some(match &cfg.template_origin {
                    Some(origin) => t.from_file(origin),
                    None => t,
                })
            }
            None => None,
        };
        Ok(PairTokenizer { tokenizer, template, eos_token, eos_id, pad_id, bos_id })
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
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, special_tokens).map(|e| e.get_ids().to_vec()).map_err(|e| Error::Data(format!("tokenizer failed: {e}")))
    }

    /// The texts TRL tokenizes for `row`: standard answers get EOS unless they end with it,
    /// conversations are rendered by the chat template (the prompt with the generation prompt).
    pub fn texts(&self, row: &PreferenceRow) -> Result<JointTexts> {
        match (&row.prompt, &row.chosen, &row.rejected) {
            (Text::Plain(p), Text::Plain(c), Text::Plain(r)) => {
                let with_eos = |a: &str| if a.ends_with(&self.eos_token) { format!("{p}{a}") } else { format!("{p}{a}{}", self.eos_token) };
                Ok(JointTexts { prompt: p.clone(), prompt_chosen: with_eos(c), prompt_rejected: with_eos(r), special_tokens: true })
            }
            (Text::Messages(p), Text::Messages(c), Text::Messages(r)) => {
                let t =
                    self.template.as_ref().ok_or_else(|| Error::Data("conversational data needs a chat template (tokenizer_config.json has none)".into()))?;
                let vars = TemplateVars::from_columns(&row.extras)?;
                let finished = |answer: &[Message]| t.render_with(&[p.as_slice(), answer].concat(), false, &vars);
                Ok(JointTexts { prompt: t.render_with(p, true, &vars)?, prompt_chosen: finished(c)?, prompt_rejected: finished(r)?, special_tokens: false })
            }
            _ => Err(Error::Data("prompt and answers mix plain text and messages".into())),
        }
    }

    /// Tokenizes and truncates one row; `Ok(None)` when the pair is dropped (counted in `stats`).
    pub fn tokenize_pair(&self, index: usize, row: &PreferenceRow, cfg: &TruncationConfig, stats: &mut TokenizeStats) -> Result<Option<TokenizedPair>> {
        let with_row = |e: Error| Error::Data(format!("row {index}: {e}"));
        let texts = self.texts(row).map_err(with_row)?;
        let encode = |text: &str| self.encode_with(text, texts.special_tokens).map_err(with_row);
        let (mut prompt, chosen, rejected) = (encode(&texts.prompt)?, encode(&texts.prompt_chosen)?, encode(&texts.prompt_rejected)?);
        stats.pairs += 1;
        let shared = common_prefix_len(&prompt, &chosen).min(common_prefix_len(&prompt, &rejected));
        if shared < prompt.len() {
            stats.prompt_not_prefix += 1;
            if stats.prompt_not_prefix_example.is_none() {
                stats.prompt_not_prefix_example =
                    Some(self.tokenizer.decode(&prompt[shared..], false).map_err(|e| with_row(Error::Data(format!("decoding: {e}"))))?);
            }
            prompt.truncate(shared);
        }
        let mut pair = TokenizedPair {
            chosen: chosen[shared..].to_vec(),
            rejected: rejected[shared..].to_vec(),
            prompt,
            prompt_cut: [0, 0],
            extras: row.extras.clone(),
            source_index: index,
        };
        if pair.prompt.is_empty() {
            // The beta head reads the last prompt token: a BOS stands in for an empty prompt.
            match self.bos_id {
                Some(bos) => pair.prompt.push(bos),
                None => {
                    stats.dropped_empty_prompt += 1;
                    return Ok(None);
                }
            }
        }
        let empty_answer = pair.chosen.is_empty() || pair.rejected.is_empty();
        if empty_answer || !cfg.apply(&mut pair, stats) {
            stats.dropped += 1;
            stats.dropped_by_truncation += usize::from(!empty_answer);
            return Ok(None);
        }
        stats.kept += 1;
        Ok(Some(pair))
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

/// TRL's `common_prefix_length`: how many leading tokens `a` and `b` share.
fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The special tokens `transformers` 5 adds to plain text: when `tokenizer_config.json` sets
/// `add_bos_token` or `add_eos_token`, or `tokenizer.json` has no post-processor, it replaces the
/// post-processor with one that adds BOS and EOS as those flags say; otherwise `tokenizer.json`'s
/// own post-processor decides.
fn set_special_tokens_like_transformers(tokenizer: &mut tokenizers::Tokenizer, cfg: &TokenizerConfig, bos_id: Option<u32>, eos: (&str, u32)) -> Result<()> {
    if cfg.add_bos_token.is_none() && cfg.add_eos_token.is_none() && tokenizer.get_post_processor().is_some() {
        return Ok(());
    }
    let bos = cfg.bos_token.as_deref().zip(bos_id).filter(|_| cfg.add_bos_token == Some(true));
    let eos = Some(eos).filter(|_| cfg.add_eos_token == Some(true));
    let single = [bos.map(|(t, _)| format!("{t}:0")), Some("$A:0".into()), eos.map(|(t, _)| format!("{t}:0"))];
    let single: Vec<String> = single.into_iter().flatten().collect();
    let special: Vec<(String, u32)> = [bos, eos].into_iter().flatten().map(|(t, id)| (t.to_string(), id)).collect();
    let processor = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|b| b.special_tokens(special).build().map_err(|e| e.to_string()))
        .map_err(|e| Error::Data(format!("cannot add the special tokens of tokenizer_config.json: {e}")))?;
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}
