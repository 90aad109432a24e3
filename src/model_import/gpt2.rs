//! GPT-2: learned positions, LayerNorm, `Conv1D` weights stored `[in, out]`, a fused `c_attn`, the
//! lm_head tied to `wte`. Checkpoints name the tensors with or without the `transformer.` prefix.

use super::config::HfConfig;
use super::ops::{AttentionShape, WriteResult, Writer, INPUT_IDS, LOGITS, POSITION_IDS};

pub fn write(w: &mut Writer, c: &HfConfig) -> WriteResult<(String, String)> {
    let p = if w.weights.has("transformer.wte.weight") { "transformer." } else { "" };
    let h = c.hidden_size;
    let wte = w.weight(&format!("{p}wte.weight"), &[c.vocab_size, h])?;
    let wpe = w.weight(&format!("{p}wpe.weight"), &[c.max_position_embeddings, h])?;
    let tokens = w.op("Gather", &[&wte, INPUT_IDS], "wte");
    let positions = w.op("Gather", &[&wpe, POSITION_IDS], "wpe");
    let mut x = w.op("Add", &[&tokens, &positions], "embeddings");
    let mask = w.causal_mask();
    let shape = AttentionShape { heads: c.num_heads, kv_heads: c.num_heads, head_dim: c.head_dim, scale: c.attention_scale, softcap: None };
    for layer in 0..c.num_layers {
        let b = format!("{p}h.{layer}");
        let normed = w.layer_norm(&x, &format!("{b}.ln_1"), h, c.norm_eps)?;
        let qkv = w.conv1d(&normed, &format!("{b}.attn.c_attn"), h, 3 * h)?;
        let sizes = w.b.ints(&[h, h, h]);
        let parts = w.b.op_n("Split", &[&qkv, &sizes], 3, vec![crate::onnx::attr_i("axis", -1)], &format!("{b}.attn.qkv"));
        let q = w.split_heads(&parts[0], c.num_heads, c.head_dim, &format!("{b}.attn.q"));
        let k = w.split_heads(&parts[1], c.num_heads, c.head_dim, &format!("{b}.attn.k"));
        let v = w.split_heads(&parts[2], c.num_heads, c.head_dim, &format!("{b}.attn.v"));
        let context = w.attention(&q, &k, &v, &shape, &mask, None, &format!("{b}.attn"));
        let attn = w.conv1d(&context, &format!("{b}.attn.c_proj"), h, h)?;
        x = w.op("Add", &[&x, &attn], &format!("{b}.attn_residual"));
        let normed = w.layer_norm(&x, &format!("{b}.ln_2"), h, c.norm_eps)?;
        let up = w.conv1d(&normed, &format!("{b}.mlp.c_fc"), h, c.intermediate_size)?;
        let act = w.activation(&up, &c.activation);
        let down = w.conv1d(&act, &format!("{b}.mlp.c_proj"), c.intermediate_size, h)?;
        x = w.op("Add", &[&x, &down], &format!("{b}.mlp_residual"));
    }
    let hidden = w.layer_norm(&x, &format!("{p}ln_f"), h, c.norm_eps)?;
    w.lm_head(&hidden, &wte, None);
    Ok((hidden, LOGITS.to_string()))
}
