//! The Llama-style decoder (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3), one writer with the
//! families' differences as switches: q/k/v biases, q/k norms, fused qkv and gate/up projections
//! (Phi-3), `1 + w` norms, scaled embeddings, extra norms and soft-capping (Gemma 2), sliding windows.

use super::config::{Family, HfConfig};
use super::ops::{AttentionShape, WriteResult, Writer, INPUT_IDS, LOGITS};
use super::rope::inv_freq;

/// Writes the forward graph into `w`; returns `(hidden, logits)`: the lm_head's input and the output.
pub fn write(w: &mut Writer, c: &HfConfig) -> WriteResult<(String, String)> {
    let h = c.hidden_size;
    let embed = w.weight("model.embed_tokens.weight", &[c.vocab_size, h])?;
    let mut x = w.op("Gather", &[&embed, INPUT_IDS], "model.embed_tokens");
    if c.family.is_gemma() {
        // transformers multiplies by sqrt(hidden) rounded to the activations' dtype
        let k = w.scalar((h as f64).sqrt() as f32 as f64);
        x = w.op("Mul", &[&x, &k], "model.embed_scaled");
    }
    let mask = w.causal_mask();
    let (cos, sin) = w.rotary(&inv_freq(c.head_dim, c.rope_theta, &c.rope_scaling));
    let mut window_biases: Vec<(i64, String)> = Vec::new();
    for layer in 0..c.num_layers {
        let window = match c.windows[layer] {
            Some(size) => Some(match window_biases.iter().find(|(s, _)| *s == size) {
                Some((_, name)) => name.clone(),
                None => {
                    let name = w.window_bias(size);
                    window_biases.push((size, name.clone()));
                    name
                }
            }),
            None => None,
        };
        let ctx = LayerInputs { mask: &mask, window: window.as_deref(), cos: &cos, sin: &sin };
        x = decoder_layer(w, c, layer, &x, &ctx)?;
    }
    let hidden = norm(w, c, &x, "model.norm.weight", h)?;
    let lm_head = if c.tie_word_embeddings || !w.weights.has("lm_head.weight") { embed } else { w.weight("lm_head.weight", &[c.vocab_size, h])? };
    w.lm_head(&hidden, &lm_head, c.final_logit_softcapping);
    Ok((hidden, LOGITS.to_string()))
}

/// What every layer reads besides its input.
struct LayerInputs<'a> {
    mask: &'a str,
    window: Option<&'a str>,
    cos: &'a str,
    sin: &'a str,
}

fn norm(w: &mut Writer, c: &HfConfig, x: &str, weight: &str, dim: i64) -> WriteResult<String> {
    w.rms_norm(x, weight, dim, c.norm_eps, c.family.is_gemma())
}

fn decoder_layer(w: &mut Writer, c: &HfConfig, layer: usize, x: &str, ctx: &LayerInputs) -> WriteResult<String> {
    let p = format!("model.layers.{layer}");
    let gemma2 = c.family == Family::Gemma2;
    let normed = norm(w, c, x, &format!("{p}.input_layernorm.weight"), c.hidden_size)?;
    let mut attn = self_attention(w, c, &p, &normed, ctx)?;
    if gemma2 {
        attn = norm(w, c, &attn, &format!("{p}.post_attention_layernorm.weight"), c.hidden_size)?;
    }
    let x = w.op("Add", &[x, &attn], &format!("{p}.attn_residual"));
    let pre_mlp = if gemma2 { "pre_feedforward_layernorm" } else { "post_attention_layernorm" };
    let normed = norm(w, c, &x, &format!("{p}.{pre_mlp}.weight"), c.hidden_size)?;
    let mut mlp = mlp(w, c, &p, &normed)?;
    if gemma2 {
        mlp = norm(w, c, &mlp, &format!("{p}.post_feedforward_layernorm.weight"), c.hidden_size)?;
    }
    Ok(w.op("Add", &[&x, &mlp], &format!("{p}.mlp_residual")))
}

