//! Preference data in the formats TRL accepts, read from JSONL, JSON, Parquet or a `datasets`
//! `save_to_disk` folder (see [`super::data_source`] for what `--data` may name).
//!
//! Three row shapes are recognised, matching TRL's dataset formats so that a dataset prepared for
//! `DPOTrainer` loads unchanged:
//! - standard: `{"prompt": str, "chosen": str, "rejected": str}`;
//! - conversational: `prompt`, `chosen` and `rejected` are lists of `{role, content}` messages;
//! - implicit prompt: only `chosen` and `rejected` (strings or message lists); the prompt is their
//!   common beginning (see [`split_implicit_prompt`]), which must not be empty.
//!
//! Every other column is kept as text in [`PreferenceRow::extras`], so that metrics can be grouped by
//! a column such as `regime` without this module knowing about it; a column one or two letters
//! from a missing `prompt`, `chosen` or `rejected` is refused as the typo it is.
//! Arrow rows become the same JSON objects first ([`super::data_arrow`]), so all formats share
//! [`parse_row`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::ser::SerializeMap;
use serde_json::{Map, Value};

use super::data_arrow::visit_arrow_rows;
use super::data_source::{resolve, DataSource};
use super::rows::{json_rows, read_json_rows};
use crate::error::{Error, Result};

/// One chat message, as the chat template sees it: `role`, `content` and any other fields the row
/// gave (`tool_calls`, `name`, `tool_call_id`, ...), passed through as transformers passes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    /// The text; empty when the row's content was null (see `null_content`).
    pub content: String,
    /// The row's content was `null` (an assistant turn that only calls tools): the template sees
    /// `None`, as in transformers, not an empty string.
    pub null_content: bool,
    /// The message's other fields, verbatim.
    pub extra: BTreeMap<String, Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into(), ..Default::default() }
    }
}

impl serde::Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2 + self.extra.len()))?;
        map.serialize_entry("role", &self.role)?;
        match self.null_content {
            true => map.serialize_entry("content", &Value::Null)?,
            false => map.serialize_entry("content", &self.content)?,
        }
        for (k, v) in &self.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
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

    fn is_empty(&self) -> bool {
        match self {
            Text::Plain(s) => s.is_empty(),
            Text::Messages(m) => m.is_empty(),
        }
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

/// How to read a data file and treat rows that cannot be parsed.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Count and skip malformed rows instead of failing on the first one.
    pub skip_bad_rows: bool,
    /// The split to read from a folder (`datasets`' DatasetDict or Hub Parquet shards); `None`
    /// reads `train`.
    pub split: Option<String>,
    /// A JSONL line or JSON array element longer than this is malformed, refused before it is
    /// parsed (`--max-row-bytes`).
    pub max_row_bytes: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { skip_bad_rows: false, split: None, max_row_bytes: crate::limits::DEFAULT_MAX_ROW_BYTES }
    }
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

/// Reads preference data: a JSONL or JSON file, Parquet, or a folder (see [`resolve`]).
///
/// Errors name the file and the line (JSONL), the 0-based element (array) or row (Arrow), e.g.
/// `train.jsonl:17: missing field "rejected"`.
pub fn load_preferences(path: &Path, opts: &LoadOptions) -> Result<LoadedData> {
    let mut out = LoadedData::default();
    let mut visit = |location: String, value: std::result::Result<Value, String>| add_row(&mut out, opts, location, value.and_then(|v| parse_row(&v)));
    match resolve(path, opts.split.as_deref())? {
        // streamed, each row held to --max-row-bytes before it is parsed
        DataSource::Json(file) => read_json_rows(&file, opts.max_row_bytes, &mut visit)?,
        DataSource::Arrow(files) => {
            for (file, kind) in files {
                visit_arrow_rows(&file, kind, &mut visit)?;
            }
        }
    }
    Ok(out)
}

/// [`load_preferences`] on JSONL or JSON text already in memory (rows held to
/// [`LoadOptions::max_row_bytes`] as from a file); `name` is used in error messages.
pub fn parse_preferences(text: &str, name: &str, opts: &LoadOptions) -> Result<LoadedData> {
    let mut out = LoadedData::default();
    json_rows(text.as_bytes(), name, opts.max_row_bytes, &mut |location, value| add_row(&mut out, opts, location, value.and_then(|v| parse_row(&v))))?;
    Ok(out)
}

fn add_row(out: &mut LoadedData, opts: &LoadOptions, location: String, parsed: std::result::Result<PreferenceRow, String>) -> Result<()> {
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
}

