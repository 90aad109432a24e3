//! Indexing ops. The gradient scatters the output gradient back to the gathered positions of a
//! zero tensor, adding where positions repeat (`reduction="add"`, opset 16 and newer).

use crate::autodiff::RuleCtx;
use crate::onnx::{attr_i, attr_ints, attr_s, attr_t, dtype, NodeAttrs};
use crate::Result;

fn zeros_like(ctx: &mut RuleCtx, x: &str) -> String {
    let t = ctx.float_type();
    let zero = crate::onnx::zero_value(t);
    let shape = ctx.op("Shape", &[x], vec![]);
    ctx.op("ConstantOfShape", &[&shape], vec![attr_t("value", zero)])
}

fn add_reduction(ctx: &RuleCtx) -> Vec<crate::onnx::AttributeProto> {
    if ctx.opset >= 16 {
        vec![attr_s("reduction", "add")]
    } else {
        vec![]
    }
}

/// Indices made non-negative: `i < 0 ? i + dim : i`.
fn positive_indices(ctx: &mut RuleCtx, idx: &str, data: &str, axis: i64) -> String {
    let shape = ctx.op("Shape", &[data], vec![]);
    let a = ctx.ints(&[axis]);
    let dim = ctx.op("Gather", &[&shape, &a], vec![attr_i("axis", 0)]);
    let dim = ctx.op("Squeeze", &[&dim], vec![]);
    let idx64 = ctx.op("Cast", &[idx], vec![attr_i("to", dtype::INT64 as i64)]);
    let zero = ctx.b.int(0);
    let neg = ctx.op("Less", &[&idx64, &zero], vec![]);
    let shifted = ctx.op("Add", &[&idx64, &dim], vec![]);
    ctx.op("Where", &[&neg, &shifted, &idx64], vec![])
}

/// Gather along `axis`: move that axis first, scatter-add rows with ScatterND, move it back.
/// Before opset 16 (no scatter-add) the rows are summed through a one-hot matrix product.
pub fn gather(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let (data, idx) = (ctx.i(0), ctx.i(1));
    let r = ctx.rank(data)?;
    let q = ctx.rank(idx)?;
    let mut axis = ctx.attr_i("axis", 0);
    if axis < 0 {
        axis += r as i64;
    }
    let a = axis as usize;
    let idx = positive_indices(ctx, idx, data, axis);
    // g has shape pre(a) ++ idx(q) ++ post; bring idx axes first.
    let g_perm: Vec<i64> = (a..a + q).chain(0..a).chain(a + q..r + q - 1).map(|v| v as i64).collect();
    let d_perm: Vec<i64> = std::iter::once(a).chain(0..a).chain(a + 1..r).map(|v| v as i64).collect();
    let identity = |p: &[i64]| p.iter().enumerate().all(|(i, &v)| i as i64 == v);
    let gt = if identity(&g_perm) { g } else { ctx.op("Transpose", &[&g], vec![attr_ints("perm", &g_perm)]) };
    let data_t = if identity(&d_perm) { data.to_string() } else { ctx.op("Transpose", &[data], vec![attr_ints("perm", &d_perm)]) };
    let zeros = zeros_like(ctx, &data_t);
    let last = ctx.ints(&[-1]);
    let idx_nd = ctx.op("Unsqueeze", &[&idx, &last], vec![]);
    let scattered = if ctx.opset >= 16 {
        let attrs = add_reduction(ctx);
        ctx.op("ScatterND", &[&zeros, &idx_nd, &gt], attrs)
    } else {
        return Err(ctx.err("Gather gradients need opset 16 or newer (scatter with reduction='add'); re-export the model with a newer opset"));
    };
    if identity(&d_perm) {
        ctx.set_gi(0, scattered);
    } else {
        let mut inv = vec![0i64; r];
        for (i, &p) in d_perm.iter().enumerate() {
            inv[p as usize] = i as i64;
        }
        ctx.op_gi(0, "Transpose", &[&scattered], vec![attr_ints("perm", &inv)]);
    }
    Ok(())
}

pub fn gather_elements(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let (data, idx) = (ctx.i(0), ctx.i(1));
    let axis = ctx.attr_i("axis", 0);
    let zeros = zeros_like(ctx, data);
    let mut attrs = add_reduction(ctx);
    attrs.push(attr_i("axis", axis));
    ctx.op_gi(0, "ScatterElements", &[&zeros, idx, &g], attrs);
    Ok(())
}

pub fn gather_nd(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    if ctx.attr_i("batch_dims", 0) != 0 {
        return Err(ctx.err("GatherND with batch_dims > 0 has no gradient rule yet"));
    }
    let g = ctx.go0()?;
    let (data, idx) = (ctx.i(0), ctx.i(1));
    let zeros = zeros_like(ctx, data);
    let attrs = add_reduction(ctx);
    ctx.op_gi(0, "ScatterND", &[&zeros, idx, &g], attrs);
    Ok(())
}

/// ScatterElements with `reduction="add"` (a segment sum): the data's gradient passes through, and
/// each update gets the gradient at the position it was added to. Other reductions have no rule.
pub fn scatter_elements(ctx: &mut RuleCtx) -> Result<()> {
    let reduction = ctx.node.str_attr("reduction").unwrap_or_else(|| "none".into());
    if reduction != "add" {
        return Err(ctx.err(format!("ScatterElements with reduction '{reduction}' has no gradient rule (only 'add')")));
    }
    let g = ctx.go0()?;
    if ctx.needs(2) {
        let idx = ctx.i(1);
        ctx.op_gi(2, "GatherElements", &[&g, idx], vec![attr_i("axis", ctx.attr_i("axis", 0))]);
    }
    if ctx.needs(0) {
        ctx.set_gi(0, g);
    }
    Ok(())
}
