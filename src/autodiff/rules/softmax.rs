//! Softmax and LogSoftmax over one axis (opset 13 semantics).

use crate::autodiff::RuleCtx;
use crate::Result;

fn axis(ctx: &RuleCtx) -> i64 {
    ctx.attr_i("axis", -1)
}

/// dx = y * (g - sum(g * y))
pub fn softmax(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let y = ctx.o(0);
    let gy = ctx.op("Mul", &[&g, y], vec![]);
    let a = axis(ctx);
    let s = ctx.reduce("ReduceSum", &gy, &[a], true);
    let d = ctx.op("Sub", &[&g, &s], vec![]);
    ctx.op_gi(0, "Mul", &[y, &d], vec![]);
    Ok(())
}

/// dx = g - exp(y) * sum(g)
pub fn log_softmax(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let y = ctx.o(0);
    let a = axis(ctx);
    let s = ctx.reduce("ReduceSum", &g, &[a], true);
    let p = ctx.op("Exp", &[y], vec![]);
    let ps = ctx.op("Mul", &[&p, &s], vec![]);
    ctx.op_gi(0, "Sub", &[&g, &ps], vec![]);
    Ok(())
}
