//! Mixed precision: matrix products computed in half precision, everything else in float32.
//!
//! `build-graph --precision bf16|fp16` runs [`products_in_half`] on the forward graph, after the shape
//! probe and before differentiation. Each chosen `MatMul`/`Gemm` reads its operands through a cast to
//! half and its result is cast straight back to float32:
//!
//! ```text
//! Y = MatMul(A, W)
//!   becomes
//! Y = Cast<float32>(MatMul(Cast<half>(A), Cast<half>(W)))
//! ```
//!
//! Parameters stay float32 inputs (the master weights) and are cast where they are read, so their
//! gradients and AdamW moments stay float32. Whatever reads a product's result — softmax, the norms'
//! `ReduceMean`, residual sums, log-softmax, the loss — reads float32. The objective's own products (the
//! answer positions' lm_head, the beta head) are left alone by the caller's `keep`.
//!
//! Running before differentiation makes the backward pass half precision too without a rule of its own:
//! the gradient of `Cast<half>(x)` is `Cast<float32>` of the incoming one (`autodiff::rules` `cast`), so
//! the input and weight gradients of a half product are half products, cast back to float32 before they
//! are summed into a weight's gradient.
//!
//! ONNX Runtime's CPU provider (1.32) cannot check either format: it has no bfloat16 MatMul/Gemm, and it
//! runs float16 ones in float32, removing the casts to float16 around them (measured: a 64x64 product of
//! float16-cast operands agrees with float64 to 1.4e-7 and misses the product of the rounded operands by
//! 2.9e-4). The `emulated` variant lets the CPU check the same transform: every cast to half becomes a rounding,
//! `Cast<float32>(Cast<half>(x))`, and the product runs in float32 on operands that hold half values, which
//! is what a tensor core computes (half inputs, float32 accumulation), with the result rounded to half as
//! the real graph stores it. The backward pass rounds the same tensors the real one holds in half.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Builder, Graph, TensorInfo, TensorInfos};
use crate::onnx::{attr_i, dtype, DType, NodeProto};
use crate::{Error, Result};

/// The products this phase moves to half precision.
const PRODUCTS: &[&str] = &["MatMul", "Gemm"];

/// What the matrix products compute in (`--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32: the graphs betadpo has always built.
    #[default]
    Fp32,
    /// Products in bfloat16 (8 bits of mantissa, float32's range).
    Bf16,
    /// Products in float16 (11 bits of mantissa, range to 65504): needs loss scaling.
    Fp16,
}

impl Precision {
    pub const NAMES: &'static str = "bf16, fp16 or fp32";

    /// The half dtype of the products; `None` for float32.
    pub fn half(self) -> Option<DType> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(dtype::BFLOAT16),
            Precision::Fp16 => Some(dtype::FLOAT16),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// Whether the train graph takes a loss scale (float16's range is too small for small gradients).
    pub fn needs_loss_scale(self) -> bool {
        self == Precision::Fp16
    }

    /// Reads a `--precision` value.
    pub fn parse(flag: &str, s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "fp16" => Ok(Precision::Fp16),
            _ => Err(Error::BadFlag { flag: flag.into(), detail: format!("{s:?} is not a precision ({})", Self::NAMES) }),
        }
    }
}

/// The products' precision, and whether half is only emulated by rounding (for a CPU check).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MixedPrecision {
    pub precision: Precision,
    pub emulated: bool,
}

/// Rewrites every `MatMul`/`Gemm` of `graph` that `keep` does not keep in float32 to compute in half
/// precision (see the module docs), recording the new tensors in `infos`; products whose tensors `infos`
/// does not know as float32 stay as they are. Returns how many products were rewritten; none for
/// [`Precision::Fp32`], which leaves the graph as it is.
pub fn products_in_half(graph: &mut Graph, infos: &mut TensorInfos, mp: MixedPrecision, keep: impl Fn(&NodeProto) -> bool) -> usize {
    let Some(half) = mp.precision.half() else { return 0 };
    // initializers made after the probe (epsilon-DPO's frozen reference weights) are known by their own proto
    for t in &graph.initializers {
        infos.entry(t.name.clone()).or_insert_with(|| TensorInfo::fixed(t.data_type, &t.dims));
    }
    let mut names = std::mem::take(&mut graph.names);
    let mut casts = Casts { b: Builder::new(&mut names, "half/"), infos, half, emulated: mp.emulated };
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    let mut rewritten = 0;
    for node in std::mem::take(&mut graph.nodes) {
        if !PRODUCTS.contains(&node.op_type.as_str()) || keep(&node) || !casts.all_float32(&node) {
            nodes.push(node);
            continue;
        }
        let mut node = node;
        let bias = take_bias(&mut node);
        for x in node.input.iter_mut().filter(|x| !x.is_empty()) {
            *x = casts.half_of(x);
        }
        let y = node.output[0].clone();
        let y_half = casts.b.fresh(&format!("{y}/half"));
        casts.record(&y_half, &y, if mp.emulated { dtype::FLOAT } else { half });
        node.output[0] = y_half.clone();
        nodes.extend(casts.b.take());
        nodes.push(node);
        match bias {
            None => casts.cast_back(&y_half, &y),
            Some((c, beta)) => {
                let product = casts.b.fresh(&format!("{y}/product"));
                casts.record(&product, &y, dtype::FLOAT);
                casts.cast_back(&y_half, &product);
                let c = casts.scaled(&c, beta);
                casts.b.op_into("Add", &[&product, &c], &[&y], vec![]);
            }
        }
        nodes.extend(casts.b.take());
        rewritten += 1;
    }
    graph.nodes = nodes;
    graph.names = names;
    rewritten
}

