//! Preference data in the formats TRL accepts, read from JSONL or a JSON array.
//!
//! Three row shapes are recognised, matching TRL's dataset formats so that a dataset prepared for
//! `DPOTrainer` loads unchanged:
//! - standard: `{"prompt": str, "chosen": str, "rejected": str}`;
//! - conversational: `prompt`, `chosen` and `rejected` are lists of `{role, content}` messages;
//! - implicit prompt: only `chosen` and `rejected` (strings or message lists); the prompt is their
//!   common beginning (see [`split_implicit_prompt`]).
//!
//! Every other column is kept as text in [`PreferenceRow::extras`], so that metrics can be grouped by
//! a column such as `regime` without this module knowing about it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One chat message. Only `role` and `content` matter to chat templates for preference data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A prompt or an answer: plain text (standard format) or messages (conversational format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    Plain(String),
    Messages(Vec<Message>),
}

impl Text {
    pub fn is_messages(&self) -> bool {
        matches!(self, Text::Messages(_))
    }
}

/// One preference pair: the prompt, the preferred and the dispreferred answer, plus the other columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceRow {
    pub prompt: Text,
    pub chosen: Text,
    pub rejected: Text,
    /// Extra columns as text (strings verbatim, other values as compact JSON); `null`s are left out.
    pub extras: BTreeMap<String, String>,
}

/// How to treat rows that cannot be parsed.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Count and skip malformed rows instead of failing on the first one.
    pub skip_bad_rows: bool,
}

/// The rows of one file and what was skipped on the way.
#[derive(Debug, Clone, Default)]
pub struct LoadedData {
    pub rows: Vec<PreferenceRow>,
    /// Number of malformed rows skipped (only with [`LoadOptions::skip_bad_rows`]).
    pub skipped: usize,
    /// The first few skip reasons (`file:line: what`), so a user can see why rows went missing.
    pub skipped_examples: Vec<String>,
}

const MAX_SKIP_EXAMPLES: usize = 5;

/// Reads a preference file: a JSON array if its first non-blank character is `[`, JSONL otherwise.
///
/// Errors name the file and the line (JSONL) or the 0-based element (array), e.g.
/// `train.jsonl:17: missing field "rejected"`.
pub fn load_preferences(path: &Path, opts: &LoadOptions) -> Result<LoadedData> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let name = path.display().to_string();
    parse_preferences(&text, &name, opts)
}

/// [`load_preferences`] on text already in memory; `name` is used in error messages.
pub fn parse_preferences(text: &str, name: &str, opts: &LoadOptions) -> Result<LoadedData> {
    let mut out = LoadedData::default();
    let mut handle = |location: String, parsed: std::result::Result<PreferenceRow, String>| {
        match parsed {
            Ok(row) => out.rows.push(row),
            Err(what) if opts.skip_bad_rows => {
                out.skipped += 1;
                if out.skipped_examples.len() < MAX_SKIP_EXAMPLES {
                    out.skipped_examples.push(format!("{location}: {what}"));
                }
            }
            Err(what) => return Err(Error::Data(format!("{location}: {what}"))),
        }
        Ok(())
    };
    let body = text.trim_start_matches('\u{feff}');
    if body.trim_start().starts_with('[') {
        // An unparsable array cannot be split into rows, so it fails even in skip mode.
        let items: Vec<Value> = serde_json::from_str(body).map_err(|e| Error::Data(format!("{name}: invalid JSON array: {e}")))?;
        for (i, item) in items.iter().enumerate() {
            handle(format!("{name}: element {i}"), parse_row(item))?;
        }
    } else {
        for (i, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Value>(line).map_err(|e| format!("invalid JSON: {e}")).and_then(|v| parse_row(&v));
            handle(format!("{name}:{}", i + 1), parsed)?;
        }
    }
    Ok(out)
}

