//! The pieces every family's graph is written from, each the float32 math transformers runs: linear
//! layers reading the checkpoint's `[out, in]` weights through a Transpose (the form LoRA and the
//! tied lm_head are recognised in), RMS and layer norms, activations, rotary embeddings, the causal
//! mask every layer adds before its Softmax (the one tensor the packed layout replaces, see
//! `dpo::packing`), sliding-window biases computed from positions (so they hold in packed rows too),
//! and eager attention.

use std::collections::HashSet;

use super::weights::Weights;
use crate::graph::Builder;
use crate::onnx::{attr_i, attr_ints, dtype, tensor_f32, TensorProto};

/// A failure names what is wrong with the folder (the caller adds the path).
pub type WriteResult<T> = std::result::Result<T, String>;

/// The model's token inputs.
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const POSITION_IDS: &str = "position_ids";
pub const LOGITS: &str = "logits";

/// What a masked score becomes: the lowest float32, as transformers' masks use.
const MASKED: f64 = f32::MIN as f64;
/// What a sliding window adds outside it: far below any score, yet finite, so that added to [`MASKED`] it
/// stays finite and a padded query whose window holds only padding gets no NaN (transformers' eager
/// attention gives NaN there, which then spreads to the row's real tokens).
const OUTSIDE_WINDOW: f64 = -1e30;

pub struct Writer<'a, 'n> {
    pub b: Builder<'n>,
    pub weights: &'a Weights,
    pub initializers: Vec<TensorProto>,
    used: HashSet<String>,
}

/// How an attention layer is shaped and scored.
pub struct AttentionShape {
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub scale: f64,
    pub softcap: Option<f64>,
}

impl<'a, 'n> Writer<'a, 'n> {
    pub fn new(b: Builder<'n>, weights: &'a Weights) -> Self {
        Writer { b, weights, initializers: Vec::new(), used: HashSet::new() }
    }

    /// The checkpoint tensor `name` as an initializer (added once), checked to have `dims`.
    pub fn weight(&mut self, name: &str, dims: &[i64]) -> WriteResult<String> {
        if self.used.insert(name.to_string()) {
            self.initializers.push(self.weights.get(name, dims)?);
        }
        Ok(name.to_string())
    }

    pub fn op(&mut self, op: &str, inputs: &[&str], hint: &str) -> String {
        self.b.op(op, inputs, vec![], hint)
    }

    /// `logits = hidden @ w^T`, the lm_head product writing the graph's output itself, optionally
    /// soft-capped (`cap * tanh(logits / cap)`, Gemma 2): the objective recognises the plain product and
    /// applies it to answer positions only.
    pub fn lm_head(&mut self, hidden: &str, w: &str, softcap: Option<f64>) {
        let wt = self.b.op("Transpose", &[w], vec![attr_ints("perm", &[1, 0])], "lm_head.weight_t");
        let Some(cap) = softcap else {
            self.b.op_into("MatMul", &[hidden, &wt], &[LOGITS], vec![]);
            return;
        };
        let raw = self.op("MatMul", &[hidden, &wt], "lm_head");
        let k = self.scalar(cap);
        let d = self.op("Div", &[&raw, &k], "logits/capped_in");
        let t = self.op("Tanh", &[&d], "logits/capped_tanh");
        self.b.op_into("Mul", &[&t, &k], &[LOGITS], vec![]);
    }

    pub fn scalar(&mut self, v: f64) -> String {
        self.b.scalar(v, dtype::FLOAT)
    }