/// `(q, k, v)` as `[batch, sequence, width]`: three projections, or Phi-3's fused `qkv_proj` split.
fn projections(w: &mut Writer, c: &HfConfig, a: &str, x: &str) -> WriteResult<[String; 3]> {
    let (h, qw, kvw) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    if c.family == Family::Phi3 {
        let fused = w.linear(x, &format!("{a}.qkv_proj"), qw + 2 * kvw, h, c.attention_bias)?;
        let sizes = w.b.ints(&[qw, kvw, kvw]);
        let parts = w.b.op_n("Split", &[&fused, &sizes], 3, vec![crate::onnx::attr_i("axis", -1)], &format!("{a}.qkv"));
        return Ok([parts[0].clone(), parts[1].clone(), parts[2].clone()]);
    }
    Ok([
        w.linear(x, &format!("{a}.q_proj"), qw, h, c.attention_bias)?,
        w.linear(x, &format!("{a}.k_proj"), kvw, h, c.attention_bias)?,
        w.linear(x, &format!("{a}.v_proj"), kvw, h, c.attention_bias)?,
    ])
}

fn self_attention(w: &mut Writer, c: &HfConfig, p: &str, x: &str, ctx: &LayerInputs) -> WriteResult<String> {
    let a = format!("{p}.self_attn");
    let [q, k, v] = projections(w, c, &a, x)?;
    let (q, k) = if c.family == Family::Qwen3 {
        // Qwen3 normalises each head's query and key before the rotation
        let shape_q = w.b.ints(&[0, 0, c.num_heads, c.head_dim]);
        let shape_k = w.b.ints(&[0, 0, c.num_kv_heads, c.head_dim]);
        let q4 = w.op("Reshape", &[&q, &shape_q], &format!("{a}.q_heads"));
        let k4 = w.op("Reshape", &[&k, &shape_k], &format!("{a}.k_heads"));
        let qn = norm(w, c, &q4, &format!("{a}.q_norm.weight"), c.head_dim)?;
        let kn = norm(w, c, &k4, &format!("{a}.k_norm.weight"), c.head_dim)?;
        let (flat_q, flat_k) = (w.b.ints(&[0, 0, -1]), w.b.ints(&[0, 0, -1]));
        (w.op("Reshape", &[&qn, &flat_q], &format!("{a}.q_normed")), w.op("Reshape", &[&kn, &flat_k], &format!("{a}.k_normed")))
    } else {
        (q, k)
    };
    let q = w.split_heads(&q, c.num_heads, c.head_dim, &format!("{a}.q"));
    let k = w.split_heads(&k, c.num_kv_heads, c.head_dim, &format!("{a}.k"));
    let v = w.split_heads(&v, c.num_kv_heads, c.head_dim, &format!("{a}.v"));
    let q = w.apply_rotary(&q, ctx.cos, ctx.sin, c.head_dim, &format!("{a}.q"));
    let k = w.apply_rotary(&k, ctx.cos, ctx.sin, c.head_dim, &format!("{a}.k"));
    let shape =
        AttentionShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim, scale: c.attention_scale, softcap: c.attn_logit_softcapping };
    let context = w.attention(&q, &k, &v, &shape, ctx.mask, ctx.window, &a);
    // Llama's o_proj has a bias with attention_bias; Qwen2's q/k/v biases leave o_proj without one
    let o_bias = c.attention_bias && c.family != Family::Qwen2;
    w.linear(&context, &format!("{a}.o_proj"), c.hidden_size, c.num_heads * c.head_dim, o_bias)
}

fn mlp(w: &mut Writer, c: &HfConfig, p: &str, x: &str) -> WriteResult<String> {
    let m = format!("{p}.mlp");
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (gate, up) = if c.family == Family::Phi3 {
        let fused = w.linear(x, &format!("{m}.gate_up_proj"), 2 * i, h, false)?;
        let sizes = w.b.ints(&[i, i]);
        let parts = w.b.op_n("Split", &[&fused, &sizes], 2, vec![crate::onnx::attr_i("axis", -1)], &format!("{m}.gate_up"));
        (parts[0].clone(), parts[1].clone())
    } else {
        (w.linear(x, &format!("{m}.gate_proj"), i, h, c.mlp_bias)?, w.linear(x, &format!("{m}.up_proj"), i, h, c.mlp_bias)?)
    };
    let act = w.activation(&gate, &c.activation);
    let prod = w.op("Mul", &[&act, &up], &format!("{m}.gated"));
    w.linear(&prod, &format!("{m}.down_proj"), h, i, c.mlp_bias && c.family != Family::Phi3)
}
