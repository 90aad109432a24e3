//! A Hugging Face folder's `generation_config.json`, as far as `infer` has an equivalent: the token ids that
//! end a continuation (`eos_token_id`, one id or a list: Llama 3 stops on three), `max_new_tokens` for a bare
//! `--generate`, and whether it asks for sampling, which betadpo's greedy continuation does not do.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub max_new_tokens: Option<usize>,
    /// The sampling it asks for (`do_sample` with its temperature, top-k and top-p), in words.
    pub sampling: Option<String>,
}

impl GenerationConfig {
    /// The generation config at `path`; `None` when there is no such file.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        Self::parse(&text).map(Some).map_err(|detail| Error::BadHfFolder { path: path.into(), detail })
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        let Value::Object(o) = v else { return Err("expected a JSON object".into()) };
        let id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("`eos_token_id`: {x} is not a token id"));
        let eos_token_ids = match o.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => ids.iter().map(id).collect::<std::result::Result<_, _>>()?,
            Some(x) => vec![id(x)?],
        };
        let max_new_tokens = match o.get("max_new_tokens") {
            None | Some(Value::Null) => None,
            Some(x) => Some(x.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| format!("`max_new_tokens`: {x} is not a count"))?),
        };
        let sampling = (o.get("do_sample") == Some(&Value::Bool(true))).then(|| {
            let settings: Vec<String> =
                ["temperature", "top_k", "top_p"].iter().filter_map(|k| o.get(*k).filter(|v| !v.is_null()).map(|v| format!("{k} {v}"))).collect();
            match settings.is_empty() {
                true => "sampling".to_string(),
                false => format!("sampling ({})", settings.join(", ")),
            }
        });
        Ok(GenerationConfig { eos_token_ids, max_new_tokens, sampling })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.2-1B-Instruct's generation_config.json as the Hub serves it, and SmolLM2's.
    #[test]
    fn reads_eos_lists_single_ids_and_sampling() {
        let llama = r#"{"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0"}"#;
        let c = GenerationConfig::parse(llama).unwrap();
        assert_eq!(c.eos_token_ids, [128001, 128008, 128009]);
        assert_eq!(c.max_new_tokens, None);
        assert_eq!(c.sampling.as_deref(), Some("sampling (temperature 0.6, top_p 0.9)"));
        let smol = r#"{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_new_tokens": 64}"#;
        assert_eq!(GenerationConfig::parse(smol).unwrap(), GenerationConfig { eos_token_ids: vec![2], max_new_tokens: Some(64), sampling: None });
        assert_eq!(GenerationConfig::parse(r#"{"eos_token_id": null}"#).unwrap(), GenerationConfig::default());
    }

    #[test]
    fn malformed_configs_are_refused_naming_the_field() {
        assert!(GenerationConfig::parse("[1]").unwrap_err().contains("object"));
        assert!(GenerationConfig::parse("{").unwrap_err().contains("not JSON"));
        assert!(GenerationConfig::parse(r#"{"eos_token_id": -1}"#).unwrap_err().contains("`eos_token_id`"));
        assert!(GenerationConfig::parse(r#"{"eos_token_id": [2, "x"]}"#).unwrap_err().contains("`eos_token_id`"));
        assert!(GenerationConfig::parse(r#"{"max_new_tokens": 1.5}"#).unwrap_err().contains("`max_new_tokens`"));
        let missing = std::path::Path::new("/nonexistent/generation_config.json");
        assert_eq!(GenerationConfig::read(missing).unwrap(), None);
    }
}