/// Parses one row object into a [`PreferenceRow`]; the error says what is wrong, without location.
pub fn parse_row(value: &Value) -> std::result::Result<PreferenceRow, String> {
    let obj = value.as_object().ok_or_else(|| format!("expected a JSON object, got {}", kind(value)))?;
    let chosen = text_field(obj, "chosen")?;
    let rejected = text_field(obj, "rejected")?;
    if chosen.is_messages() != rejected.is_messages() {
        return Err("\"chosen\" and \"rejected\" must both be strings or both be message lists".into());
    }
    let (prompt, chosen, rejected) = match obj.get("prompt") {
        None | Some(Value::Null) => split_implicit_prompt(chosen, rejected),
        Some(_) => {
            let prompt = text_field(obj, "prompt")?;
            if prompt.is_messages() != chosen.is_messages() {
                return Err("\"prompt\" and the answers must all be strings or all be message lists".into());
            }
            (prompt, chosen, rejected)
        }
    };
    let mut extras = BTreeMap::new();
    for (key, v) in obj {
        if matches!(key.as_str(), "prompt" | "chosen" | "rejected") {
            continue;
        }
        match v {
            Value::Null => {}
            Value::String(s) => {
                extras.insert(key.clone(), s.clone());
            }
            other => {
                extras.insert(key.clone(), other.to_string());
            }
        }
    }
    Ok(PreferenceRow { prompt, chosen, rejected, extras })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn text_field(obj: &Map<String, Value>, key: &str) -> std::result::Result<Text, String> {
    match obj.get(key) {
        None => Err(format!("missing field \"{key}\"")),
        Some(Value::String(s)) => Ok(Text::Plain(s.clone())),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(m).map_err(|e| format!("\"{key}\"[{i}]: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Text::Messages),
        Some(other) => Err(format!("field \"{key}\" must be a string or a list of messages, got {}", kind(other))),
    }
}

/// A message needs a string `role`; `content` may be a string, `null` (assistant tool calls) or a
/// list of parts whose `text` entries are concatenated (the multimodal message shape, text only).
fn parse_message(value: &Value) -> std::result::Result<Message, String> {
    let obj = value.as_object().ok_or_else(|| format!("expected a message object, got {}", kind(value)))?;
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.clone(),
        Some(other) => return Err(format!("\"role\" must be a string, got {}", kind(other))),
        None => return Err("message without \"role\"".into()),
    };
    let content = match obj.get("content") {
        Some(Value::String(c)) => c.clone(),
        None | Some(Value::Null) => String::new(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("text") {
                    Some(Value::String(t)) => text.push_str(t),
                    _ => return Err("only text content parts are supported".into()),
                }
            }
            text
        }
        Some(other) => return Err(format!("\"content\" must be a string, got {}", kind(other))),
    };
    Ok(Message { role, content })
}

/// Splits an implicit-prompt pair into (prompt, chosen, rejected) as TRL's `extract_prompt` does.
///
/// The cut falls at the first differing character (or message); one character earlier when the
/// character before it is a space, so that the answers start with the space. When one answer
/// continues the other, nothing differs and the cut falls one character (message) before the
/// shorter one ends, leaving each answer at least one. TRL reads the character before a difference
/// at the very start as the last one (Python's index -1); here such a prompt is simply empty.
pub fn split_implicit_prompt(chosen: Text, rejected: Text) -> (Text, Text, Text) {
    match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            let chars: Vec<(usize, char)> = c.char_indices().collect();
            let cut = trl_cut(&chars.iter().map(|&(_, ch)| ch).collect::<Vec<_>>(), &r.chars().collect::<Vec<_>>(), |ch| *ch == ' ');
            let byte = chars.get(cut).map_or(c.len(), |&(i, _)| i);
            let rbyte = r.char_indices().nth(cut).map_or(r.len(), |(i, _)| i);
            (Text::Plain(c[..byte].to_string()), Text::Plain(c[byte..].to_string()), Text::Plain(r[rbyte..].to_string()))
        }
        (Text::Messages(c), Text::Messages(r)) => {
            let n = trl_cut(&c, &r, |_| false);
            (Text::Messages(c[..n].to_vec()), Text::Messages(c[n..].to_vec()), Text::Messages(r[n..].to_vec()))
        }
        // Mixed kinds are rejected by `parse_row`; keep the rows whole with an empty prompt.
        (c, r) => (Text::Plain(String::new()), c, r),
    }
}

/// Where `extract_prompt` cuts two sequences: the first difference (moved back over one `space`),
/// or, without one, one before the shorter sequence ends.
fn trl_cut<T: PartialEq>(a: &[T], b: &[T], space: impl Fn(&T) -> bool) -> usize {
    let n = a.len().min(b.len());
    match (0..n).find(|&i| a[i] != b[i]) {
        Some(i) if i > 0 && space(&a[i - 1]) => i - 1,
        Some(i) => i,
        None => n.saturating_sub(1),
    }
}
