//! AdamW as one fused pass over host memory, for the CPU execution provider. The optimizer graph in
//! the artifacts computes the same update in ONNX ops (and is what runs on GPUs and from other
//! bindings), but ONNX Runtime executes its ~10 elementwise ops as ~10 passes over every parameter;
//! this kernel reads each of p, g, m, v once and writes p, m, v once, in place.
//!
//! Work is split into fixed-size chunks, so results do not depend on the number of threads.

use ort::value::Tensor;

use super::denormals::FlushGuard;
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
fn squared_norm(grads: &[&[f32]], scale: f32, n_threads: usize, flush_denormals: bool) -> f64 {
    let chunks: Vec<&[f32]> = grads.iter().flat_map(|g| g.chunks(CHUNK)).collect();
    let mut partial = vec![0.0f64; chunks.len()];
    let per = chunks.len().div_ceil(n_threads).max(1);
    std::thread::scope(|s| {
        for (cs, out) in chunks.chunks(per).zip(partial.chunks_mut(per)) {
            s.spawn(move || {
                let _ftz = flush_denormals.then(FlushGuard::new);
                for (c, o) in cs.iter().zip(out.iter_mut()) {
                    *o = simd::dispatch_sum_squares(c, scale);
                }
            });
        }
    });
    partial.iter().sum()
}

/// One AdamW update of a chunk, written so that the compiler vectorises it (no indexing, no
/// fused multiply-add, so every width gives the same bits as the optimizer graph's ops).
#[inline(always)]
fn update_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &Coefficients) {
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let gi = g * c.g_mul;
        let mi = *m * c.b1 + gi * (1.0 - c.b1);
        let vi = *v * c.b2 + gi * gi * (1.0 - c.b2);
        *m = mi;
        *v = vi;
        let direction = (mi / c.bc1) / ((vi / c.bc2).sqrt() + c.eps) + c.wd * *p;
        *p -= direction * c.lr;
    }
}

/// Sum of squares in eight float64 lanes (vectorisable; the lane order is fixed).
#[inline(always)]
fn sum_squares(c: &[f32], scale: f32) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut blocks = c.chunks_exact(8);
    for b in &mut blocks {
        for (l, &x) in lanes.iter_mut().zip(b) {
            let y = (x * scale) as f64;
            *l += y * y;
        }
    }
    let tail: f64 = blocks.remainder().iter().map(|&x| ((x * scale) as f64).powi(2)).sum();
    lanes.iter().sum::<f64>() + tail
}

#[derive(Clone, Copy)]
struct Coefficients {
    g_mul: f32,
    b1: f32,
    b2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    lr: f32,
    wd: f32,
}

/// The same loops compiled for wider vector units, picked at run time.
mod simd {
    use super::{sum_squares, update_chunk, Coefficients};

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn update_avx512(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &Coefficients) {
        update_chunk(p, m, v, g, c)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn update_avx2(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &Coefficients) {
        update_chunk(p, m, v, g, c)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_squares_avx512(c: &[f32], scale: f32) -> f64 {
        sum_squares(c, scale)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn sum_squares_avx2(c: &[f32], scale: f32) -> f64 {
        sum_squares(c, scale)
    }

    pub(super) fn dispatch_update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &Coefficients) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each variant runs only where the CPU reports its instruction set.
            if std::arch::is_x86_feature_detected!("avx512f") {
                return unsafe { update_avx512(p, m, v, g, c) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return unsafe { update_avx2(p, m, v, g, c) };
            }
        }
        update_chunk(p, m, v, g, c)
    }

    pub(super) fn dispatch_sum_squares(c: &[f32], scale: f32) -> f64 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as above.
            if std::arch::is_x86_feature_detected!("avx512f") {
                return unsafe { sum_squares_avx512(c, scale) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return unsafe { sum_squares_avx2(c, scale) };
            }
        }
        sum_squares(c, scale)
    }
}

/// Applies one AdamW step in place. Returns the global gradient norm (before clipping), or `None`
/// without touching the state when it is not finite.
pub fn step(state: &mut State, grads: &[Tensor<f32>], kinds: &[ParamKind], h: &Hyper, n_threads: Option<usize>, flush_denormals: bool) -> Result<Option<f32>> {
    let n_threads = threads(n_threads);
    let g_slices: Vec<&[f32]> = grads.iter().map(|g| g.try_extract_tensor::<f32>().map(|(_, d)| d)).collect::<std::result::Result<_, _>>()?;
    let norm = squared_norm(&g_slices, h.gradient_scale, n_threads, flush_denormals).sqrt() as f32;
    if !norm.is_finite() {
        return Ok(None);
    }
    let coef = if h.max_grad_norm > 0.0 { (h.max_grad_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
    let g_mul = h.gradient_scale * coef;
    let bc1 = 1.0 - h.adam_beta1.powf(h.step);
    let bc2 = 1.0 - h.adam_beta2.powf(h.step);
    let (b1, b2, eps) = (h.adam_beta1, h.adam_beta2, h.adam_epsilon);
    // Chunks of all parameters together, so threads share the work evenly.
    struct Job<'a> {
        p: &'a mut [f32],
        m: &'a mut [f32],
        v: &'a mut [f32],
        g: &'a [f32],
        lr: f32,
        wd: f32,
    }
    let mut jobs: Vec<Job> = Vec::new();
    let State { params, m, v } = state;
    for (k, ((p, (mk, vk)), g)) in params.values.iter_mut().zip(m.iter_mut().zip(v.iter_mut())).zip(&g_slices).enumerate() {
        let lr = if kinds[k].beta_head { h.head_learning_rate } else { h.learning_rate };
        let wd = if kinds[k].weight_decay { h.weight_decay } else { 0.0 };
        let (_, p) = p.try_extract_tensor_mut::<f32>()?;
        let (_, mk) = mk.try_extract_tensor_mut::<f32>()?;
        let (_, vk) = vk.try_extract_tensor_mut::<f32>()?;
        if p.len() != g.len() || mk.len() != g.len() || vk.len() != g.len() {
            return Err(Error::ParameterMismatch(format!("optimizer state of parameter {} does not match its gradient", params.names[k])));
        }
        for (((pc, mc), vc), gc) in p.chunks_mut(CHUNK).zip(mk.chunks_mut(CHUNK)).zip(vk.chunks_mut(CHUNK)).zip(g.chunks(CHUNK)) {
            jobs.push(Job { p: pc, m: mc, v: vc, g: gc, lr, wd });
        }
    }
    let per = jobs.len().div_ceil(n_threads).max(1);
    std::thread::scope(|s| {
        for batch in jobs.chunks_mut(per) {
            s.spawn(move || {
                let _ftz = flush_denormals.then(FlushGuard::new);
                for j in batch.iter_mut() {
                    let c = Coefficients { g_mul, b1, b2, bc1, bc2, eps, lr: j.lr, wd: j.wd };
                    simd::dispatch_update(j.p, j.m, j.v, j.g, &c);
                }
            });
        }
    });
    Ok(Some(norm))
}
