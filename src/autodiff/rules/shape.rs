//! Ops that move values without changing them: the gradient moves back the same way.

use crate::autodiff::RuleCtx;
use crate::onnx::{attr_i, attr_ints, attr_t};
use crate::Result;

/// Reshape, Flatten, Squeeze, Unsqueeze: reshape the gradient back to the input's shape.
pub fn reshape(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        let shape = ctx.op("Shape", &[ctx.i(0)], vec![]);
        ctx.op_gi(0, "Reshape", &[&g, &shape], vec![]);
    }
    Ok(())
}

pub fn transpose(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let rank = ctx.rank(ctx.i(0))?;
    let perm = ctx.attr_ints("perm").unwrap_or_else(|| (0..rank as i64).rev().collect());
    let mut inverse = vec![-1i64; rank];
    for (i, &p) in perm.iter().enumerate() {
        if let Some(slot) = usize::try_from(p).ok().and_then(|p| inverse.get_mut(p)) {
            *slot = i as i64;
        }
    }
    // with as many entries as axes, every axis filled means every entry distinct
    if perm.len() != rank || inverse.contains(&-1) {
        return Err(ctx.err(format!("perm {perm:?} is not a permutation of the {rank} axes")));
    }
    ctx.op_gi(0, "Transpose", &[&g], vec![attr_ints("perm", &inverse)]);
    Ok(())
}

pub fn expand(ctx: &mut RuleCtx) -> Result<()> {
    if ctx.needs(0) {
        let g = ctx.go0()?;
        let r = ctx.reduce_to_input(&g, ctx.o(0), 0)?;
        ctx.set_gi(0, r);
    }
    Ok(())
}

fn norm_axis(axis: i64, rank: usize) -> i64 {
    if axis < 0 {
        axis + rank as i64
    } else {
        axis
    }
}

/// Size of `x` along `axis`, as a 1-element int64 tensor (constant when static).
fn dim_of(ctx: &mut RuleCtx, x: &str, axis: i64) -> Result<String> {
    let dims = ctx.info(x)?.static_dims();
    let Some(&dim) = usize::try_from(axis).ok().and_then(|a| dims.get(a)) else {
        return Err(ctx.err(format!("axis {axis} is out of range for {x} of rank {}", dims.len())));
    };
    if let Some(d) = dim {
        return Ok(ctx.ints(&[d]));
    }
    let shape = ctx.op("Shape", &[x], vec![]);
    let idx = ctx.ints(&[axis]);
    Ok(ctx.op("Gather", &[&shape, &idx], vec![attr_i("axis", 0)]))
}

/// Concat: split the gradient back into the pieces' sizes along the axis.
pub fn concat(ctx: &mut RuleCtx) -> Result<()> {
    let g = ctx.go0()?;
    let rank = ctx.rank(ctx.o(0))?;
    let axis = norm_axis(ctx.attr_i("axis", 0), rank);
    let n = ctx.num_inputs();
    let mut sizes = Vec::with_capacity(n);
    for k in 0..n {
        let x = ctx.i(k);
        sizes.push(dim_of(ctx, x, axis)?);
    }
    let refs: Vec<&str> = sizes.iter().map(String::as_str).collect();
    let split = ctx.op("Concat", &refs, vec![attr_i("axis", 0)]);
    let outs = ctx.b.op_n("Split", &[&g, &split], n, vec![attr_i("axis", axis)], &format!("{}_split", ctx.o(0)));
    for (k, o) in outs.into_iter().enumerate() {
        if ctx.needs(k) {
            ctx.set_gi(k, o);
        }
    }
    Ok(())
}

