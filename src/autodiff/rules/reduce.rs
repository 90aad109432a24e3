//! Reductions. The gradient is the output gradient broadcast back over the reduced axes
//! (divided by the count for a mean; routed to the extreme elements for max/min; weighted by the
//! softmax for log-sum-exp).

use crate::autodiff::RuleCtx;
use crate::Result;

/// The output gradient with the reduced axes restored (as size-1 axes when keepdims was 0),
/// and expanded to the input's shape when `expand` is set.
fn restore_axes(ctx: &mut RuleCtx, g: &str, expand: bool) -> Result<String> {
    let x = ctx.i(0);
    let keepdims = ctx.attr_i("keepdims", 1) != 0;
    let rank = ctx.rank(x)?;
    let axes_input = ctx.i(1);
    let mut restored = g.to_string();
    if !keepdims && ctx.rank(ctx.o(0))? != rank {
        restored = if !axes_input.is_empty() {
            ctx.op("Unsqueeze", &[g, axes_input], vec![])
        } else if let Some(axes) = ctx.attr_ints("axes") {
            let a = ctx.ints(&axes);
            ctx.op("Unsqueeze", &[g, &a], vec![])
        } else {
            // every axis was reduced: g is a scalar and broadcasts as it is
            g.to_string()
        };
    }
    if expand {
        let shape = ctx.op("Shape", &[x], vec![]);
        restored = ctx.op("Expand", &[&restored, &shape], vec![]);
    }
    Ok(restored)
}

/// `noop_with_empty_axes` with no axes makes the reduction an identity.
fn is_noop(ctx: &RuleCtx) -> bool {
    ctx.attr_i("noop_with_empty_axes", 0) != 0 && ctx.i(1).is_empty() && ctx.attr_ints("axes").is_none()
}

/// The output gradient when the rule has work to do: `None` when the input needs no gradient, or
/// when the reduction is a no-op and the gradient has been passed through.
fn reducing_gradient(ctx: &mut RuleCtx) -> Result<Option<String>> {
    if !ctx.needs(0) {
        return Ok(None);
    }
    let g = ctx.go0()?;
    if is_noop(ctx) {
        ctx.set_gi(0, g);
        return Ok(None);
    }
    Ok(Some(g))
}

pub fn reduce_sum(ctx: &mut RuleCtx) -> Result<()> {
    let Some(g) = reducing_gradient(ctx)? else { return Ok(()) };
    let r = restore_axes(ctx, &g, true)?;
    ctx.set_gi(0, r);
    Ok(())
}

pub fn reduce_mean(ctx: &mut RuleCtx) -> Result<()> {
    let Some(g) = reducing_gradient(ctx)? else { return Ok(()) };
    let nx = ctx.numel(ctx.i(0))?;
    let ny = ctx.numel(ctx.o(0))?;
    let count = ctx.op("Div", &[&nx, &ny], vec![]);
    let scaled = ctx.op("Div", &[&g, &count], vec![]);
    let r = restore_axes(ctx, &scaled, true)?;
    ctx.set_gi(0, r);
    Ok(())
}

/// ReduceMax and ReduceMin: the gradient goes to the elements equal to the extreme value.
pub fn reduce_extreme(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let y = ctx.o(0);
    let yk = restore_axes(ctx, y, false)?;
    let gk = restore_axes(ctx, &g, false)?;
    let hit = ctx.op("Equal", &[ctx.i(0), &yk], vec![]);
    let zero = ctx.scalar(0.0);
    ctx.op_gi(0, "Where", &[&hit, &gk, &zero], vec![]);
    Ok(())
}

/// y = log(sum(exp(x))): dx = g * exp(x - y), the softmax over the reduced axes.
pub fn reduce_log_sum_exp(ctx: &mut RuleCtx) -> Result<()> {
    let Some(g) = reducing_gradient(ctx)? else { return Ok(()) };
    let y = ctx.o(0);
    let yk = restore_axes(ctx, y, false)?;
    let gk = restore_axes(ctx, &g, false)?;
    let shifted = ctx.op("Sub", &[ctx.i(0), &yk], vec![]);
    let softmax = ctx.op("Exp", &[&shifted], vec![]);
    ctx.op_gi(0, "Mul", &[&softmax, &gk], vec![]);
    Ok(())
}
