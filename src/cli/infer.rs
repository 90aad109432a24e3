//! `betadpo infer`: the learned beta per prompt (and a greedy continuation, which stops where the tokenizer's
//! folder's generation_config.json says), as a table or JSON.

use std::path::PathBuf;

use anyhow::Result;
use betadpo::infer::Predictor;
use betadpo::model_import::generation::GenerationConfig;
use betadpo::runtime::{ExecutionProvider, SessionConfig};
use betadpo::text::data::parse_messages;
use betadpo::text::Text;

#[derive(clap::Args)]
pub struct Args {
    /// Exported model (the .onnx file `betadpo export --out` wrote, or a folder holding model.onnx).
    #[arg(long)]
    model: PathBuf,
    /// tokenizer.json or the folder holding it (tokenizer_config.json beside it supplies the chat template).
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    tokenizer_config: Option<PathBuf>,
    /// A prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// JSONL of prompts: strings, {"prompt": "..."} or {"prompt": [messages]}.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Render plain prompts through the chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Continue each prompt greedily for up to N tokens (bare: the generation config's max_new_tokens), stopping
    /// at the tokenizer's EOS and the generation config's eos_token_id.
    #[arg(long, value_name = "N", num_args = 0..=1)]
    generate: Option<Option<usize>>,
    /// A Hugging Face generation_config.json (default: the one beside the tokenizer, when there is one).
    #[arg(long)]
    generation_config: Option<PathBuf>,
    /// One JSON object per prompt instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    ep: ExecutionProvider,
    /// An ONNX Runtime LoRA adapter file (`export --adapter`) to make active on the model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Intra-op threads (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
}

/// Prompts from a JSONL file (or a JSON array), read row by row with the data's row limit.
fn read_prompts(path: &PathBuf) -> Result<Vec<Text>> {
    let mut out = Vec::new();
    betadpo::text::rows::read_json_rows(path, betadpo::limits::DEFAULT_MAX_ROW_BYTES, &mut |at, row| {
        let bad = |what: &str| betadpo::Error::Data(format!("{at}: {what}"));
        let p = match row.map_err(|e| bad(&e))? {
            serde_json::Value::String(s) => Text::Plain(s),
            serde_json::Value::Object(mut o) => match o.remove("prompt") {
                Some(serde_json::Value::String(s)) => Text::Plain(s),
                Some(serde_json::Value::Array(m)) => Text::Messages(parse_messages(&m).map_err(|e| bad(&format!("\"prompt\"{e}")))?),
                _ => return Err(bad("expected a \"prompt\" field")),
            },
            _ => return Err(bad("expected a string or an object")),
        };
        out.push(p);
        Ok(())
    })?;
    Ok(out)
}

pub fn run(a: Args) -> Result<()> {
    let mut prompts: Vec<Text> = a.prompt.iter().cloned().map(Text::Plain).collect();
    if let Some(f) = &a.file {
        prompts.extend(read_prompts(f)?);
    }
    if prompts.is_empty() {
        anyhow::bail!(betadpo::Error::BadFlag { flag: "--prompt/--file".into(), detail: "give at least one prompt".into() });
    }
    let generation = generation_config(&a)?;
    let generate = match a.generate {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => generation.max_new_tokens.ok_or_else(|| betadpo::Error::BadFlag {
            flag: "--generate".into(),
            detail: "give the number of tokens (no generation_config.json with max_new_tokens was found)".into(),
        })?,
    };
    betadpo::limits::at_most("--generate", generate, betadpo::limits::MAX_COUNT, "tokens, beyond any model's positions")?;
    if let Some(sampling) = generation.sampling.as_deref().filter(|_| generate > 0) {
        eprintln!("note: generation_config.json asks for {sampling}; betadpo continues greedily");
    }
    let cfg = SessionConfig { ep: a.ep, intra_threads: a.threads, ..Default::default() };
    let mut p = Predictor::new(&a.model, &a.tokenizer, a.tokenizer_config.as_deref(), &cfg)?.stop_at(&generation.eos_token_ids);
    if let Some(file) = &a.adapter {
        p = p.with_adapter(file)?;
    }
    if !a.chat && p.has_chat_template() && prompts.iter().any(|t| !t.is_messages()) {
        eprintln!(
            "note: plain prompts go to the model as raw text, not through the tokenizer's chat template; pass --chat to send each as a user turn, \
             as a chat model is trained and used (beta is read at the prompt's last token, so the two forms give different betas)"
        );
    }
    let preds = p.predict(&prompts, a.chat, generate)?;
    for (pr, prompt) in preds.iter().zip(&prompts) {
        if a.json {
            println!("{}", serde_json::to_string(pr)?);
        } else {
            let shown: String = question(prompt).replace('\n', "\\n").chars().take(70).collect();
            match &pr.completion {
                Some(c) => println!("beta {:.4}  {shown}  →{}", pr.beta, c.replace('\n', "\\n")),
                None => println!("beta {:.4}  {shown}", pr.beta),
            }
        }
    }
    Ok(())
}

/// `--generation-config`, else the generation_config.json in the tokenizer's folder (a Hugging Face folder's);
/// the default settings when there is none.
fn generation_config(a: &Args) -> Result<GenerationConfig> {
    let found = match &a.generation_config {
        Some(path) => Some(
            GenerationConfig::read(path)?
                .ok_or_else(|| betadpo::Error::BadFlag { flag: "--generation-config".into(), detail: format!("{}: no such file", path.display()) })?,
        ),
        None => {
            let folder = if a.tokenizer.is_dir() { a.tokenizer.as_path() } else { a.tokenizer.parent().unwrap_or(std::path::Path::new(".")) };
            GenerationConfig::read(&folder.join(betadpo::model_import::GENERATION_CONFIG_FILE))?
        }
    };
    Ok(found.unwrap_or_default())
}

/// What a prompt asks, for the table: the last user turn of a conversation (the rendered text
/// starts with the system prompt, the same on every row), a plain prompt as it is.
fn question(prompt: &Text) -> &str {
    match prompt {
        Text::Plain(s) => s,
        Text::Messages(m) => m.iter().rev().find(|m| m.role == "user").or(m.last()).map_or("", |m| m.content.as_str()),
    }
}