/// Lets half products read frozen half weights directly: after `store_frozen` a weight stored as
/// `W.bfloat16` is read as `Cast<float32>(W.bfloat16)`, which a bf16 product casts straight back. The
/// round trip is exact (float32 holds every half value), so `Cast<half>(Cast<float32>(x))` of a half `x`
/// becomes `x` itself: no float32 copy of the weight, no casts. Returns how many were removed.
pub fn drop_exact_round_trips(graph: &mut Graph) -> usize {
    let half: HashMap<&str, i64> = graph.initializers.iter().filter(|t| is_half(t.data_type)).map(|t| (t.name.as_str(), t.data_type as i64)).collect();
    let to = |n: &NodeProto| n.attribute.iter().find(|a| a.name == "to").map(|a| a.i);
    // float32 casts of half initializers: their output -> (the initializer, its dtype)
    let widened: HashMap<String, (String, i64)> = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Cast" && to(n) == Some(dtype::FLOAT as i64))
        .filter_map(|n| half.get(n.input[0].as_str()).map(|&t| (n.output[0].clone(), (n.input[0].clone(), t))))
        .collect();
    let mut replaced: HashMap<String, String> = HashMap::new();
    for n in graph.nodes.iter().filter(|n| n.op_type == "Cast") {
        if let Some((source, _)) = widened.get(&n.input[0]).filter(|(_, t)| to(n) == Some(*t)) {
            replaced.insert(n.output[0].clone(), source.clone());
        }
    }
    if replaced.is_empty() {
        return 0;
    }
    let outputs: std::collections::HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    replaced.retain(|r, _| !outputs.contains(r.as_str()));
    for n in graph.nodes.iter_mut() {
        for x in n.input.iter_mut() {
            if let Some(source) = replaced.get(x.as_str()) {
                *x = source.clone();
            }
        }
    }
    let n = replaced.len();
    graph.prune();
    n
}

fn is_half(t: DType) -> bool {
    t == dtype::FLOAT16 || t == dtype::BFLOAT16
}

/// Takes a `Gemm`'s bias `C` (and its `beta`) off the product, to be added in float32 after it: its
/// gradient is a sum over the rows, which must not accumulate in half precision.
fn take_bias(node: &mut NodeProto) -> Option<(String, f32)> {
    let c = node.input.get(2).filter(|c| !c.is_empty())?.clone();
    let beta = node.attribute.iter().find(|a| a.name == "beta").map_or(1.0, |a| a.f);
    node.input.truncate(2);
    node.attribute.retain(|a| a.name != "beta");
    Some((c, beta))
}

/// Emits the casts around the products.
struct Casts<'a, 'b> {
    b: Builder<'b>,
    infos: &'a mut TensorInfos,
    half: DType,
    emulated: bool,
}

impl Casts<'_, '_> {
    /// Whether the probe saw every input and the output of `node` as float32.
    fn all_float32(&self, node: &NodeProto) -> bool {
        node.input.iter().chain(&node.output[..1]).filter(|x| !x.is_empty()).all(|x| self.infos.get(x).is_some_and(|i| i.dtype == dtype::FLOAT))
    }

    /// `like`'s info for the new tensor `name`, in `dtype`.
    fn record(&mut self, name: &str, like: &str, dtype: DType) {
        let mut info = self.infos[like].clone();
        info.dtype = dtype;
        self.infos.insert(name.to_string(), info);
    }

    fn cast(&mut self, x: &str, to: DType, hint: &str) -> String {
        let out = self.b.op("Cast", &[x], vec![attr_i("to", to as i64)], hint);
        self.record(&out, x, to);
        out
    }

    /// `c x beta`, in float32.
    fn scaled(&mut self, c: &str, beta: f32) -> String {
        if beta == 1.0 {
            return c.to_string();
        }
        let factor = self.b.scalar(beta as f64, dtype::FLOAT);
        self.infos.insert(factor.clone(), TensorInfo::fixed(dtype::FLOAT, &[]));
        let out = self.b.op("Mul", &[c, &factor], vec![], &format!("{c}/beta"));
        self.record(&out, c, dtype::FLOAT);
        out
    }

