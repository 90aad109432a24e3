//! LoRA adapters in the graph (`build-graph --lora-rank R`): for each targeted product `y = x·W` of
//! the model, `y += ((x·A)·B)·(alpha/R)`, with `A` [in, R] and `B` [R, out] in the product's
//! orientation. Only `A`, `B` and the beta head train; `W` stays a frozen initializer, so the
//! backward pass has no node for it and the optimizer no state.
//!
//! A phase over the model's graph, run after the model is recognised and before the objective is
//! appended, so the train, eval and inference graphs all carry the adapters (unmerged).
//!
//! Initialisation follows PEFT: `A` as PEFT's `kaiming_uniform_(a=sqrt(5))` on its `[R, in]`
//! `lora_A.weight`, i.e. U(-1/sqrt(in), 1/sqrt(in)) (from a fixed seed, so builds are
//! reproducible), `B` zeros: at step 0 the adapters add nothing and the policy is the base model.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::dpo::model::LmSignature;
use crate::graph::{Builder, Graph};
use crate::onnx::{attr_i, dtype, tensor_f32, NodeAttrs, NodeProto, TensorProto};
use crate::{Error, Result};

/// Seed of the adapters' `A` initialisation (one stream, drawn in the order of the targets).
const INIT_SEED: u64 = 0x10_4A;

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct LoraOptions {
    pub rank: usize,
    /// Defaults to 2 x rank.
    pub alpha: Option<f64>,
    pub dropout: f64,
    /// Base weights to adapt, matched against the initializer name and the PyTorch module name;
    /// `None`: every projection inside the transformer blocks.
    pub targets: Option<Regex>,
}

/// The `lora` section of the manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub adapters: Vec<AdapterSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdapterSpec {
    /// The frozen initializer the adapter sits beside.
    pub base_weight: String,
    /// Parameter names: `A` is [in_features, rank], `B` is [rank, out_features].
    pub a: String,
    pub b: String,
    pub in_features: i64,
    pub out_features: i64,
    /// The ONNX weight is stored [out, in] (PyTorch's `Linear` layout, used through a Transpose or
    /// Gemm `transB`) rather than [in, out]. PEFT's `lora_A.weight` is `A` transposed either way.
    pub weight_out_in: bool,
    /// The PyTorch/PEFT module, when the model's Hugging Face name map says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl LoraSpec {
    pub fn is_adapter(&self, param: &str) -> bool {
        self.adapters.iter().any(|a| a.a == param || a.b == param)
    }
}

impl LoraOptions {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, detail: String| Err(Error::BadFlag { flag: flag.into(), detail });
        if self.rank == 0 {
            return bad("--lora-rank", "must be at least 1".into());
        }
        crate::limits::at_most("--lora-rank", self.rank, crate::limits::MAX_COUNT, "no model has a dimension that large")?;
        if !self.alpha().is_finite() || self.alpha() <= 0.0 {
            return bad("--lora-alpha", format!("{} must be a positive number", self.alpha()));
        }
        if self.dropout != 0.0 {
            return bad("--lora-dropout", format!("{}: dropout in the adapters is not supported yet (only 0)", self.dropout));
        }
        Ok(())
    }
}

/// Refuses a rank whose adapters (A and B of every targeted weight, held four times in training:
/// values, gradients, two Adam moments) exceed the machine's memory, before any is allocated.
fn check_adapter_memory(graph: &Graph, targets: &[&Product], rank: usize) -> Result<()> {
    let mut weights: Vec<&str> = targets.iter().map(|p| p.weight.as_str()).collect();
    weights.sort_unstable();
    weights.dedup();
    let per_rank: u128 = weights.iter().filter_map(|w| graph.initializer(w)).map(|w| w.dims.iter().map(|&d| d.max(0) as u128).sum::<u128>()).sum();
    let useful = weights.iter().filter_map(|w| graph.initializer(w)).filter_map(|w| w.dims.iter().copied().min()).max().unwrap_or(0);
    if rank as i64 > useful {
        return Err(Error::BadFlag {
            flag: "--lora-rank".into(),
            detail: format!("{rank} is larger than every targeted weight's smaller side (at most {useful}), past which an adapter's product gains no rank"),
        });
    }
    let bytes = crate::limits::product(&[per_rank, rank as u128, 4, 4]);
    let what = format!("rank {rank} on {} weights (adapters, gradients and Adam moments)", weights.len());
    crate::limits::fits_in_memory("--lora-rank", &what, bytes, "lower --lora-rank")
}

