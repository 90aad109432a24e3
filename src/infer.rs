//! Running an exported model (`logits` + `beta`): the beta it learned for each prompt, and a
//! greedy continuation that reuses the same session.

pub use crate::text::RightPadded;
use std::path::Path;

use ort::session::{Adapter, RunOptions, Session, SessionInputValue};
use ort::value::Tensor;

use crate::runtime::SessionConfig;
use crate::text::{Message, PairTokenizer, Text};
use crate::train::model_limits::{ModelLimits, HIDDEN_SIZE_KEY, MAX_POSITIONS_KEY, VOCAB_SIZE_KEY};
use crate::{Error, Result};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    pub prompt: String,
    pub beta: f32,
    pub prompt_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
}

pub struct Predictor {
    session: Session,
    /// Run options with an ONNX Runtime LoRA adapter file active (`infer --adapter`).
    adapter: Option<RunOptions>,
    tokenizer: PairTokenizer,
    has_position_ids: bool,
    /// The model's limits, from the metadata `export` writes (or the logits' width).
    limits: Option<ModelLimits>,
    hidden_size: Option<usize>,
    /// The tokens that end a continuation: the tokenizer's EOS, and those of a generation config.
    stop_ids: Vec<u32>,
}

impl Predictor {
    pub fn new(model: &Path, tokenizer: &Path, tokenizer_config: Option<&Path>, cfg: &SessionConfig) -> Result<Self> {
        crate::runtime::init(&cfg.ep)?;
        let model = &crate::paths::file_or_in_folder(model, "model.onnx", "--model")?;
        let session = cfg.session_from_file(model)?;
        let names = crate::runtime::input_names(&session);
        for needed in ["input_ids", "attention_mask"] {
            if !names.iter().any(|n| n == needed) {
                return Err(Error::NotAnExport { path: model.clone(), detail: format!("the model has no `{needed}` input; is it a betadpo export?") });
            }
        }
        let outs = crate::runtime::output_names(&session);
        if !outs.iter().any(|n| n == "beta") || !outs.iter().any(|n| n == "logits") {
            let detail = "the model needs `logits` and `beta` outputs (export it with `betadpo export`)".into();
            return Err(Error::NotAnExport { path: model.clone(), detail });
        }
        let tokenizer = PairTokenizer::from_files(tokenizer, tokenizer_config)?;
        let (limits, hidden_size) = model_limits(&session);
        let stop_ids = vec![tokenizer.eos_id()];
        Ok(Predictor { session, adapter: None, tokenizer, has_position_ids: names.iter().any(|n| n == "position_ids"), limits, hidden_size, stop_ids })
    }

    /// Makes the adapters of an ONNX Runtime adapter file (`export --adapter`) active in every run:
    /// each of its tensors must name an input of the model.
    pub fn with_adapter(mut self, file: &Path) -> Result<Self> {
        let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
        if !meta.is_file() {
            return Err(Error::NotRegularFile { path: file.to_path_buf(), detail: "not a file".into() });
        }
        let adapter = Adapter::from_file(file, None)
            .map_err(|e| Error::NotAnExport { path: file.to_path_buf(), detail: format!("not an ONNX Runtime adapter file ({e})") })?;
        let mut options = RunOptions::new()?;
        options.add_adapter(&adapter)?;
        self.adapter = Some(options);
        Ok(self)
    }

    /// Also ends continuations at `ids` (a generation config's `eos_token_id`).
    pub fn stop_at(mut self, ids: &[u32]) -> Self {
        for &id in ids {
            if !self.stop_ids.contains(&id) {
                self.stop_ids.push(id);
            }
        }
        self
    }

    /// The text the model sees: plain prompts as they are (or through the chat template with
    /// `chat`), message lists always through the template.
    pub fn render(&self, prompt: &Text, chat: bool) -> Result<String> {
        match prompt {
            Text::Plain(s) if !chat => Ok(s.clone()),
            Text::Plain(s) => self.template()?.render_prompt(&[Message::new("user", s.clone())]),
            Text::Messages(m) => self.template()?.render_prompt(m),
        }
    }

    /// Whether the tokenizer brings a chat template (a chat model's).
    pub fn has_chat_template(&self) -> bool {
        self.tokenizer.chat_template().is_some()
    }

    fn template(&self) -> Result<&crate::text::ChatTemplate> {
        self.tokenizer.chat_template().ok_or_else(|| Error::Data("the tokenizer has no chat_template (tokenizer_config.json)".into()))
    }

