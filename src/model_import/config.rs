//! `config.json` of a Hugging Face causal LM, read into the fields the graph writers need. Both spellings of
//! rotary settings are read: transformers 4's `rope_theta` + `rope_scaling` and transformers 5's
//! `rope_parameters`.

use serde_json::Value;

/// Which graph writer a config belongs to, from `model_type` (or `architectures`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Phi3,
    Gpt2,
}

impl Family {
    /// `(model_type, architecture class, family)` of every family betadpo writes itself.
    const KNOWN: &'static [(&'static str, &'static str, Family)] = &[
        ("llama", "LlamaForCausalLM", Family::Llama),
        ("mistral", "MistralForCausalLM", Family::Mistral),
        ("qwen2", "Qwen2ForCausalLM", Family::Qwen2),
        ("qwen3", "Qwen3ForCausalLM", Family::Qwen3),
        ("gemma", "GemmaForCausalLM", Family::Gemma),
        ("gemma2", "Gemma2ForCausalLM", Family::Gemma2),
        ("phi3", "Phi3ForCausalLM", Family::Phi3),
        ("gpt2", "GPT2LMHeadModel", Family::Gpt2),
    ];

    pub fn supported() -> String {
        Self::KNOWN.iter().map(|(t, _, _)| *t).collect::<Vec<_>>().join(", ")
    }

    /// The family of `model_type` or of the first of `architectures`; `None` for any other.
    pub fn of(model_type: &str, architectures: &[String]) -> Option<Family> {
        let by_type = Self::KNOWN.iter().find(|(t, _, _)| *t == model_type);
        let by_arch = || Self::KNOWN.iter().find(|(_, a, _)| architectures.first().is_some_and(|x| x == a));
        by_type.or_else(by_arch).map(|(_, _, f)| *f)
    }

    /// RMSNorm weights applied as `1 + w` (Gemma's convention) and embeddings scaled by sqrt(hidden).
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2)
    }
}

/// How the rotary frequencies are rescaled (`rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware scaling past `max_position_embeddings`; identical to the default up to it.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The fields of `config.json` the graph writers read, with each family's defaults filled in.
#[derive(Clone, Debug)]
pub struct HfConfig {
    pub family: Family,
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Per layer: the sliding window it attends within, `None` for full attention.
    pub windows: Vec<Option<i64>>,
    /// Scores are multiplied by this before the mask (1/sqrt(head_dim), or Gemma 2's query_pre_attn_scalar).
    pub attention_scale: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// `silu`, `gelu_pytorch_tanh`, `gelu_new`, `gelu`.
    pub activation: String,
    /// The whole config as written, for `export --hf` to write back.
    pub raw: Value,
}