    /// `x` in half precision: cast, or (emulated) rounded to half and read back as float32. One cast per
    /// reader, never shared: the gradients of a shared cast would be summed in half precision (attention's
    /// three projections read one hidden state), where one per reader is cast to float32 before the sum.
    fn half_of(&mut self, x: &str) -> String {
        let hint = format!("{x}/{}", dtype::name(self.half));
        let h = self.cast(x, self.half, &hint);
        if self.emulated {
            self.cast(&h, dtype::FLOAT, &format!("{hint}_rounded"))
        } else {
            h
        }
    }

    /// `y_half` cast back to float32 as `y` (emulated: rounded to half on the way, as the real product's
    /// result is stored in half).
    fn cast_back(&mut self, y_half: &str, y: &str) {
        let from = if self.emulated { self.cast(y_half, self.half, &format!("{y}/{}", dtype::name(self.half))) } else { y_half.to_string() };
        self.b.op_into("Cast", &[&from], &[y], vec![attr_i("to", dtype::FLOAT as i64)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Names;
    use crate::onnx::{value_info, Dim};
    use std::collections::HashMap;

    fn node(op: &str, inputs: &[&str], outputs: &[&str], name: &str) -> NodeProto {
        NodeProto {
            name: name.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// y = Softmax(x·W) · V, and the objective's own product `dpo/head` over y.
    fn attention_like() -> (Graph, TensorInfos) {
        let mut g = Graph {
            nodes: vec![
                node("MatMul", &["x", "W"], &["s"], "scores"),
                node("Softmax", &["s"], &["p"], "softmax"),
                node("MatMul", &["p", "V"], &["y"], "mix"),
                node("MatMul", &["y", "h"], &["z"], "dpo/head"),
            ],
            inputs: ["x", "W", "V", "h"].iter().map(|n| value_info(n, dtype::FLOAT, &[Dim::Fixed(2), Dim::Fixed(2)])).collect(),
            outputs: vec![value_info("z", dtype::FLOAT, &[Dim::Fixed(2), Dim::Fixed(2)])],
            ..Default::default()
        };
        g.names = Names::from_graph(&g);
        let infos = ["x", "W", "V", "h", "s", "p", "y", "z"].iter().map(|n| (n.to_string(), TensorInfo::fixed(dtype::FLOAT, &[2, 2]))).collect();
        (g, infos)
    }

    fn keep_objective(n: &NodeProto) -> bool {
        n.name.starts_with("dpo/")
    }

    #[test]
    fn fp32_leaves_the_graph_as_it_is() {
        let (mut g, mut infos) = attention_like();
        let before = g.nodes.clone();
        assert_eq!(products_in_half(&mut g, &mut infos, MixedPrecision::default(), keep_objective), 0);
        assert_eq!(g.nodes, before);
        assert_eq!(infos.len(), 8);
    }

    #[test]
    fn products_read_half_and_everything_else_reads_float32() {
        let (mut g, mut infos) = attention_like();
        let mp = MixedPrecision { precision: Precision::Bf16, emulated: false };
        assert_eq!(products_in_half(&mut g, &mut infos, mp, keep_objective), 2);
        g.sort_topologically().unwrap();
        let dtype_of = |t: &str| infos[t].dtype;
        for n in &g.nodes {
            let half_inputs = n.input.iter().all(|x| dtype_of(x) == dtype::BFLOAT16);
            match (n.op_type.as_str(), n.name.as_str()) {
                ("MatMul", "dpo/head") => assert!(n.input.iter().all(|x| dtype_of(x) == dtype::FLOAT), "the objective's product stays float32"),
                ("MatMul", _) => assert!(half_inputs && dtype_of(&n.output[0]) == dtype::BFLOAT16, "{} is not a bf16 product", n.name),
                ("Softmax", _) => assert_eq!(dtype_of(&n.input[0]), dtype::FLOAT, "softmax reads float32"),
                ("Cast", _) => {}
                (op, _) => panic!("unexpected {op}"),
            }
        }
        // the products' results keep their names, as float32
        assert!(g.nodes.iter().any(|n| n.op_type == "Cast" && n.output == ["s"]));
        assert_eq!(dtype_of("s"), dtype::FLOAT);
    }

    #[test]
    fn an_operand_read_twice_is_cast_for_each_reader() {
        let (mut g, mut infos) = attention_like();
        g.nodes[2].input[1] = "W".into();
        let mp = MixedPrecision { precision: Precision::Fp16, emulated: false };
        products_in_half(&mut g, &mut infos, mp, keep_objective);
        let casts_of_w = g.nodes.iter().filter(|n| n.op_type == "Cast" && n.input == ["W"]).count();
        assert_eq!(casts_of_w, 2, "so that W's two gradients are summed in float32");
    }

    #[test]
    fn emulation_rounds_through_half_and_computes_in_float32() {
        let (mut g, mut infos) = attention_like();
        let mp = MixedPrecision { precision: Precision::Bf16, emulated: true };
        assert_eq!(products_in_half(&mut g, &mut infos, mp, keep_objective), 2);
        let producers: HashMap<&str, &NodeProto> = g.nodes.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
        let to = |n: &NodeProto| n.attribute.iter().find(|a| a.name == "to").map(|a| a.i as DType);
        for n in g.nodes.iter().filter(|n| n.op_type == "MatMul" && n.name != "dpo/head") {
            assert_eq!(infos[&n.output[0]].dtype, dtype::FLOAT);
            for x in &n.input {
                // x <- Cast<float32> <- Cast<bf16> <- the float32 operand
                let back = producers[x.as_str()];
                let down = producers[back.input[0].as_str()];
                assert_eq!((back.op_type.as_str(), to(back), down.op_type.as_str(), to(down)), ("Cast", Some(dtype::FLOAT), "Cast", Some(dtype::BFLOAT16)));
            }
        }
        let s = producers["s"];
        assert_eq!(producers[s.input[0].as_str()].op_type, "Cast", "the result is rounded to bf16 before float32 reads it");
    }

    #[test]
    fn a_gemm_bias_is_added_in_float32_after_the_product() {
        let (mut g, mut infos) = attention_like();
        g.nodes[0] = NodeProto {
            op_type: "Gemm".into(),
            input: vec!["x".into(), "W".into(), "c".into()],
            attribute: vec![crate::onnx::attr_f("beta", 0.5)],
            ..g.nodes[0].clone()
        };
        infos.insert("c".into(), TensorInfo::fixed(dtype::FLOAT, &[2]));
        let mp = MixedPrecision { precision: Precision::Bf16, emulated: false };
        products_in_half(&mut g, &mut infos, mp, keep_objective);
        let gemm = g.nodes.iter().find(|n| n.op_type == "Gemm").unwrap();
        assert_eq!(gemm.input.len(), 2);
        assert!(gemm.attribute.iter().all(|a| a.name != "beta"));
        let add = g.nodes.iter().find(|n| n.op_type == "Add").unwrap();
        assert_eq!(add.output, ["s"]);
        assert!(add.input.iter().all(|x| infos[x].dtype == dtype::FLOAT));
        let mul = g.nodes.iter().find(|n| n.op_type == "Mul").unwrap();
        assert_eq!(mul.input[0], "c", "the bias is scaled by beta");
    }

    /// What `store_frozen` makes of a frozen W: `W.bfloat16`, read through a cast to float32.
    fn store_w_as_bf16(g: &mut Graph) {
        g.inputs.retain(|i| i.name != "W");
        let raw = vec![0u8; 8].into();
        g.initializers.push(crate::onnx::TensorProto {
            name: "W.bfloat16".into(),
            dims: vec![2, 2],
            data_type: dtype::BFLOAT16,
            raw_data: raw,
            ..Default::default()
        });
        let cast = node("Cast", &["W.bfloat16"], &["W"], "frozen/W");
        g.nodes.insert(0, NodeProto { attribute: vec![attr_i("to", dtype::FLOAT as i64)], ..cast });
    }

    #[test]
    fn a_frozen_half_weight_is_read_directly() {
        let (mut g, mut infos) = attention_like();
        products_in_half(&mut g, &mut infos, MixedPrecision { precision: Precision::Bf16, emulated: false }, keep_objective);
        store_w_as_bf16(&mut g);
        assert_eq!(drop_exact_round_trips(&mut g), 1);
        let scores = g.nodes.iter().find(|n| n.name == "scores").unwrap();
        assert_eq!(scores.input[1], "W.bfloat16");
        assert!(g.nodes.iter().all(|n| n.input.first().map(String::as_str) != Some("W.bfloat16") || n.op_type != "Cast"), "no cast of W is left");
        // a float16 product of a bfloat16 weight keeps its (rounding) casts
        let (mut g, mut infos) = attention_like();
        products_in_half(&mut g, &mut infos, MixedPrecision { precision: Precision::Fp16, emulated: false }, keep_objective);
        store_w_as_bf16(&mut g);
        assert_eq!(drop_exact_round_trips(&mut g), 0);
    }

    #[test]
    fn a_bad_precision_is_a_flag_error() {
        let e = Precision::parse("--precision", "fp8").unwrap_err().to_string();
        assert!(e.contains("--precision") && e.contains("fp8") && e.contains("bf16, fp16 or fp32") && !e.contains('\n'), "{e}");
        assert_eq!(Precision::parse("--precision", "bf16").unwrap(), Precision::Bf16);
    }
}
