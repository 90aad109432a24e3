//! AdamW as one fused pass over host memory, for the CPU execution provider. The optimizer graph in
//! the artifacts computes the same update in ONNX ops (and is what runs on GPUs and from other
//! bindings), but ONNX Runtime executes its ~10 elementwise ops as ~10 passes over every parameter;
//! this kernel reads each of p, g, m, v once and writes p, m, v once, in place.
//!
//! Work is split into fixed-size chunks, so results do not depend on the number of threads.

use ort::value::Tensor;

use super::optimizer_step::{Hyper, State};
use crate::{Error, Result};

const CHUNK: usize = 1 << 16;

/// Per-parameter settings that the optimizer graph bakes in.
#[derive(Clone, Copy, Debug)]
pub struct ParamKind {
    pub beta_head: bool,
    pub weight_decay: bool,
}

fn threads(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
}

/// Sum of squares of all gradients (times `scale`²), in float64, chunk order fixed.
fn squared_norm(grads: &[&[f32]], scale: f32, n_threads: usize) -> f64 {
    let chunks: Vec<&[f32]> = grads.iter().flat_map(|g| g.chunks(CHUNK)).collect();
    let mut partial = vec![0.0f64; chunks.len()];
    let per = chunks.len().div_ceil(n_threads).max(1);
    std::thread::scope(|s| {
        for (cs, out) in chunks.chunks(per).zip(partial.chunks_mut(per)) {
            s.spawn(move || {
                for (c, o) in cs.iter().zip(out.iter_mut()) {
                    *o = c
                        .iter()
                        .map(|&x| {
                            let y = (x * scale) as f64;
                            y * y
                        })
                        .sum();
                }
            });
        }
    });
    partial.iter().sum()
}

/// Applies one AdamW step in place. Returns the global gradient norm (before clipping), or `None`
/// without touching the state when it is not finite.
pub fn step(state: &mut State, grads: &[Tensor<f32>], kinds: &[ParamKind], h: &Hyper, n_threads: Option<usize>) -> Result<Option<f32>> {
    let n_threads = threads(n_threads);
    let g_slices: Vec<&[f32]> = grads.iter().map(|g| g.try_extract_tensor::<f32>().map(|(_, d)| d)).collect::<std::result::Result<_, _>>()?;
    let norm = squared_norm(&g_slices, h.gradient_scale, n_threads).sqrt() as f32;
    if !norm.is_finite() {
        return Ok(None);
    }
    let coef = if h.max_grad_norm > 0.0 { (h.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
    let g_mul = h.gradient_scale * coef;
    let bc1 = 1.0 - h.adam_beta1.powf(h.step);
    let bc2 = 1.0 - h.adam_beta2.powf(h.step);
    let (b1, b2, eps) = (h.adam_beta1, h.adam_beta2, h.adam_epsilon);
    // (p, m, v, g, lr, wd) chunks, all parameters together, so threads share the work evenly.
    let mut jobs: Vec<(&mut [f32], &mut [f32], &mut [f32], &[f32], f32, f32)> = Vec::new();
    let State { params, m, v } = state;
    for (k, ((p, (mk, vk)), g)) in params.values.iter_mut().zip(m.iter_mut().zip(v.iter_mut())).zip(&g_slices).enumerate() {
        let lr = if kinds[k].beta_head { h.head_learning_rate } else { h.learning_rate };
        let wd = if kinds[k].weight_decay { h.weight_decay } else { 0.0 };
        let (_, p) = p.try_extract_tensor_mut::<f32>()?;
        let (_, mk) = mk.try_extract_tensor_mut::<f32>()?;
        let (_, vk) = vk.try_extract_tensor_mut::<f32>()?;
        if p.len() != g.len() || mk.len() != g.len() || vk.len() != g.len() {
            return Err(Error::Other(format!("optimizer state of parameter {} does not match its gradient", params.names[k])));
        }
        for (((pc, mc), vc), gc) in p.chunks_mut(CHUNK).zip(mk.chunks_mut(CHUNK)).zip(vk.chunks_mut(CHUNK)).zip(g.chunks(CHUNK)) {
            jobs.push((pc, mc, vc, gc, lr, wd));
        }
    }
    let per = jobs.len().div_ceil(n_threads).max(1);
    std::thread::scope(|s| {
        for batch in jobs.chunks_mut(per) {
            s.spawn(move || {
                for (p, m, v, g, lr, wd) in batch.iter_mut() {
                    let (lr, wd) = (*lr, *wd);
                    for i in 0..p.len() {
                        let gi = g[i] * g_mul;
                        let mi = m[i] * b1 + gi * (1.0 - b1);
                        let vi = v[i] * b2 + gi * gi * (1.0 - b2);
                        m[i] = mi;
                        v[i] = vi;
                        let direction = (mi / bc1) / ((vi / bc2).sqrt() + eps) + wd * p[i];
                        p[i] -= direction * lr;
                    }
                }
            });
        }
    });
    Ok(Some(norm))
}