/// Why a config cannot be read (the caller names the file).
pub type ConfigError = String;

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn float(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn flag(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

fn required(v: &Value, keys: &[&str]) -> Result<i64, ConfigError> {
    keys.iter().find_map(|k| int(v, k)).filter(|&n| n > 0).ok_or_else(|| format!("config.json has no positive integer {}", keys.join(" / ")))
}

impl HfConfig {
    /// Reads `config.json`'s text; `Ok(Err(architecture))` for a causal LM of an architecture betadpo does not write.
    pub fn parse(text: &str) -> Result<std::result::Result<HfConfig, String>, ConfigError> {
        let raw: Value = serde_json::from_str(text).map_err(|e| format!("config.json is not JSON ({e})"))?;
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let architectures: Vec<String> =
            raw.get("architectures").and_then(Value::as_array).map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
        let Some(family) = Family::of(&model_type, &architectures) else {
            let named = architectures.first().cloned().unwrap_or_else(|| if model_type.is_empty() { "(none named)".into() } else { model_type.clone() });
            return Ok(Err(named));
        };
        Self::of_family(family, model_type, raw).map(Ok)
    }

    fn of_family(family: Family, model_type: String, raw: Value) -> Result<HfConfig, ConfigError> {
        let gpt2 = family == Family::Gpt2;
        let hidden_size = required(&raw, &["hidden_size", "n_embd"])?;
        let num_heads = required(&raw, &["num_attention_heads", "n_head"])?;
        let num_kv_heads = int(&raw, "num_key_value_heads").filter(|&n| n > 0).unwrap_or(num_heads);
        let head_dim = int(&raw, "head_dim").filter(|&n| n > 0).unwrap_or(hidden_size / num_heads);
        let num_layers = required(&raw, &["num_hidden_layers", "n_layer"])? as usize;
        if num_heads % num_kv_heads != 0 {
            return Err(format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"));
        }
        let intermediate_size = if gpt2 { int(&raw, "n_inner").filter(|&n| n > 0).unwrap_or(4 * hidden_size) } else { required(&raw, &["intermediate_size"])? };
        let (rope_theta, rope_scaling) = rope(&raw)?;
        let activation = ["hidden_activation", "hidden_act", "activation_function"]
            .iter()
            .find_map(|k| raw.get(*k).and_then(Value::as_str))
            .unwrap_or(if family.is_gemma() { "gelu_pytorch_tanh" } else { "silu" })
            .to_string();
        if !["silu", "gelu_pytorch_tanh", "gelu_new", "gelu"].contains(&activation.as_str()) {
            return Err(format!("activation {activation:?} is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh)"));
        }
        let gemma2 = family == Family::Gemma2;
        let attention_scale = match float(&raw, "query_pre_attn_scalar").filter(|_| gemma2) {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (head_dim as f64).sqrt(),
        };
        let positive = |key: &str| float(&raw, key).filter(|&c| c > 0.0);
        let config = HfConfig {
            family,
            vocab_size: required(&raw, &["vocab_size"])?,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            norm_eps: ["rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"].iter().find_map(|k| float(&raw, k)).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: int(&raw, "max_position_embeddings").or(int(&raw, "n_positions")).unwrap_or(2048),
            // each config class's default (a folder without lm_head.weight is tied whatever it says: see `weights`)
            tie_word_embeddings: flag(&raw, "tie_word_embeddings").unwrap_or(family.is_gemma() || gpt2),
            attention_bias: flag(&raw, "attention_bias").unwrap_or(family == Family::Qwen2),
            mlp_bias: flag(&raw, "mlp_bias").unwrap_or(false),
            windows: windows(family, &raw, num_layers)?,
            attention_scale,
            attn_logit_softcapping: positive("attn_logit_softcapping").filter(|_| gemma2),
            final_logit_softcapping: positive("final_logit_softcapping").filter(|_| gemma2),
            activation,
            model_type,
            raw,
        };
        Ok(config)
    }
}

/// `(rope_theta, scaling)` from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
fn rope(raw: &Value) -> Result<(f64, RopeScaling), ConfigError> {
    let params = raw.get("rope_parameters").filter(|v| v.is_object());
    let scaling = params.or(raw.get("rope_scaling").filter(|v| v.is_object()));
    let theta = params.and_then(|p| float(p, "rope_theta")).or(float(raw, "rope_theta")).unwrap_or(10000.0);
    let Some(s) = scaling else { return Ok((theta, RopeScaling::Default)) };
    let kind = s.get("rope_type").or(s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || float(s, "factor").filter(|&f| f > 0.0).ok_or_else(|| format!("rope scaling {kind:?} has no positive factor"));
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: float(s, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: float(s, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: float(s, "original_max_position_embeddings").unwrap_or(8192.0),
        },
        other => return Err(format!("rope scaling {other:?} is not supported (default, linear, dynamic, llama3)")),
    };
    if float(s, "partial_rotary_factor").or(float(raw, "partial_rotary_factor")).is_some_and(|f| f != 1.0) {
        return Err("partial_rotary_factor other than 1 is not supported".into());
    }
    Ok((theta, scaling))
}

/// Each layer's sliding window: `layer_types` when the config lists them, else the family's rule
/// (Mistral: every layer; Qwen2: layers from `max_window_layers` when `use_sliding_window`; Gemma 2: even layers).
fn windows(family: Family, raw: &Value, layers: usize) -> Result<Vec<Option<i64>>, ConfigError> {
    let window = int(raw, "sliding_window").filter(|&w| w > 0);
    if let Some(types) = raw.get("layer_types").and_then(Value::as_array) {
        if types.len() != layers {
            return Err(format!("layer_types lists {} layers, num_hidden_layers is {layers}", types.len()));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| "layer_types has sliding_attention but sliding_window is not set".to_string()),
                other => Err(format!("layer type {other:?} is not supported")),
            })
            .collect();
    }
    Ok((0..layers)
        .map(|i| match family {
            Family::Mistral | Family::Phi3 => window,
            Family::Qwen2 | Family::Qwen3 => {
                window.filter(|_| flag(raw, "use_sliding_window") == Some(true) && i as i64 >= int(raw, "max_window_layers").unwrap_or(0))
            }
            Family::Gemma2 => window.filter(|_| i % 2 == 0),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HfConfig {
        HfConfig::parse(text).unwrap().unwrap()
    }

    #[test]
    fn llama_defaults_and_llama3_scaling_in_both_spellings() {
        let v4 = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"rope_theta":500000.0,"tie_word_embeddings":true,
            "rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        );
        let v5 = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":true,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        );
        for c in [&v4, &v5] {
            assert_eq!((c.family, c.head_dim, c.num_kv_heads, c.rope_theta), (Family::Llama, 16, 2, 500000.0));
            assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
            assert_eq!(c.attention_scale, 0.25);
            assert_eq!(c.windows, vec![None, None]);
        }
    }

    #[test]
    fn sliding_windows_per_family() {
        let base = r#""vocab_size":10,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,"num_attention_heads":4,"sliding_window":16"#;
        assert_eq!(parse(&format!(r#"{{"model_type":"mistral",{base}}}"#)).windows, vec![Some(16); 3]);
        assert_eq!(parse(&format!(r#"{{"model_type":"gemma2",{base}}}"#)).windows, vec![Some(16), None, Some(16)]);
        assert_eq!(parse(&format!(r#"{{"model_type":"qwen2",{base}}}"#)).windows, vec![None; 3]);
        let typed = parse(&format!(r#"{{"model_type":"qwen2",{base},"layer_types":["full_attention","sliding_attention","full_attention"]}}"#));
        assert_eq!(typed.windows, vec![None, Some(16), None]);
    }

    #[test]
    fn other_architectures_and_bad_fields_are_named() {
        assert_eq!(HfConfig::parse(r#"{"model_type":"falcon","architectures":["FalconForCausalLM"]}"#).unwrap().unwrap_err(), "FalconForCausalLM");
        let no_hidden = HfConfig::parse(r#"{"model_type":"llama","vocab_size":10}"#).unwrap_err();
        assert!(no_hidden.contains("hidden_size"), "{no_hidden}");
        let yarn = r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#;
        assert!(HfConfig::parse(yarn).unwrap_err().contains("yarn"));
        assert!(HfConfig::parse("{").unwrap_err().contains("not JSON"));
    }
}
