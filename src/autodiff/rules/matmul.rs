//! Matrix products: MatMul (batched, broadcasting, 1-D operands), Gemm, Einsum.

use crate::autodiff::RuleCtx;
use crate::onnx::{attr_f, attr_i, attr_ints, attr_s};
use crate::Result;

/// Swaps the last two axes of a tensor of rank `rank`.
fn transpose_last2(ctx: &mut RuleCtx, x: &str, rank: usize) -> String {
    let mut perm: Vec<i64> = (0..rank as i64).collect();
    perm.swap(rank - 1, rank - 2);
    ctx.op("Transpose", &[x], vec![attr_ints("perm", &perm)])
}

pub fn matmul(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (a, b, y) = (ctx.i(0), ctx.i(1), ctx.o(0));
    let (ra, rb) = (ctx.rank(a)?, ctx.rank(b)?);
    if ra == 1 || rb == 1 {
        return matmul_vector(ctx, &g, ra, rb);
    }
    let ry = ctx.rank(y)?;
    if ra == 2 && rb == 2 {
        // Plain GEMMs; as Gemm (not MatMul of a Transpose) a later transpose of the result folds
        // into the product (see `autodiff::fold`).
        if ctx.needs(0) {
            ctx.op_gi(0, "Gemm", &[&g, b], vec![attr_i("transB", 1)]);
        }
        if ctx.needs(1) {
            ctx.op_gi(1, "Gemm", &[a, &g], vec![attr_i("transA", 1)]);
        }
        return Ok(());
    }
    if ctx.needs(0) {
        let bt = transpose_last2(ctx, b, rb);
        let ga = ctx.op("MatMul", &[&g, &bt], vec![]);
        let ga = ctx.reduce_leading_to_input(&ga, y, 0, 2)?;
        ctx.set_gi(0, ga);
    }
    if ctx.needs(1) {
        let k_dim = ctx.info(a)?.static_dims()[ra - 1];
        let n_dim = ctx.info(y)?.static_dims()[ry - 1];
        match (rb, k_dim, n_dim) {
            // A weight shared across the batch: fold the batch axes into one GEMM, which never
            // materialises a per-example [.., K, N] product.
            (2, Some(k), Some(n)) if ra > 2 => {
                let ka = ctx.ints(&[-1, k]);
                let a2 = ctx.op("Reshape", &[a, &ka], vec![]);
                let na = ctx.ints(&[-1, n]);
                let g2 = ctx.op("Reshape", &[&g, &na], vec![]);
                ctx.op_gi(1, "Gemm", &[&a2, &g2], vec![attr_i("transA", 1)]);
            }
            _ => {
                let at = transpose_last2(ctx, a, ra);
                let gb = ctx.op("MatMul", &[&at, &g], vec![]);
                let gb = ctx.reduce_leading_to_input(&gb, y, 1, 2)?;
                ctx.set_gi(1, gb);
            }
        }
    }
    Ok(())
}

/// MatMul with a 1-D operand, which numpy semantics promote and then squeeze away.
fn matmul_vector(ctx: &mut RuleCtx, g: &str, ra: usize, rb: usize) -> Result<()> {
    let (a, b) = (ctx.i(0), ctx.i(1));
    let last = ctx.ints(&[-1]);
    if rb == 1 && ra >= 2 {
        // y[..] = sum_k a[.., k] b[k]
        let gu = ctx.op("Unsqueeze", &[g, &last], vec![]);
        if ctx.needs(0) {
            ctx.op_gi(0, "Mul", &[&gu, b], vec![]);
        }
        if ctx.needs(1) {
            let prod = ctx.op("Mul", &[a, &gu], vec![]);
            let axes = ctx.ints(&(0..ra as i64 - 1).collect::<Vec<_>>());
            ctx.op_gi(1, "ReduceSum", &[&prod, &axes], vec![attr_i("keepdims", 0)]);
        }
    } else if ra == 1 && rb >= 2 {
        // y[.., n] = sum_k a[k] b[.., k, n]
        let m2 = ctx.ints(&[-2]);
        let gu = ctx.op("Unsqueeze", &[g, &m2], vec![]);
        if ctx.needs(0) {
            let prod = ctx.op("Mul", &[b, &gu], vec![]);
            let axes: Vec<i64> = (0..rb as i64 - 2).chain([rb as i64 - 1]).collect();
            let axes = ctx.ints(&axes);
            ctx.op_gi(0, "ReduceSum", &[&prod, &axes], vec![attr_i("keepdims", 0)]);
        }
        if ctx.needs(1) {
            let au = ctx.op("Unsqueeze", &[a, &last], vec![]);
            ctx.op_gi(1, "Mul", &[&au, &gu], vec![]);
        }
    } else {
        // dot product of two vectors: y is a scalar
        if ctx.needs(0) {
            ctx.op_gi(0, "Mul", &[g, b], vec![]);
        }
        if ctx.needs(1) {
            ctx.op_gi(1, "Mul", &[g, a], vec![]);
        }
    }
    Ok(())
}