/// A product `y = x·W` the adapters may target: node `node`, weight initializer `weight`.
struct Product {
    node: usize,
    weight: String,
    out_in: bool,
}

/// Every `MatMul`/`Gemm` whose second operand is a 2-D float initializer (directly, through a
/// plain Transpose, or with Gemm's `transB`), except the lm_head and the embeddings.
fn products(graph: &Graph, sig: &LmSignature) -> Vec<Product> {
    let producers = graph.producers();
    let is_2d_float = |n: &str| graph.initializer(n).is_some_and(|t| t.dims.len() == 2 && dtype::is_float(t.data_type));
    let swaps = |n: &NodeProto| n.op_type == "Transpose" && n.ints_attr("perm").is_none_or(|p| p == [1, 0]);
    // read by a Gather: an embedding table (GPT-2's is also the tied lm_head)
    let gathered: Vec<&str> = graph.nodes.iter().filter(|n| n.op_type == "Gather").filter_map(|n| n.input.first()).map(String::as_str).collect();
    let mut out = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let Some(rhs) = n.input.get(1) else { continue };
        let found = match n.op_type.as_str() {
            "MatMul" if is_2d_float(rhs) => Some((rhs.clone(), false)),
            "MatMul" => {
                producers.get(rhs.as_str()).map(|&p| &graph.nodes[p]).filter(|t| swaps(t) && is_2d_float(&t.input[0])).map(|t| (t.input[0].clone(), true))
            }
            "Gemm" if is_2d_float(rhs) && n.int_or("transA", 0) == 0 => Some((rhs.clone(), n.int_or("transB", 0) != 0)),
            _ => None,
        };
        let Some((weight, out_in)) = found else { continue };
        if weight == sig.lm_head || rhs == &sig.lm_head || gathered.contains(&weight.as_str()) {
            continue;
        }
        out.push(Product { node: i, weight, out_in });
    }
    out
}

