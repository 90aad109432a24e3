//! Rendering conversational rows with a Hugging Face chat template, the way TRL does.
//!
//! HF compiles templates with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) and adds
//! `raise_exception` and a Python-style `tojson`; Python string methods (`.strip()`,
//! `.startswith()`...) work because they are Python. [`ChatTemplate`] reproduces that environment on
//! `minijinja`, with `minijinja-contrib`'s `pycompat` for the string methods, so that a template
//! written for `transformers` renders the same text here.

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::text::data::Message;

const NAME: &str = "chat_template";

/// Template instructions one rendering may run: a conversation of thousands of messages takes a
/// few hundred thousand; a loop nested over `range(100000)` would take 10^10.
pub const FUEL: u64 = 20_000_000;
/// Bytes one rendering may write.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Bytes one rendering may hold at once, its output included (see `limits::memory_guard`).
pub const MEMORY_BUDGET: usize = 512 << 20;

/// A compiled chat template plus the special-token strings HF passes to it.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template comes from (a file), for errors.
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with the template's line.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>, pad_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", py_tojson);
        env.set_fuel(Some(FUEL));
        env.add_template_owned(NAME, source.to_string()).map_err(|e| Error::Data(format!("chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate { env, origin: NAME.into(), bos_token, eos_token, pad_token })
    }

    /// Names the file the template was read from in its errors.
    pub fn from_file(mut self, origin: &std::path::Path) -> Self {
        self.origin = format!("the chat template of {}", origin.display());
        self
    }

    /// Renders `messages` with the variables HF's `apply_chat_template` provides.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &TemplateVars::default())
    }

    /// [`Self::render`] with more template variables. As in HF, they may override the special
    /// tokens but not the messages.
    pub fn render_with(&self, messages: &[Message], add_generation_prompt: bool, vars: &TemplateVars) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| Error::Data(e.to_string()))?;
        let mut ctx: BTreeMap<String, Value> = [("bos_token", &self.bos_token), ("eos_token", &self.eos_token), ("pad_token", &self.pad_token)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::from(v.clone())))
            .collect();
        ctx.extend(vars.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let over_memory = format!(
            "{}: rendering one row takes more than {} MB of memory (a template that builds ever larger strings?); fix the template",
            self.origin,
            MEMORY_BUDGET >> 20
        );
        let mut out = BoundedOutput(Vec::new());
        let rendered = crate::limits::with_memory_budget(MEMORY_BUDGET, &over_memory, || tmpl.render_captured_to(ctx, &mut out).map(|_| ()));
        rendered.map_err(|e| self.failed(e))?;
        String::from_utf8(out.0).map_err(|_| Error::Data(format!("{}: rendered text that is not UTF-8", self.origin)))
    }

    fn failed(&self, e: minijinja::Error) -> Error {
        match e.kind() {
            ErrorKind::OutOfFuel => {
                Error::Data(format!("{}: rendering one row takes more than {FUEL} template steps (a loop that runs too long?); fix the template", self.origin))
            }
            ErrorKind::WriteFailure => Error::Data(format!("{}: renders more than {} MB for one row; fix the template", self.origin, MAX_OUTPUT_BYTES >> 20)),
            _ => Error::Data(format!("chat template failed: {e:#}")),
        }
    }

    /// Renders a prompt to generate from (`infer --chat`): with the generation prompt when it ends
    /// with a user (or system/tool) turn, and as an open assistant turn (`continue_final_message`)
    /// when it ends with an assistant message. Training renders every prompt with the generation
    /// prompt, as TRL 1.x does (see `tokenize`).
    pub fn render_prompt(&self, prompt: &[Message]) -> Result<String> {
        match prompt.last() {
            Some(last) if last.role == "assistant" => {
                let text = self.render(prompt, false)?;
                continue_final_message(text, &last.content)
            }
            _ => self.render(prompt, true),
        }
    }
}

/// The rendering's text, refused past [`MAX_OUTPUT_BYTES`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT_BYTES {
            return Err(std::io::Error::other("the rendering is too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Template variables that TRL takes from a row's columns: `tools` (a list, or JSON text of one)
/// and the entries of `chat_template_kwargs` (e.g. `enable_thinking`).
#[derive(Debug, Clone, Default)]
pub struct TemplateVars(BTreeMap<String, Value>);

impl TemplateVars {
    /// Reads them from a row's extra columns (JSON text: see `data::PreferenceRow::extras`).
    /// Objects keep their key order, which `tojson` shows.
    pub fn from_columns(extras: &BTreeMap<String, String>) -> Result<Self> {
        let json = |key: &str, text: &str| serde_json::from_str::<Value>(text).map_err(|e| Error::Data(format!("column {key:?} is not JSON: {e}")));
        let mut vars = BTreeMap::new();
        if let Some(tools) = extras.get("tools") {
            vars.insert("tools".to_string(), json("tools", tools)?);
        }
        if let Some(kwargs) = extras.get("chat_template_kwargs") {
            let kwargs = json("chat_template_kwargs", kwargs)?;
            let not_object = || Error::Data("column \"chat_template_kwargs\" must be an object".into());
            if kwargs.kind() != minijinja::value::ValueKind::Map {
                return Err(not_object());
            }
            for key in kwargs.try_iter().map_err(|_| not_object())? {
                let value = kwargs.get_item(&key).map_err(|_| not_object())?;
                vars.insert(key.to_string(), value);
            }
        }
        Ok(TemplateVars(vars))
    }
}

/// Cuts the rendering right after the final message's content, as HF does for
/// `continue_final_message`, so the model continues that message instead of closing it.
fn continue_final_message(text: String, content: &str) -> Result<String> {
    let end = [content, content.trim()].iter().filter(|c| !c.is_empty()).find_map(|c| text.rfind(*c).map(|i| i + c.len()));
    match end {
        Some(end) => Ok(text[..end].to_string()),
        None if content.trim().is_empty() => Ok(text),
        None => Err(Error::Data("the final assistant message of the prompt does not appear in the rendered chat".into())),
    }
}

/// HF's `raise_exception(message)`: templates call it to reject conversations they cannot render.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("template raised: {message}")))
}

/// HF's `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=indent)`, so `", "` and `": "`
/// separators without indent and no HTML escaping (minijinja's built-in escapes `<`, `>`, `&`, `'`,
/// which would change the rendered text of tool definitions).
fn py_tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent.filter(|i| !i.is_none() && !i.is_undefined()) {
        Some(i) => {
            let n = usize::try_from(i)?;
            let pad = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            serde::Serialize::serialize(value, &mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => serde::Serialize::serialize(value, &mut serde_json::Serializer::with_formatter(&mut out, PyCompact)),
    };
    result.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

/// Python's default JSON separators: `", "` between items and `": "` after keys.
struct PyCompact;

impl serde_json::ser::Formatter for PyCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}
