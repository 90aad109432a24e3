//! Elementwise ops. Binary ops broadcast, so each input's gradient is summed back to its shape
//! with `reduce_to_input`.

use crate::autodiff::RuleCtx;
use crate::onnx::attr_i;
use crate::Result;

/// Gradient `g` of the output, reduced to input `k`'s shape and recorded.
fn give(ctx: &mut RuleCtx, k: usize, g: &str) -> Result<()> {
    let out = ctx.o(0);
    let r = ctx.reduce_to_input(g, out, k)?;
    ctx.set_gi(k, r);
    Ok(())
}

pub fn add(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    for k in 0..2 {
        if ctx.needs(k) {
            give(ctx, k, &g)?;
        }
    }
    Ok(())
}

pub fn sub(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    if ctx.needs(0) {
        give(ctx, 0, &g)?;
    }
    if ctx.needs(1) {
        let ng = ctx.op("Neg", &[&g], vec![]);
        give(ctx, 1, &ng)?;
    }
    Ok(())
}

pub fn mul(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (a, b) = (ctx.i(0), ctx.i(1));
    if ctx.needs(0) {
        let ga = ctx.op("Mul", &[&g, b], vec![]);
        give(ctx, 0, &ga)?;
    }
    if ctx.needs(1) {
        let gb = ctx.op("Mul", &[&g, a], vec![]);
        give(ctx, 1, &gb)?;
    }
    Ok(())
}

pub fn div(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (b, y) = (ctx.i(1), ctx.o(0));
    let g_over_b = ctx.op("Div", &[&g, b], vec![]);
    if ctx.needs(0) {
        give(ctx, 0, &g_over_b)?;
    }
    if ctx.needs(1) {
        // d(a/b)/db = -y/b
        let t = ctx.op("Mul", &[&g_over_b, y], vec![]);
        let gb = ctx.op("Neg", &[&t], vec![]);
        give(ctx, 1, &gb)?;
    }
    Ok(())
}

pub fn pow(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (a, e, y) = (ctx.i(0), ctx.i(1), ctx.o(0));
    if ctx.needs(0) {
        let ga = match ctx.const_float(e) {
            Some(2.0) => {
                let two = ctx.scalar(2.0);
                let t = ctx.op("Mul", &[a, &two], vec![]);
                ctx.op("Mul", &[&g, &t], vec![])
            }
            _ => {
                // e * a^(e-1), computed as a power rather than y/a so that a = 0 stays finite.
                let one = ctx.scalar(1.0);
                let e_f = ctx.cast_like_output(e);
                let em1 = ctx.op("Sub", &[&e_f, &one], vec![]);
                let p = ctx.op("Pow", &[a, &em1], vec![]);
                let t = ctx.op("Mul", &[&p, &e_f], vec![]);
                ctx.op("Mul", &[&g, &t], vec![])
            }
        };
        give(ctx, 0, &ga)?;
    }
    if ctx.needs(1) {
        let ln = ctx.op("Log", &[a], vec![]);
        let t = ctx.op("Mul", &[y, &ln], vec![]);
        let gb = ctx.op("Mul", &[&g, &t], vec![]);
        give(ctx, 1, &gb)?;
    }
    Ok(())
}

/// Rules of the form `gx = g * f(x, y)` for a unary op.
fn unary(ctx: &mut RuleCtx, local: impl FnOnce(&mut RuleCtx, &str, &str) -> String) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let (x, y) = (ctx.i(0), ctx.o(0));
    let d = local(ctx, x, y);
    ctx.op_gi(0, "Mul", &[&g, &d], vec![]);
    Ok(())
}

pub fn sqrt(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, _, y| {
        let half = c.scalar(0.5);
        c.op("Div", &[&half, y], vec![])
    })
}

pub fn reciprocal(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, _, y| {
        let yy = c.op("Mul", &[y, y], vec![]);
        c.op("Neg", &[&yy], vec![])
    })
}