/// Parses one row object into a [`PreferenceRow`]; the error says what is wrong, without location.
pub fn parse_row(value: &Value) -> std::result::Result<PreferenceRow, String> {
    let obj = value.as_object().ok_or_else(|| format!("expected a JSON object, got {}", kind(value)))?;
    check_column_names(obj)?;
    let chosen = text_field(obj, "chosen")?;
    let rejected = text_field(obj, "rejected")?;
    if chosen.is_messages() != rejected.is_messages() {
        return Err("\"chosen\" and \"rejected\" must both be strings or both be message lists".into());
    }
    let (prompt, chosen, rejected) = match obj.get("prompt") {
        None | Some(Value::Null) => {
            let split = split_implicit_prompt(chosen, rejected);
            if split.0.is_empty() {
                return Err("no \"prompt\" column, and \"chosen\" and \"rejected\" share no beginning to take as the prompt \
                            (TRL's implicit-prompt format): add the prompt as a \"prompt\" column"
                    .into());
            }
            split
        }
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

/// Refuses a column a letter or two from a missing `prompt`, `chosen` or `rejected` (`promt`,
/// `choosen`), and rows in TRL's formats for other trainers, naming what DPO needs.
fn check_column_names(obj: &Map<String, Value>) -> std::result::Result<(), String> {
    const NEEDED: [&str; 3] = ["prompt", "chosen", "rejected"];
    for key in obj.keys() {
        let lower = key.to_lowercase();
        let near = NEEDED.iter().find(|want| !obj.contains_key(**want) && key != **want && edit_distance(&lower, want) <= 2);
        if let Some(want) = near {
            return Err(format!("unknown column \"{key}\" (did you mean \"{want}\"?)"));
        }
    }
    if !obj.contains_key("chosen") || !obj.contains_key("rejected") {
        let other = if obj.contains_key("completion") && obj.contains_key("label") {
            Some("unpaired preference (prompt, completion, label: KTO's format)")
        } else if obj.contains_key("completion") {
            Some("prompt-completion (SFT's format)")
        } else if obj.contains_key("messages") || obj.contains_key("text") {
            Some("language modeling (messages or text: SFT's format)")
        } else {
            None
        };
        if let Some(format) = other {
            let missing = if obj.contains_key("chosen") { "rejected" } else { "chosen" };
            return Err(format!("missing field \"{missing}\": this row is in TRL's {format} format; DPO needs \"chosen\" and \"rejected\" answers"));
        }
    }
    Ok(())
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
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
        Some(Value::Array(items)) => parse_messages(items).map_err(|e| format!("\"{key}\"{e}")).map(Text::Messages),
        Some(other) => Err(format!("field \"{key}\" must be a string or a list of messages, got {}", kind(other))),
    }
}

/// A list of messages; an error starts with the index of the message at fault (`[2]: ...`).
pub fn parse_messages(items: &[Value]) -> std::result::Result<Vec<Message>, String> {
    items.iter().enumerate().map(|(i, m)| parse_message(m).map_err(|e| format!("[{i}]: {e}"))).collect()
}

/// A message needs a string `role`; `content` may be a string, a list of parts whose `text`
/// entries are concatenated (the multimodal message shape, text only), or `null` beside
/// `tool_calls` (an assistant turn that only calls tools). A message with neither text nor tool
/// calls is refused: it would train on (or condition on) nothing.
fn parse_message(value: &Value) -> std::result::Result<Message, String> {
    let obj = value.as_object().ok_or_else(|| format!("expected a message object, got {}", kind(value)))?;
    let role = match obj.get("role") {
        Some(Value::String(r)) => r.clone(),
        Some(other) => return Err(format!("\"role\" must be a string, got {}", kind(other))),
        None => return Err("message without \"role\"".into()),
    };
    let calls_tools = obj.get("tool_calls").is_some_and(|t| matches!(t, Value::Array(a) if !a.is_empty()));
    let (content, null_content) = match obj.get("content") {
        Some(Value::String(c)) => (c.clone(), false),
        None | Some(Value::Null) if calls_tools => (String::new(), true),
        None | Some(Value::Null) => return Err(format!("the {role} message has no content (null) and no tool_calls")),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("text") {
                    Some(Value::String(t)) => text.push_str(t),
                    _ => return Err("only text content parts are supported".into()),
                }
            }
            (text, false)
        }
        Some(other) => return Err(format!("\"content\" must be a string, got {}", kind(other))),
    };
    let extra = obj.iter().filter(|(k, v)| !matches!(k.as_str(), "role" | "content") && !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(Message { role, content, null_content, extra })
}

/// Splits an implicit-prompt pair into (prompt, chosen, rejected) as TRL's `extract_prompt` does.
///
/// The cut falls at the first differing character (or message); one character earlier when the
/// character before it is a space, so that the answers start with the space. When one answer
/// continues the other, nothing differs and the cut falls one character (message) before the
/// shorter one ends, leaving each answer at least one. TRL reads the character before a difference
/// at the very start as the last one (Python's index -1); here such a prompt is simply empty (and
/// [`parse_row`] refuses the row).
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