/// Split: concatenate the outputs' gradients, with zeros for outputs that receive none.
pub fn split(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let rank = ctx.rank(ctx.i(0))?;
    let axis = norm_axis(ctx.attr_i("axis", 0), rank);
    let mut parts = Vec::new();
    for k in 0..ctx.num_outputs() {
        let part = match ctx.go(k) {
            Some(g) => g,
            None => {
                let shape = ctx.op("Shape", &[ctx.o(k)], vec![]);
                let zero = crate::onnx::zero_value(ctx.float_type());
                ctx.op("ConstantOfShape", &[&shape], vec![attr_t("value", zero)])
            }
        };
        parts.push(part);
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    ctx.op_gi(0, "Concat", &refs, vec![attr_i("axis", axis)]);
    Ok(())
}

/// Slice: place the gradient at the sliced positions of a zero tensor. With constant unit-step
/// slices of static axes this is a `Pad`; otherwise the positions are found by slicing an index
/// grid with the very same Slice, which reproduces its clamping rules exactly, and scattered.
pub fn slice(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let x = ctx.i(0);
    if let Some(pads) = static_slice_pads(ctx)? {
        let p = ctx.ints(&pads);
        ctx.op_gi(0, "Pad", &[&g, &p], vec![]);
        return Ok(());
    }
    if let Some(pads) = run_time_slice_pads(ctx)? {
        ctx.op_gi(0, "Pad", &[&g, &pads], vec![]);
        return Ok(());
    }
    let shape = ctx.op("Shape", &[x], vec![]);
    let size = ctx.op("Size", &[x], vec![]);
    let zero = ctx.b.int(0);
    let one = ctx.b.int(1);
    let range = ctx.op("Range", &[&zero, &size, &one], vec![]);
    let grid = ctx.op("Reshape", &[&range, &shape], vec![]);
    let mut slice_inputs: Vec<&str> = vec![&grid];
    slice_inputs.extend(ctx.node.input[1..].iter().map(String::as_str));
    let picked = ctx.op("Slice", &slice_inputs, vec![]);
    let flat = ctx.ints(&[-1]);
    let idx = ctx.op("Reshape", &[&picked, &flat], vec![]);
    let gflat = ctx.op("Reshape", &[&g, &flat], vec![]);
    let t = ctx.float_type();
    let zero_t = crate::onnx::zero_value(t);
    let one_d = ctx.ints(&[1]);
    let size1 = ctx.op("Reshape", &[&size, &one_d], vec![]);
    let zeros = ctx.op("ConstantOfShape", &[&size1], vec![attr_t("value", zero_t)]);
    let scattered = ctx.op("ScatterElements", &[&zeros, &idx, &gflat], vec![attr_i("axis", 0)]);
    ctx.op_gi(0, "Reshape", &[&scattered, &shape], vec![]);
    Ok(())
}

/// Pads `[begin.., end..]` when every slice parameter is constant, steps are 1 and the sliced
/// axes have static sizes.
fn static_slice_pads(ctx: &RuleCtx) -> Result<Option<Vec<i64>>> {
    let x = ctx.i(0);
    let info = ctx.info(x)?;
    let rank = info.rank();
    let dims = info.static_dims();
    let (Some(starts), Some(ends)) = (ctx.const_ints(ctx.i(1)), ctx.const_ints(ctx.i(2))) else {
        return Ok(None);
    };
    let axes = if ctx.i(3).is_empty() { Some((0..starts.len() as i64).collect()) } else { ctx.const_ints(ctx.i(3)) };
    let steps = if ctx.i(4).is_empty() { Some(vec![1; starts.len()]) } else { ctx.const_ints(ctx.i(4)) };
    let (Some(axes), Some(steps)) = (axes, steps) else { return Ok(None) };
    if steps.iter().any(|&s| s != 1) {
        return Ok(None);
    }
    let mut pads = vec![0i64; 2 * rank];
    for (j, &a) in axes.iter().enumerate() {
        let a = norm_axis(a, rank) as usize;
        let Some(d) = dims[a] else { return Ok(None) };
        let clamp = |v: i64| if v < 0 { (v + d).max(0) } else { v.min(d) };
        let (s, e) = (clamp(starts[j]), clamp(ends[j]));
        pads[a] = s;
        pads[rank + a] = d - e.max(s);
    }
    Ok(Some(pads))
}

/// Pads computed at run time when the axes are constant and the steps 1 but the starts, ends or
/// sizes are run-time values (an attention's query chunks): each bound clamped as Slice clamps it,
/// `begin = clamp(start)`, `end = dim - max(clamp(end), begin)`. Cheaper than the index-grid scatter,
/// which builds int64 and float tensors the size of the whole input.
fn run_time_slice_pads(ctx: &mut RuleCtx) -> Result<Option<String>> {
    let x = ctx.i(0);
    let rank = ctx.rank(x)?;
    // how many bounds there are, to pair them with their axes
    let n = match ctx.const_ints(ctx.i(1)) {
        Some(s) => s.len(),
        None => match ctx.info(ctx.i(1))?.static_dims().as_slice() {
            [Some(n)] => *n as usize,
            _ => return Ok(None),
        },
    };
    let axes = if ctx.i(3).is_empty() { Some((0..n as i64).collect()) } else { ctx.const_ints(ctx.i(3)) };
    let steps_one = ctx.i(4).is_empty() || ctx.const_ints(ctx.i(4)).is_some_and(|s| s.iter().all(|&v| v == 1));
    let Some(axes) = axes.filter(|a| a.len() == n && steps_one) else { return Ok(None) };
    let zero = ctx.ints(&[0]);
    let mut begins = vec![zero.clone(); rank];
    let mut ends = vec![zero; rank];
    let shape = ctx.op("Shape", &[x], vec![]);
    let (starts_in, ends_in) = (ctx.i(1), ctx.i(2));
    for (j, &a) in axes.iter().enumerate() {
        let a = norm_axis(a, rank) as usize;
        let at = ctx.ints(&[a as i64]);
        let dim = ctx.op("Gather", &[&shape, &at], vec![attr_i("axis", 0)]);
        let jj = ctx.ints(&[j as i64]);
        let s = ctx.op("Gather", &[starts_in, &jj], vec![attr_i("axis", 0)]);
        let e = ctx.op("Gather", &[ends_in, &jj], vec![attr_i("axis", 0)]);
        let s = clamp_bound(ctx, &s, &dim);
        let e = clamp_bound(ctx, &e, &dim);
        let e = ctx.op("Max", &[&e, &s], vec![]);
        ends[a] = ctx.op("Sub", &[&dim, &e], vec![]);
        begins[a] = s;
    }
    let parts: Vec<&str> = begins.iter().chain(&ends).map(String::as_str).collect();
    Ok(Some(ctx.op("Concat", &parts, vec![attr_i("axis", 0)])))
}

/// A Slice bound as Slice reads it: negative counts from the end, then clamped to `[0, dim]`.
fn clamp_bound(ctx: &mut RuleCtx, v: &str, dim: &str) -> String {
    let zero = ctx.ints(&[0]);
    let negative = ctx.op("Less", &[v, &zero], vec![]);
    let from_end = ctx.op("Add", &[v, dim], vec![]);
    let v = ctx.op("Where", &[&negative, &from_end, v], vec![]);
    let v = ctx.op("Max", &[&v, &zero], vec![]);
    ctx.op("Min", &[&v, dim], vec![])
}

/// Tile with static shapes: view the gradient as [r0, d0, r1, d1, ..] and sum the repeat axes.
pub fn tile(ctx: &mut RuleCtx) -> Result<()> {
    if !ctx.needs(0) {
        return Ok(());
    }
    let g = ctx.go0()?;
    let x = ctx.i(0);
    let dims = ctx.info(x)?.static_dims();
    let repeats = ctx.const_ints(ctx.i(1)).ok_or_else(|| ctx.err("Tile with run-time repeats is not supported"))?;
    let mut view = Vec::new();
    for (d, r) in dims.iter().zip(&repeats) {
        let d = d.ok_or_else(|| ctx.err("Tile of a dynamic-shaped input is not supported"))?;
        view.push(*r);
        view.push(d);
    }
    let v = ctx.ints(&view);
    let gv = ctx.op("Reshape", &[&g, &v], vec![]);
    let axes: Vec<i64> = (0..repeats.len() as i64).map(|i| 2 * i).collect();
    let s = ctx.reduce("ReduceSum", &gv, &axes, false);
    ctx.set_gi(0, s);
    Ok(())
}