pub fn neg(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        ctx.op_gi(0, "Neg", &[&g], vec![]);
    }
    Ok(())
}

pub fn exp(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |_, _, y| y.to_string())
}

pub fn log(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        let x = ctx.i(0);
        ctx.op_gi(0, "Div", &[&g, x], vec![]);
    }
    Ok(())
}

pub fn tanh(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, _, y| {
        let one = c.scalar(1.0);
        let yy = c.op("Mul", &[y, y], vec![]);
        c.op("Sub", &[&one, &yy], vec![])
    })
}

pub fn sigmoid(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, _, y| {
        let one = c.scalar(1.0);
        let omy = c.op("Sub", &[&one, y], vec![]);
        c.op("Mul", &[y, &omy], vec![])
    })
}

pub fn erf(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, x, _| {
        let xx = c.op("Mul", &[x, x], vec![]);
        let nxx = c.op("Neg", &[&xx], vec![]);
        let e = c.op("Exp", &[&nxx], vec![]);
        let k = c.scalar(std::f64::consts::FRAC_2_SQRT_PI);
        c.op("Mul", &[&e, &k], vec![])
    })
}

pub fn relu(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        let zero = ctx.scalar(0.0);
        let pos = ctx.op("Greater", &[ctx.o(0), &zero], vec![]);
        ctx.op_gi(0, "Where", &[&pos, &g, &zero], vec![]);
    }
    Ok(())
}

pub fn leaky_relu(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        let alpha = ctx.attr_f("alpha", 0.01) as f64;
        let zero = ctx.scalar(0.0);
        let a = ctx.scalar(alpha);
        let pos = ctx.op("Greater", &[ctx.i(0), &zero], vec![]);
        let ga = ctx.op("Mul", &[&g, &a], vec![]);
        ctx.op_gi(0, "Where", &[&pos, &g, &ga], vec![]);
    }
    Ok(())
}

pub fn softplus(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, x, _| c.op("Sigmoid", &[x], vec![]))
}

pub fn abs(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, x, _| c.op("Sign", &[x], vec![]))
}

pub fn cos(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, x, _| {
        let s = c.op("Sin", &[x], vec![]);
        c.op("Neg", &[&s], vec![])
    })
}

pub fn sin(ctx: &mut RuleCtx) -> Result<()> {
    unary(ctx, |c, x, _| c.op("Cos", &[x], vec![]))
}

/// Max and Min (variadic, broadcasting): the gradient goes to the inputs equal to the result.
fn select_extreme(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let y = ctx.o(0);
    let zero = ctx.scalar(0.0);
    for k in 0..ctx.num_inputs() {
        if ctx.needs(k) {
            let hit = ctx.op("Equal", &[ctx.i(k), y], vec![]);
            let gk = ctx.op("Where", &[&hit, &g, &zero], vec![]);
            give(ctx, k, &gk)?;
        }
    }
    Ok(())
}

pub fn max(ctx: &mut RuleCtx) -> Result<()> {
    select_extreme(ctx)
}

pub fn min(ctx: &mut RuleCtx) -> Result<()> {
    select_extreme(ctx)
}

/// Clip passes the gradient where the input lies within [min, max] (bounds are not differentiated).
pub fn clip(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let x = ctx.i(0);
    let mut inside: Option<String> = None;
    for (k, cmp) in [(1, "GreaterOrEqual"), (2, "LessOrEqual")] {
        let bound = ctx.i(k);
        if bound.is_empty() {
            continue;
        }
        let c = ctx.op(cmp, &[x, bound], vec![]);
        inside = Some(match inside {
            None => c,
            Some(prev) => ctx.op("And", &[&prev, &c], vec![]),
        });
    }
    match inside {
        None => ctx.set_gi(0, g),
        Some(mask) => {
            let zero = ctx.scalar(0.0);
            ctx.op_gi(0, "Where", &[&mask, &g, &zero], vec![]);
        }
    }
    Ok(())
}