/// `name` without a trailing `.weight`: the module a weight belongs to, as read from its name.
fn stem(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// Adds the adapters to `graph` (the model, before the objective) and returns what it added.
/// `modules` maps base weight initializers to PyTorch module names (from the Hugging Face map).
pub fn add_adapters(graph: &mut Graph, sig: &LmSignature, opts: &LoraOptions, modules: &HashMap<String, String>) -> Result<LoraSpec> {
    opts.validate()?;
    let all = products(graph, sig);
    let matches = |p: &Product| match &opts.targets {
        None => true,
        Some(re) => re.is_match(&p.weight) || modules.get(&p.weight).is_some_and(|m| re.is_match(m)),
    };
    let targets: Vec<&Product> = all.iter().filter(|p| matches(p)).collect();
    if targets.is_empty() {
        let mut candidates: Vec<String> = all.iter().map(|p| modules.get(&p.weight).map_or(p.weight.clone(), |m| format!("{} ({m})", p.weight))).collect();
        candidates.dedup();
        let pattern = opts.targets.as_ref().map_or(String::new(), |r| format!("{:?} ", r.as_str()));
        return Err(Error::BadFlag {
            flag: "--lora-targets".into(),
            detail: format!(
                "{pattern}matches no weight of a MatMul/Gemm; candidates: {}",
                if candidates.is_empty() { "none".into() } else { candidates.join(", ") }
            ),
        });
    }
    check_adapter_memory(graph, &targets, opts.rank)?;
    let rank = opts.rank as i64;
    let alpha = opts.alpha();
    let mut rng = ChaCha8Rng::seed_from_u64(INIT_SEED);
    let mut adapters: Vec<AdapterSpec> = Vec::new();
    let mut new_initializers: Vec<TensorProto> = Vec::new();
    let mut names = graph.names.clone();
    let mut b = Builder::new(&mut names, "lora/");
    let scale = b.scalar(alpha / opts.rank as f64, dtype::FLOAT);
    for p in targets {
        let w = graph.initializer(&p.weight).expect("a product's weight is an initializer");
        let (wdt, (rows, cols)) = (w.data_type, (w.dims[0], w.dims[1]));
        let (fan_in, fan_out) = if p.out_in { (cols, rows) } else { (rows, cols) };
        // one adapter per weight, shared by every product that reads it
        let adapter = match adapters.iter().position(|a| a.base_weight == p.weight) {
            Some(k) => adapters[k].clone(),
            None => {
                let module = modules.get(&p.weight).cloned();
                let readable = module.clone().unwrap_or_else(|| stem(&p.weight).to_string());
                let (a, bn) = (b.fresh(&format!("{readable}.lora_A")), b.fresh(&format!("{readable}.lora_B")));
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a_values: Vec<f32> = (0..fan_in * rank).map(|_| rng.random_range(-bound..bound) as f32).collect();
                new_initializers.push(tensor_f32(&a, &[fan_in, rank], &a_values));
                new_initializers.push(tensor_f32(&bn, &[rank, fan_out], &vec![0.0; (rank * fan_out) as usize]));
                let spec = AdapterSpec { base_weight: p.weight.clone(), a, b: bn, in_features: fan_in, out_features: fan_out, weight_out_in: p.out_in, module };
                adapters.push(spec.clone());
                spec
            }
        };
        // y keeps its name, so every reader of the product now reads base + adapter
        let node = &mut graph.nodes[p.node];
        let y = node.output[0].clone();
        let x = node.input[0].clone();
        let y_base = b.fresh(&format!("{y}/base"));
        node.output[0] = y_base.clone();
        let x32 = if wdt == dtype::FLOAT { x } else { b.op("Cast", &[&x], vec![attr_i("to", dtype::FLOAT as i64)], "lora/x_f32") };
        let xa = b.op("MatMul", &[&x32, &adapter.a], vec![], &format!("{}/xA", adapter.a));
        let xab = b.op("MatMul", &[&xa, &adapter.b], vec![], &format!("{}/xAB", adapter.b));
        let mut delta = b.op("Mul", &[&xab, &scale], vec![], &format!("{}/scaled", adapter.b));
        if wdt != dtype::FLOAT {
            delta = b.op("Cast", &[&delta], vec![attr_i("to", wdt as i64)], "lora/delta");
        }
        b.op_into("Add", &[&y_base, &delta], &[&y], vec![]);
    }
    graph.nodes.extend(b.take());
    graph.names = names;
    graph.initializers.extend(new_initializers);
    graph.sort_topologically()?;
    Ok(LoraSpec { rank: opts.rank, alpha, dropout: opts.dropout, adapters })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{value_info, Dim, GraphProto, ModelProto, OperatorSetIdProto};
    use crate::runtime::{run, HostTensor, SessionConfig};
    use ndarray::{Array1, Array2, ArrayD};

    const IN: usize = 3;
    const OUT: usize = 4;

    fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<crate::onnx::AttributeProto>) -> NodeProto {
        NodeProto {
            name: format!("{op}_{}", outputs[0]),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    }

    fn values(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * k).sin()).collect()
    }

    /// Three products of x [2, IN] with the three orientations the phase reads — `MatMul(x, W)`
    /// (W [IN, OUT]), `MatMul(x, Transpose(V))` (V [OUT, IN]), `Gemm(x, U, c, transB=1)` — summed
    /// into `logits` through an lm_head `H`.
    fn model() -> (Graph, LmSignature) {
        let g = GraphProto {
            name: "lora_test".into(),
            node: vec![
                node("MatMul", &["x", "W"], &["y1"], vec![]),
                node("Transpose", &["V"], &["Vt"], vec![]),
                node("MatMul", &["x", "Vt"], &["y2"], vec![]),
                node("Gemm", &["x", "U", "c"], &["y3"], vec![attr_i("transB", 1)]),
                node("Sum", &["y1", "y2", "y3"], &["hidden"], vec![]),
                node("MatMul", &["hidden", "H"], &["logits"], vec![]),
            ],
            initializer: vec![
                tensor_f32("W", &[IN as i64, OUT as i64], &values(IN * OUT, 0.7)),
                tensor_f32("V", &[OUT as i64, IN as i64], &values(IN * OUT, 1.3)),
                tensor_f32("U", &[OUT as i64, IN as i64], &values(IN * OUT, 0.4)),
                tensor_f32("c", &[OUT as i64], &values(OUT, 2.1)),
                tensor_f32("H", &[OUT as i64, 5], &values(OUT * 5, 0.9)),
            ],
            input: vec![value_info("x", dtype::FLOAT, &[Dim::Fixed(2), Dim::Fixed(IN as i64)])],
            output: vec![value_info("logits", dtype::FLOAT, &[Dim::Fixed(2), Dim::Fixed(5)])],
            ..Default::default()
        };
        let m =
            ModelProto { ir_version: 8, opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 18 }], graph: Some(g), ..Default::default() };
        let sig = LmSignature {
            input_ids: "x".into(),
            attention_mask: String::new(),
            position_ids: None,
            logits: "logits".into(),
            hidden: "hidden".into(),
            hidden_size: OUT as i64,
            lm_head: "H".into(),
            projection: None,
        };
        (Graph::from_model(m).unwrap(), sig)
    }

    fn array(t: &TensorProto) -> Array2<f32> {
        Array2::from_shape_vec((t.dims[0] as usize, t.dims[1] as usize), crate::onnx::tensor_to_f32(t).unwrap()).unwrap()
    }

    fn output(g: &Graph, feeds: &[(&str, HostTensor)], name: &str) -> ArrayD<f32> {
        let mut g = g.clone();
        g.outputs = vec![value_info(name, dtype::FLOAT, &[])];
        // one file per call: the tests run in parallel in one process
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("betadpo-lora-unit-{}-{call}.onnx", std::process::id()));
        crate::onnx::save_model(&g.into_model(), &path, &Default::default()).unwrap();
        let mut s = SessionConfig::default().session_from_file(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        run(&mut s, feeds).unwrap().into_iter().find(|(n, _)| n == name).unwrap().1.as_f32().unwrap().clone()
    }

    #[test]
    fn adapters_add_scaled_low_rank_products_in_each_orientation() {
        let (mut g, sig) = model();
        let opts = LoraOptions { rank: 2, alpha: Some(3.0), dropout: 0.0, targets: None };
        let spec = add_adapters(&mut g, &sig, &opts, &HashMap::new()).unwrap();
        let bases: Vec<(&str, bool)> = spec.adapters.iter().map(|a| (a.base_weight.as_str(), a.weight_out_in)).collect();
        assert_eq!(bases, [("W", false), ("V", true), ("U", true)], "the lm_head H is not a target");
        let x = Array2::from_shape_vec((2, IN), values(2 * IN, 0.3)).unwrap();
        // A as built (PEFT's bound 1/sqrt(in)), and a non-zero B so the adapter shows
        let mut feeds: Vec<(&str, HostTensor)> = vec![("x", HostTensor::F32(x.clone().into_dyn()))];
        let mut expected = Vec::new();
        for (k, a) in spec.adapters.iter().enumerate() {
            let av = array(g.initializer(&a.a).unwrap());
            assert_eq!(av.dim(), (IN, 2));
            assert!(av.iter().all(|v| v.abs() <= 1.0 / (IN as f32).sqrt()) && av.iter().any(|v| *v != 0.0));
            assert!(crate::onnx::tensor_to_f32(g.initializer(&a.b).unwrap()).unwrap().iter().all(|v| *v == 0.0), "B starts at zero");
            let bv = Array2::from_shape_vec((2, OUT), values(2 * OUT, 0.5 + k as f32)).unwrap();
            feeds.push((a.b.as_str(), HostTensor::F32(bv.clone().into_dyn())));
            expected.push(x.dot(&av).dot(&bv) * 1.5);
        }
        g.initializers.retain(|t| !spec.is_adapter(&t.name) || t.name.ends_with("lora_A"));
        for a in &spec.adapters {
            g.inputs.push(value_info(&a.b, dtype::FLOAT, &[Dim::Fixed(2), Dim::Fixed(OUT as i64)]));
        }
        let (w, v, u, c) = (array(g.initializer("W").unwrap()), array(g.initializer("V").unwrap()), array(g.initializer("U").unwrap()), values(OUT, 2.1));
        let bases = [x.dot(&w), x.dot(&v.t()), x.dot(&u.t()) + &Array1::from(c)];
        for (k, y) in ["y1", "y2", "y3"].iter().enumerate() {
            let got = output(&g, &feeds, y);
            let want = (&bases[k] + &expected[k]).into_dyn();
            let err = (&got - &want).iter().map(|d| d.abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "{y}: {got} vs {want}");
        }
    }

    /// A half-precision base: the adapter computes in float32 (its parameters' type) and adds its
    /// product cast back to the base's type.
    #[test]
    fn half_precision_bases_get_float32_adapters() {
        let w = values(IN * OUT, 0.7);
        let w16 = TensorProto {
            name: "W".into(),
            dims: vec![IN as i64, OUT as i64],
            data_type: dtype::FLOAT16,
            raw_data: w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect::<Vec<u8>>().into(),
            ..Default::default()
        };
        let (mut g, sig) = model();
        g.nodes = vec![
            node("Cast", &["x"], &["x16"], vec![attr_i("to", dtype::FLOAT16 as i64)]),
            node("MatMul", &["x16", "W"], &["y16"], vec![]),
            node("Cast", &["y16"], &["y1"], vec![attr_i("to", dtype::FLOAT as i64)]),
            node("MatMul", &["y1", "H"], &["logits"], vec![]),
        ];
        g.initializers.retain(|t| t.name == "H");
        g.initializers.push(w16);
        let spec = add_adapters(&mut g, &sig, &LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: None }, &HashMap::new()).unwrap();
        let a = &spec.adapters[0];
        assert_eq!((spec.adapters.len(), g.initializer(&a.a).unwrap().data_type), (1, dtype::FLOAT));
        let x = Array2::from_shape_vec((2, IN), values(2 * IN, 0.3)).unwrap();
        let av = array(g.initializer(&a.a).unwrap());
        let bv = Array2::from_shape_vec((2, OUT), values(2 * OUT, 0.5)).unwrap();
        g.initializers.retain(|t| t.name != a.b);
        g.inputs.push(value_info(&a.b, dtype::FLOAT, &[Dim::Fixed(2), Dim::Fixed(OUT as i64)]));
        let feeds = [("x", HostTensor::F32(x.clone().into_dyn())), (a.b.as_str(), HostTensor::F32(bv.clone().into_dyn()))];
        let want = x.dot(&Array2::from_shape_vec((IN, OUT), w).unwrap()) + x.dot(&av).dot(&bv) * 2.0;
        let got = output(&g, &feeds, "y1");
        let err = (&got - &want.into_dyn()).iter().map(|d| d.abs()).fold(0.0f32, f32::max);
        assert!(err < 2e-2, "half-precision product with the adapter off by {err}");
    }

    #[test]
    fn targets_that_match_nothing_list_the_candidates() {
        let (mut g, sig) = model();
        let opts = LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: Some(Regex::new("q_proj").unwrap()) };
        let e = add_adapters(&mut g, &sig, &opts, &HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("--lora-targets") && e.contains("candidates: W, V, U") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn dropout_is_refused_until_supported() {
        let (mut g, sig) = model();
        let opts = LoraOptions { rank: 2, alpha: None, dropout: 0.1, targets: None };
        let e = add_adapters(&mut g, &sig, &opts, &HashMap::new()).unwrap_err().to_string();
        assert!(e.contains("--lora-dropout") && e.contains("not supported"), "{e}");
    }
}