    /// `x @ W^T (+ bias)` for a PyTorch `Linear` weight `[out, in]` named `<module>.weight`.
    pub fn linear(&mut self, x: &str, module: &str, out: i64, inp: i64, bias: bool) -> WriteResult<String> {
        let w = self.weight(&format!("{module}.weight"), &[out, inp])?;
        let wt = self.b.op("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])], &format!("{module}.weight_t"));
        let y = self.op("MatMul", &[x, &wt], module);
        if !bias {
            return Ok(y);
        }
        let b = self.weight(&format!("{module}.bias"), &[out])?;
        Ok(self.op("Add", &[&y, &b], &format!("{module}.out")))
    }

    /// GPT-2's `Conv1D`: a `[in, out]` weight and a bias, `x @ W + b`.
    pub fn conv1d(&mut self, x: &str, module: &str, inp: i64, out: i64) -> WriteResult<String> {
        let w = self.weight(&format!("{module}.weight"), &[inp, out])?;
        let bias = self.weight(&format!("{module}.bias"), &[out])?;
        let y = self.op("MatMul", &[x, &w], module);
        Ok(self.op("Add", &[&y, &bias], &format!("{module}.out")))
    }

    /// `x * rsqrt(mean(x^2) + eps) * w` over the last axis; Gemma's norms multiply by `1 + w`.
    pub fn rms_norm(&mut self, x: &str, weight: &str, dim: i64, eps: f64, one_plus: bool) -> WriteResult<String> {
        let w = self.weight(weight, &[dim])?;
        let sq = self.op("Mul", &[x, x], &format!("{weight}/sq"));
        let axes = self.b.ints(&[-1]);
        let mean = self.b.op("ReduceMean", &[&sq, &axes], vec![attr_i("keepdims", 1)], &format!("{weight}/mean"));
        let eps = self.scalar(eps);
        let var = self.op("Add", &[&mean, &eps], &format!("{weight}/var"));
        let std = self.op("Sqrt", &[&var], &format!("{weight}/std"));
        let inv = self.op("Reciprocal", &[&std], &format!("{weight}/rstd"));
        let normed = self.op("Mul", &[x, &inv], &format!("{weight}/normed"));
        let scale = if one_plus {
            let one = self.scalar(1.0);
            self.op("Add", &[&one, &w], &format!("{weight}/one_plus"))
        } else {
            w
        };
        Ok(self.op("Mul", &[&normed, &scale], weight.trim_end_matches(".weight")))
    }

    pub fn layer_norm(&mut self, x: &str, module: &str, dim: i64, eps: f64) -> WriteResult<String> {
        let w = self.weight(&format!("{module}.weight"), &[dim])?;
        let bias = self.weight(&format!("{module}.bias"), &[dim])?;
        let attrs = vec![attr_i("axis", -1), crate::onnx::attr_f("epsilon", eps as f32)];
        Ok(self.b.op("LayerNormalization", &[x, &w, &bias], attrs, module))
    }

    /// `silu`, `gelu` (erf) or the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    pub fn activation(&mut self, x: &str, kind: &str) -> String {
        match kind {
            "silu" => {
                let s = self.op("Sigmoid", &[x], "silu/sigmoid");
                self.op("Mul", &[x, &s], "silu")
            }
            "gelu" => {
                let k = self.scalar(std::f64::consts::FRAC_1_SQRT_2);
                let xs = self.op("Mul", &[x, &k], "gelu/scaled");
                let e = self.op("Erf", &[&xs], "gelu/erf");
                self.gelu_tail(x, &e)
            }
            _ => {
                let (c, k) = (self.scalar(0.044715), self.scalar((2.0 / std::f64::consts::PI).sqrt()));
                let x2 = self.op("Mul", &[x, x], "gelu/x2");
                let x3 = self.op("Mul", &[&x2, x], "gelu/x3");
                let cx3 = self.op("Mul", &[&x3, &c], "gelu/cx3");
                let inner = self.op("Add", &[x, &cx3], "gelu/inner");
                let scaled = self.op("Mul", &[&inner, &k], "gelu/scaled");
                let t = self.op("Tanh", &[&scaled], "gelu/tanh");
                self.gelu_tail(x, &t)
            }
        }
    }

