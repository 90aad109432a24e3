//! Normalisations over the trailing axes from `axis` on. Statistics are recomputed from the input
//! (inference exports do not expose the forward's mean and inverse standard deviation).

use crate::autodiff::RuleCtx;
use crate::Result;

/// (axes normalised over, rank) for a node with an `axis` attribute.
fn norm_axes(ctx: &RuleCtx) -> Result<Vec<i64>> {
    let rank = ctx.rank(ctx.i(0))? as i64;
    let mut axis = ctx.attr_i("axis", -1);
    if axis < 0 {
        axis += rank;
    }
    Ok((axis..rank).collect())
}

/// Shared tail of both norms: with gxhat = g * scale and xhat the normalised input,
/// dx = rstd * (gxhat - [mean(gxhat)] - xhat * mean(gxhat * xhat)).
fn input_grad(ctx: &mut RuleCtx, gxhat: &str, xhat: &str, rstd: &str, axes: &[i64], centered: bool) {
    let gx_xhat = ctx.op("Mul", &[gxhat, xhat], vec![]);
    let m2 = ctx.reduce("ReduceMean", &gx_xhat, axes, true);
    let proj = ctx.op("Mul", &[xhat, &m2], vec![]);
    let mut inner = ctx.op("Sub", &[gxhat, &proj], vec![]);
    if centered {
        let m1 = ctx.reduce("ReduceMean", gxhat, axes, true);
        inner = ctx.op("Sub", &[&inner, &m1], vec![]);
    }
    ctx.op_gi(0, "Mul", &[&inner, rstd], vec![]);
}

/// Scale and bias gradients: sums over the leading (non-normalised) axes.
fn affine_grads(ctx: &mut RuleCtx, g: &str, xhat: &str) -> Result<()> {
    let y = ctx.o(0);
    if ctx.needs(1) {
        let gs = ctx.op("Mul", &[g, xhat], vec![]);
        let r = ctx.reduce_to_input(&gs, y, 1)?;
        ctx.set_gi(1, r);
    }
    if ctx.num_inputs() > 2 && !ctx.i(2).is_empty() && ctx.needs(2) {
        let r = ctx.reduce_to_input(g, y, 2)?;
        ctx.set_gi(2, r);
    }
    Ok(())
}

pub fn layer_norm(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (x, scale) = (ctx.i(0), ctx.i(1));
    let axes = norm_axes(ctx)?;
    let eps = ctx.attr_f("epsilon", 1e-5) as f64;
    let mean = ctx.reduce("ReduceMean", x, &axes, true);
    let xc = ctx.op("Sub", &[x, &mean], vec![]);
    let sq = ctx.op("Mul", &[&xc, &xc], vec![]);
    let var = ctx.reduce("ReduceMean", &sq, &axes, true);
    let e = ctx.scalar(eps);
    let ve = ctx.op("Add", &[&var, &e], vec![]);
    let sd = ctx.op("Sqrt", &[&ve], vec![]);
    let rstd = ctx.op("Reciprocal", &[&sd], vec![]);
    let xhat = ctx.op("Mul", &[&xc, &rstd], vec![]);
    if ctx.needs(0) {
        let gxhat = ctx.op("Mul", &[&g, scale], vec![]);
        input_grad(ctx, &gxhat, &xhat, &rstd, &axes, true);
    }
    affine_grads(ctx, &g, &xhat)
}

/// RMSNormalization (opset 23): y = x / sqrt(mean(x^2) + eps) * scale.
pub fn rms_norm(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (x, scale) = (ctx.i(0), ctx.i(1));
    let axes = norm_axes(ctx)?;
    let eps = ctx.attr_f("epsilon", 1e-5) as f64;
    let sq = ctx.op("Mul", &[x, x], vec![]);
    let ms = ctx.reduce("ReduceMean", &sq, &axes, true);
    let e = ctx.scalar(eps);
    let mse = ctx.op("Add", &[&ms, &e], vec![]);
    let sd = ctx.op("Sqrt", &[&mse], vec![]);
    let rstd = ctx.op("Reciprocal", &[&sd], vec![]);
    let xhat = ctx.op("Mul", &[x, &rstd], vec![]);
    if ctx.needs(0) {
        let gxhat = ctx.op("Mul", &[&g, scale], vec![]);
        input_grad(ctx, &gxhat, &xhat, &rstd, &axes, false);
    }
    affine_grads(ctx, &g, &xhat)
}