    /// Runs the rows (right-padded); returns per row the beta and the logits at its last token.
    fn forward(&mut self, rows: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let RightPadded { ids, mask, positions: pos } = RightPadded::of(rows, self.tokenizer.pad_id() as i64);
        let t = ids.ncols();
        let mut inputs: Vec<(&str, SessionInputValue)> =
            vec![("input_ids", Tensor::from_array(ids)?.into_dyn().into()), ("attention_mask", Tensor::from_array(mask)?.into_dyn().into())];
        if self.has_position_ids {
            inputs.push(("position_ids", Tensor::from_array(pos)?.into_dyn().into()));
        }
        let outputs = match &self.adapter {
            Some(options) => self.session.run_with_options(inputs, options),
            None => self.session.run(inputs),
        }
        .map_err(|e| Error::Runtime(e.to_string()))?;
        let beta = outputs["beta"].try_extract_tensor::<f32>()?.1.to_vec();
        let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
        let v = shape[2] as usize;
        let last = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let at = row.len().max(1) - 1;
                let off = (r * t + at) * v;
                logits[off..off + v].to_vec()
            })
            .collect();
        Ok((beta, last))
    }

    /// Refuses prompts the model cannot take before ONNX Runtime sees them: longer (with the tokens
    /// to generate) than its positions, ids beyond its vocabulary, a forward pass beyond memory.
    fn check_limits(&self, rows: &[Vec<u32>], generate: usize) -> Result<()> {
        let Some(limits) = self.limits else { return Ok(()) };
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let width = longest.saturating_add(generate);
        let change = if generate > 0 { "shorten the prompt or lower --generate so that prompt + --generate come" } else { "shorten the prompt" };
        limits.check_length(width, change)?;
        limits.check_ids(rows.iter().flatten().max().copied(), std::path::Path::new("the tokenizer"))?;
        limits.check_forward_memory("--prompt", rows.len(), width, self.hidden_size, "shorten the prompts or lower --generate")
    }

    /// Beta per prompt, and with `generate > 0` a greedy continuation of up to that many tokens.
    pub fn predict(&mut self, prompts: &[Text], chat: bool, generate: usize) -> Result<Vec<Prediction>> {
        let texts: Vec<String> = prompts.iter().map(|p| self.render(p, chat)).collect::<Result<_>>()?;
        let mut rows: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenizer.encode(t)).collect::<Result<_>>()?;
        if let Some((i, _)) = rows.iter().enumerate().find(|(_, r)| r.is_empty()) {
            return Err(Error::Data(format!("prompt {} is empty after tokenization", i + 1)));
        }
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        self.check_limits(&rows, generate)?;
        let (beta, mut last) = self.forward(&rows)?;
        let mut done = vec![generate == 0; rows.len()];
        for step in 0..generate {
            for (r, logits) in last.iter().enumerate() {
                if done[r] {
                    continue;
                }
                let next = logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
                if self.stop_ids.contains(&next) {
                    done[r] = true;
                } else {
                    rows[r].push(next);
                }
            }
            if done.iter().all(|&d| d) || step + 1 == generate {
                break;
            }
            last = self.forward(&rows)?.1;
        }
        let mut out = Vec::with_capacity(rows.len());
        for (r, text) in texts.into_iter().enumerate() {
            let completion = if generate > 0 {
                Some(self.tokenizer.inner().decode(&rows[r][lens[r]..], false).map_err(|e| Error::Data(format!("decoding: {e}")))?)
            } else {
                None
            };
            out.push(Prediction { prompt: text, beta: beta[r], prompt_tokens: lens[r], completion });
        }
        Ok(out)
    }
}

/// The limits an exported model carries in its metadata (`export` writes them); the vocabulary
/// from the logits' width when it has none.
fn model_limits(session: &Session) -> (Option<ModelLimits>, Option<usize>) {
    let meta = session.metadata().ok();
    let key = |k: &str| meta.as_ref().and_then(|m| m.custom(k)).and_then(|v| v.parse::<usize>().ok());
    let logits_width =
        session.outputs().iter().find(|o| o.name() == "logits").and_then(|o| o.dtype().tensor_shape()).and_then(|s| s.last().copied()).filter(|&v| v > 0);
    let vocab = key(VOCAB_SIZE_KEY).or(logits_width.map(|v| v as usize));
    (vocab.map(|vocab_size| ModelLimits { max_positions: key(MAX_POSITIONS_KEY), vocab_size }), key(HIDDEN_SIZE_KEY))
}