    /// `0.5 * x * (1 + t)`.
    fn gelu_tail(&mut self, x: &str, t: &str) -> String {
        let (one, half) = (self.scalar(1.0), self.scalar(0.5));
        let t1 = self.op("Add", &[t, &one], "gelu/one_plus");
        let hx = self.op("Mul", &[x, &half], "gelu/half_x");
        self.op("Mul", &[&hx, &t1], "gelu")
    }

    /// `(cos, sin)` `[batch, 1, sequence, dim]` of the rotary embedding at `position_ids`.
    pub fn rotary(&mut self, inv_freq: &[f32]) -> (String, String) {
        let freqs = self.b.constant(tensor_f32("", &[inv_freq.len() as i64], inv_freq), "rotary.inv_freq");
        let pos = self.b.op("Cast", &[POSITION_IDS], vec![attr_i("to", dtype::FLOAT as i64)], "rotary.positions");
        let axes = self.b.ints(&[2]);
        let pos = self.op("Unsqueeze", &[&pos, &axes], "rotary.positions_col");
        let angles = self.op("Mul", &[&pos, &freqs], "rotary.angles");
        let emb = self.b.op("Concat", &[&angles, &angles], vec![attr_i("axis", -1)], "rotary.emb");
        let head_axis = self.b.ints(&[1]);
        let cos = self.op("Cos", &[&emb], "rotary.cos_rows");
        let sin = self.op("Sin", &[&emb], "rotary.sin_rows");
        (self.op("Unsqueeze", &[&cos, &head_axis], "rotary.cos"), self.op("Unsqueeze", &[&sin, &head_axis], "rotary.sin"))
    }

    /// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = concat(-x2, x1)` for halves `x1, x2`.
    pub fn apply_rotary(&mut self, x: &str, cos: &str, sin: &str, head_dim: i64, hint: &str) -> String {
        let split = self.b.ints(&[head_dim / 2, head_dim / 2]);
        let halves = self.b.op_n("Split", &[x, &split], 2, vec![attr_i("axis", -1)], &format!("{hint}/half"));
        let neg = self.op("Neg", &[&halves[1]], &format!("{hint}/neg_half"));
        let rotated = self.b.op("Concat", &[&neg, &halves[0]], vec![attr_i("axis", -1)], &format!("{hint}/rotated"));
        let a = self.op("Mul", &[x, cos], &format!("{hint}/cos"));
        let c = self.op("Mul", &[&rotated, sin], &format!("{hint}/sin"));
        self.op("Add", &[&a, &c], &format!("{hint}/rope"))
    }

    /// `Where(allowed, 0, low)`.
    fn bias_where(&mut self, allowed: &str, low: f64, hint: &str) -> String {
        let (zero, low) = (self.scalar(0.0), self.scalar(low));
        self.op("Where", &[allowed, &zero, &low], hint)
    }

    /// The additive causal mask `[batch, 1, query, key]` with padded keys masked: 0 or the lowest float.
    pub fn causal_mask(&mut self) -> String {
        let t = self.b.dim_scalar(INPUT_IDS, 1, "mask/sequence");
        let (zero, one) = (self.b.int(0), self.b.int(1));
        let idx = self.op("Range", &[&zero, &t, &one], "mask/index");
        let (a1, a0) = (self.b.ints(&[1]), self.b.ints(&[0]));
        let q = self.op("Unsqueeze", &[&idx, &a1], "mask/query");
        let k = self.op("Unsqueeze", &[&idx, &a0], "mask/key");
        let causal = self.op("GreaterOrEqual", &[&q, &k], "mask/causal");
        let keys = self.b.op("Cast", &[ATTENTION_MASK], vec![attr_i("to", dtype::BOOL as i64)], "mask/keys");
        let axes = self.b.ints(&[1, 2]);
        let keys = self.op("Unsqueeze", &[&keys, &axes], "mask/keys_4d");
        let allowed = self.op("And", &[&causal, &keys], "mask/allowed");
        self.bias_where(&allowed, MASKED, "causal_mask")
    }