pub fn where_(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let cond = ctx.i(0);
    let zero = ctx.scalar(0.0);
    if ctx.needs(1) {
        let ga = ctx.op("Where", &[cond, &g, &zero], vec![]);
        give(ctx, 1, &ga)?;
    }
    if ctx.needs(2) {
        let gb = ctx.op("Where", &[cond, &zero, &g], vec![]);
        give(ctx, 2, &gb)?;
    }
    Ok(())
}

pub fn cast(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        let t = ctx.info(ctx.i(0))?.dtype;
        ctx.op_gi(0, "Cast", &[&g], vec![attr_i("to", t as i64)]);
    }
    Ok(())
}

pub fn identity(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        ctx.set_gi(0, g);
    }
    Ok(())
}

/// Gelu (opset 20): exact (`approximate="none"`) or tanh approximation.
pub fn gelu(ctx: &mut RuleCtx) -> Result<()> {
    let tanh_approx = ctx.node.attribute.iter().any(|a| a.name == "approximate" && &a.s[..] == b"tanh");
    unary(ctx, |c, x, _| {
        let half = c.scalar(0.5);
        let one = c.scalar(1.0);
        if tanh_approx {
            // y = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3)
            let k = c.scalar((2.0 / std::f64::consts::PI).sqrt());
            let a = c.scalar(0.044715);
            let a3 = c.scalar(3.0 * 0.044715);
            let xx = c.op("Mul", &[x, x], vec![]);
            let x3 = c.op("Mul", &[&xx, x], vec![]);
            let ax3 = c.op("Mul", &[&a, &x3], vec![]);
            let inner = c.op("Add", &[x, &ax3], vec![]);
            let u = c.op("Mul", &[&k, &inner], vec![]);
            let t = c.op("Tanh", &[&u], vec![]);
            let tt = c.op("Mul", &[&t, &t], vec![]);
            let sech2 = c.op("Sub", &[&one, &tt], vec![]);
            let axx = c.op("Mul", &[&a3, &xx], vec![]);
            let du_in = c.op("Add", &[&one, &axx], vec![]);
            let du = c.op("Mul", &[&k, &du_in], vec![]);
            let xs = c.op("Mul", &[x, &sech2], vec![]);
            let xsdu = c.op("Mul", &[&xs, &du], vec![]);
            let opt = c.op("Add", &[&one, &t], vec![]);
            let sum = c.op("Add", &[&opt, &xsdu], vec![]);
            c.op("Mul", &[&half, &sum], vec![])
        } else {
            // Phi(x) + x phi(x)
            let r2 = c.scalar(std::f64::consts::FRAC_1_SQRT_2);
            let xr = c.op("Mul", &[x, &r2], vec![]);
            let e = c.op("Erf", &[&xr], vec![]);
            let ope = c.op("Add", &[&one, &e], vec![]);
            let cdf = c.op("Mul", &[&half, &ope], vec![]);
            let xx = c.op("Mul", &[x, x], vec![]);
            let nh = c.scalar(-0.5);
            let ex = c.op("Mul", &[&xx, &nh], vec![]);
            let ee = c.op("Exp", &[&ex], vec![]);
            let k = c.scalar(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            let pdf = c.op("Mul", &[&ee, &k], vec![]);
            let xpdf = c.op("Mul", &[x, &pdf], vec![]);
            c.op("Add", &[&cdf, &xpdf], vec![])
        }
    })
}

/// Variadic Sum: every input receives the output gradient (reduced to its shape).
pub fn sum(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    for k in 0..ctx.num_inputs() {
        if ctx.needs(k) {
            give(ctx, k, &g)?;
        }
    }
    Ok(())
}

/// Variadic Mean: every input receives the output gradient divided by the input count.
pub fn mean(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let n = ctx.scalar(ctx.num_inputs() as f64);
    let gn = ctx.op("Div", &[&g, &n], vec![]);
    for k in 0..ctx.num_inputs() {
        if ctx.needs(k) {
            give(ctx, k, &gn)?;
        }
    }
    Ok(())
}