pub fn gemm(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let (a, b) = (ctx.i(0), ctx.i(1));
    let alpha = ctx.attr_f("alpha", 1.0);
    let beta = ctx.attr_f("beta", 1.0);
    let (ta, tb) = (ctx.attr_i("transA", 0), ctx.attr_i("transB", 0));
    let scaled = |extra: Vec<_>| {
        let mut v = vec![attr_f("alpha", alpha)];
        v.extend(extra);
        v
    };
    if ctx.needs(0) {
        // dA = alpha g op(B)^T, or its transpose when A was transposed
        let attrs = if ta == 0 { scaled(vec![attr_i("transB", 1 - tb)]) } else { scaled(vec![attr_i("transA", tb), attr_i("transB", 1)]) };
        let inputs: [&str; 2] = if ta == 0 { [&g, b] } else { [b, &g] };
        ctx.op_gi(0, "Gemm", &inputs, attrs);
    }
    if ctx.needs(1) {
        let attrs = if tb == 0 { scaled(vec![attr_i("transA", 1 - ta)]) } else { scaled(vec![attr_i("transA", 1), attr_i("transB", ta)]) };
        let inputs: [&str; 2] = if tb == 0 { [a, &g] } else { [&g, a] };
        ctx.op_gi(1, "Gemm", &inputs, attrs);
    }
    if ctx.num_inputs() > 2 && ctx.needs(2) {
        let gc = if beta == 1.0 {
            g.clone()
        } else {
            let s = ctx.scalar(beta as f64);
            ctx.op("Mul", &[&g, &s], vec![])
        };
        let gc = ctx.reduce_to_input(&gc, ctx.o(0), 2)?;
        ctx.set_gi(2, gc);
    }
    Ok(())
}

/// Einsum: the gradient of operand k is the einsum of the output gradient with the other operands,
/// written to operand k's subscripts. Subscripts that appear only in operand k (summed away) are
/// restored by broadcasting against operand k itself.
pub fn einsum(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let eq = ctx.node.attribute.iter().find(|a| a.name == "equation").map(|a| String::from_utf8_lossy(&a.s).replace(' ', ""));
    let eq = eq.ok_or_else(|| ctx.err("Einsum without an equation"))?;
    let (lhs, out) = eq.split_once("->").ok_or_else(|| ctx.err("Einsum equation needs an explicit output (->)"))?;
    if eq.contains("...") {
        return Err(ctx.err("Einsum with ellipsis is not supported yet"));
    }
    let terms: Vec<&str> = lhs.split(',').collect();
    for k in 0..terms.len() {
        if !ctx.needs(k) {
            continue;
        }
        let mine = terms[k];
        let mut uniq: Vec<char> = mine.chars().collect();
        uniq.dedup();
        if uniq.len() != mine.len() || mine.chars().collect::<std::collections::HashSet<_>>().len() != mine.len() {
            return Err(ctx.err("Einsum with a repeated subscript (a diagonal) is not supported"));
        }
        let mut subs = vec![out.to_string()];
        let mut inputs = vec![g.clone()];
        for (j, t) in terms.iter().enumerate() {
            if j != k {
                subs.push(t.to_string());
                inputs.push(ctx.i(j).to_string());
            }
        }
        let available: String = subs.concat();
        let orphan = mine.chars().any(|c| !available.contains(c));
        if orphan {
            // Multiply by ones shaped like operand k so every subscript of k is bound.
            let ones = ctx.op("Shape", &[ctx.i(k)], vec![]);
            let one = ctx.scalar(1.0);
            let ones = ctx.op("Expand", &[&one, &ones], vec![]);
            subs.push(mine.to_string());
            inputs.push(ones);
        }
        let equation = format!("{}->{}", subs.join(","), mine);
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        ctx.op_gi(k, "Einsum", &refs, vec![attr_s("equation", &equation)]);
    }
    Ok(())
}