    /// `[batch, 1, query, key]`: 0 where `position(query) - position(key) < window`, from the positions
    /// rather than the columns, so it is right in packed rows as well.
    pub fn window_bias(&mut self, window: i64) -> String {
        let (a2, a1) = (self.b.ints(&[2]), self.b.ints(&[1]));
        let q = self.op("Unsqueeze", &[POSITION_IDS, &a2], "window/query");
        let k = self.op("Unsqueeze", &[POSITION_IDS, &a1], "window/key");
        let dist = self.op("Sub", &[&q, &k], "window/distance");
        let w = self.b.int(window);
        let near = self.op("Less", &[&dist, &w], "window/near");
        let bias = self.bias_where(&near, OUTSIDE_WINDOW, "window/bias_3d");
        self.op("Unsqueeze", &[&bias, &a1], &format!("window_{window}_bias"))
    }

    /// `[batch, sequence, heads * head_dim]` -> `[batch, heads, sequence, head_dim]`.
    pub fn split_heads(&mut self, x: &str, heads: i64, head_dim: i64, hint: &str) -> String {
        let shape = self.b.ints(&[0, 0, heads, head_dim]);
        let r = self.op("Reshape", &[x, &shape], &format!("{hint}/heads"));
        self.b.op("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])], &format!("{hint}/by_head"))
    }

    /// Eager attention on `[batch, heads, sequence, head_dim]` queries and `[batch, kv_heads, ...]` keys
    /// and values: `softmax(q k^T * scale (soft-capped) + bias + mask) v`, back to `[batch, sequence, heads * head_dim]`.
    pub fn attention(&mut self, q: &str, k: &str, v: &str, s: &AttentionShape, mask: &str, window: Option<&str>, hint: &str) -> String {
        let (k, v) = (self.repeat_kv(k, s, &format!("{hint}/k")), self.repeat_kv(v, s, &format!("{hint}/v")));
        let kt = self.b.op("Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])], &format!("{hint}/k_t"));
        let qk = self.op("MatMul", &[q, &kt], &format!("{hint}/qk"));
        let scale = self.scalar(s.scale);
        let mut scores = self.op("Mul", &[&qk, &scale], &format!("{hint}/scores"));
        if let Some(cap) = s.softcap {
            let c = self.scalar(cap);
            let d = self.op("Div", &[&scores, &c], &format!("{hint}/capped_in"));
            let t = self.op("Tanh", &[&d], &format!("{hint}/capped_tanh"));
            scores = self.op("Mul", &[&t, &c], &format!("{hint}/capped"));
        }
        if let Some(w) = window {
            scores = self.op("Add", &[&scores, w], &format!("{hint}/windowed"));
        }
        let masked = self.op("Add", &[&scores, mask], &format!("{hint}/masked"));
        let probs = self.b.op("Softmax", &[&masked], vec![attr_i("axis", -1)], &format!("{hint}/probs"));
        let out = self.op("MatMul", &[&probs, &v], &format!("{hint}/context"));
        let t = self.b.op("Transpose", &[&out], vec![attr_ints("perm", &[0, 2, 1, 3])], &format!("{hint}/context_t"));
        let shape = self.b.ints(&[0, 0, s.heads * s.head_dim]);
        self.op("Reshape", &[&t, &shape], &format!("{hint}/merged"))
    }

    /// Grouped-query attention: each key/value head serves `heads / kv_heads` query heads.
    fn repeat_kv(&mut self, x: &str, s: &AttentionShape, hint: &str) -> String {
        let groups = s.heads / s.kv_heads;
        if groups == 1 {
            return x.to_string();
        }
        let axes = self.b.ints(&[2]);
        let u = self.op("Unsqueeze", &[x, &axes], &format!("{hint}/groups"));
        let reps = self.b.ints(&[1, 1, groups, 1, 1]);
        let e = self.op("Expand", &[&u, &reps], &format!("{hint}/expanded"));
        let shape = self.b.ints(&[0, s.heads, -1, s.head_dim]);
        self.op("Reshape", &[&e, &shape], &format!("{hint}/repeated"))
    }
}
