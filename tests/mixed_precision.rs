//! `build-graph --precision bf16|fp16`: the model's matrix products in half precision, checked on the CPU.
//!
//! ONNX Runtime's CPU provider (1.32) has no bfloat16 MatMul/Gemm and runs float16 ones in float32 (it drops
//! the casts around them), so the CPU checks the *emulated* graphs (`--emulate-half`: the same transform,
//! rounding to half where the real graph casts, multiplying in float32 as a tensor core accumulates)
//! against PyTorch's float64 goldens: the loss and every gradient. Tolerances: about 3x the errors
//! measured on the two fixtures (bf16 gradients 2.2e-3 and 3.1e-3, fp16 ~3e-4), which sit below the
//! formats' unit roundoff (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4); each check also requires the error
//! to exceed float32's tenfold, so a transform that did nothing would fail.

mod common;

use std::collections::HashMap;
use std::path::Path;

use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, HeadInput, Manifest, ObjectiveConfig};
use betadpo::graph::{products_in_half, Graph, MixedPrecision, Names, Precision, TensorInfo, TensorInfos};
use betadpo::onnx::{dtype, load_model, value_info, Dim};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use common::cli::{assert_one_line_error, betadpo};
use common::golden::{diff, golden_train_outputs, load_golden, norm, Golden, FED_LOSS_SCALE};
use ndarray::{ArrayD, IxDyn};

/// PyTorch's goldens read the raw hidden state with an unbounded beta (as tests/golden.rs).
fn objective() -> ObjectiveConfig {
    // the float64 goldens differentiate through the head's read of the hidden state (the joint head)
    ObjectiveConfig { beta_min: 0.0, beta_max: f64::INFINITY, beta_reg: 0.0, head_input: HeadInput::Raw, detach_head_input: false, ..Default::default() }
}

fn options(precision: Precision, emulated: bool) -> BuildOptions {
    BuildOptions { objective: objective(), layout: LayoutChoice::Padded, precision: MixedPrecision { precision, emulated }, ..Default::default() }
}

/// How far a build's train graph is from the golden: the loss's relative error, and the gradients'
/// (all parameters as one vector).
struct Errors {
    loss: f64,
    grads: f64,
}

fn errors(model_dir: &Path, golden: &Golden, opts: &BuildOptions, tag: &str) -> Errors {
    let (m, outs) = golden_train_outputs(model_dir, golden, opts, tag).unwrap_or_else(|e| panic!("{}: {e}", model_dir.display()));
    let spec = m.graph("train").unwrap();
    let scale = if m.precision.needs_loss_scale() { FED_LOSS_SCALE } else { 1.0 };
    let loss_value = outs[&spec.output("loss").unwrap().name].iter().copied().next().unwrap();
    let (mut d2, mut n2) = (0.0, 0.0);
    for p in m.trainable() {
        let g = outs[&spec.output_for("gradient", &p.name).unwrap().name].mapv(|v| v / scale);
        let mut expected: Option<ArrayD<f32>> = None;
        for r in &p.initializers {
            let e = &golden.f32s[&format!("grad/{}", r.name)];
            let e = if r.transposed { e.t().to_owned() } else { e.clone() };
            expected = Some(expected.map_or(e.clone(), |x| x + e));
        }
        let expected = expected.unwrap();
        d2 += diff(&g, &expected).powi(2);
        n2 += norm(&expected).powi(2);
    }
    let golden_loss = golden.f32s["loss"].iter().copied().next().unwrap();
    Errors { loss: ((loss_value - golden_loss) as f64 / golden_loss as f64).abs(), grads: (d2 / n2).sqrt() }
}

fn shared_models() -> Vec<std::path::PathBuf> {
    ["tiny-gpt2-ts", "tiny-llama-dynamo"].iter().filter_map(|m| common::fixtures::shared(m)).collect()
}

/// bf16 and fp16, emulated (fp16 with a loss scale of 1024 fed and divided back out): each within its
/// format's error band of PyTorch's float64 values, fp16 closer than bf16 (3 more bits of mantissa), and
/// both outside float32's band.
#[test]
fn half_precision_matches_float64_goldens() {
    for model in shared_models() {
        let golden = load_golden(&model);
        let fp32 = errors(&model, &golden, &options(Precision::Fp32, false), "fp32");
        let bf16 = errors(&model, &golden, &options(Precision::Bf16, true), "bf16-emulated");
        let fp16 = errors(&model, &golden, &options(Precision::Fp16, true), "fp16-emulated");
        eprintln!(
            "{}: loss rel. error fp32 {:.1e} bf16 {:.1e} fp16 {:.1e}; gradients fp32 {:.1e} bf16 {:.1e} fp16 {:.1e}",
            model.display(),
            fp32.loss,
            bf16.loss,
            fp16.loss,
            fp32.grads,
            bf16.grads,
            fp16.grads
        );
        let m = model.display();
        assert!(bf16.loss < 1e-4 && bf16.grads < 1e-2, "{m}: bf16 off by {:.2e} (loss), {:.2e} (gradients)", bf16.loss, bf16.grads);
        assert!(fp16.loss < 5e-5 && fp16.grads < 2e-3, "{m}: fp16 off by {:.2e} (loss), {:.2e} (gradients)", fp16.loss, fp16.grads);
        assert!(fp16.grads < bf16.grads / 2.0, "{m}: fp16 ({:.1e}) is not more exact than bf16 ({:.1e})", fp16.grads, bf16.grads);
        assert!(fp16.grads > 10.0 * fp32.grads, "{m}: fp16 gradients ({:.1e}) as exact as float32's ({:.1e}): nothing was rounded", fp16.grads, fp32.grads);
    }
}

/// The element type of every tensor of a graph whose only sources of half values are casts.
fn dtypes(g: &betadpo::onnx::GraphProto) -> HashMap<String, i32> {
    let mut t: HashMap<String, i32> = HashMap::new();
    for n in &g.node {
        let to = n.attribute.iter().find(|a| a.name == "to").map(|a| a.i as i32);
        let out = match n.op_type.as_str() {
            "Cast" => to.unwrap(),
            // the ops a half product's operands and gradients pass through keep their input's type
            _ => n.input.first().and_then(|x| t.get(x)).copied().unwrap_or(dtype::FLOAT),
        };
        for o in &n.output {
            t.insert(o.clone(), out);
        }
    }
    t
}

/// In a bf16 train graph every model product, forward and backward, reads bfloat16, and nothing else
/// does: softmax, norms, reductions, the objective (lm_head over the answers, beta head, loss) and
/// the gradients returned are float32.
#[test]
fn bf16_graph_is_half_only_in_its_products() {
    for model in shared_models() {
        let out = common::fixtures::scratch(&format!("mixed-structure-{}", model.file_name().unwrap().to_string_lossy()));
        build_artifacts(&model.join("model.onnx"), &out, &options(Precision::Bf16, false)).unwrap();
        let m = Manifest::load(&out).unwrap();
        assert_eq!((m.precision, m.precision_emulated), (Precision::Bf16, false));
        let g = load_model(&out.join("train.onnx")).unwrap().graph.unwrap();
        let types = dtypes(&g);
        let half = |x: &String| types.get(x) == Some(&dtype::BFLOAT16);
        let (mut forward, mut backward, mut float_products) = (0, 0, Vec::new());
        for n in &g.node {
            let reads_half = n.input.iter().any(half);
            match n.op_type.as_str() {
                "MatMul" | "Gemm" if reads_half => {
                    assert!(n.input.iter().all(half), "{}: {} mixes bf16 and float32 operands", model.display(), n.name);
                    if n.name.starts_with("grad/") {
                        backward += 1;
                    } else {
                        forward += 1;
                    }
                }
                "MatMul" | "Gemm" => float_products.push(n.name.clone()),
                "Cast" | "Transpose" | "Reshape" | "Shape" => {}
                op => assert!(!reads_half, "{}: {op} {} reads bfloat16", model.display(), n.name),
            }
            if n.name.starts_with("dpo/") {
                assert!(!reads_half, "{}: the objective's {} reads bfloat16", model.display(), n.name);
            }
        }
        // every model product (all weights train) has two gradient products, in bf16 too; float32 ones are the objective's
        assert!(forward >= 8 && backward == 2 * forward, "{}: {forward} forward and {backward} backward bf16 products", model.display());
        let objective = float_products.iter().filter(|n| n.starts_with("dpo/")).count();
        assert!(float_products.len() <= 3 * objective, "{}: float32 products beyond the objective's and their gradients: {float_products:?}", model.display());
        for o in g.output.iter() {
            assert!(!half(&o.name), "{}: output {} is bfloat16", model.display(), o.name);
        }
        // the inference graph computes the same model products in bf16 (its full lm_head stays float32)
        let infer = load_model(&out.join("infer.onnx")).unwrap().graph.unwrap();
        let types = dtypes(&infer);
        let infer_half = infer
            .node
            .iter()
            .filter(|n| ["MatMul", "Gemm"].contains(&n.op_type.as_str()) && n.input.iter().all(|x| types.get(x) == Some(&dtype::BFLOAT16)))
            .count();
        assert_eq!(infer_half, forward, "{}: bf16 products in infer.onnx", model.display());
        let _ = std::fs::remove_dir_all(&out);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `--precision fp32` is the default, byte for byte; a bad value or `--emulate-half` alone is a
/// one-line error; `train` refuses bf16 and fp16 artifacts on the CPU in one line before any work.
#[test]
fn flags_and_refusals() {
    let Some(model_dir) = common::fixtures::shared("tiny-gpt2-ts") else { return };
    let model = model_dir.join("model.onnx");
    let dir = common::fixtures::scratch("mixed-flags");
    let build = |out: &Path, extra: &[&str]| {
        let mut args = vec!["build-graph", "--model", s(&model), "--out", s(out), "--quiet"];
        args.extend_from_slice(extra);
        let (code, _, err) = betadpo(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
    };
    let (default, explicit) = (dir.join("default"), dir.join("fp32"));
    build(&default, &[]);
    build(&explicit, &["--precision", "fp32"]);
    for f in ["train.onnx", "eval.onnx", "infer.onnx", "optimizer.onnx"] {
        assert!(std::fs::read(default.join(f)).unwrap() == std::fs::read(explicit.join(f)).unwrap(), "{f} differs with --precision fp32");
    }
    let out = dir.join("bad");
    let err = assert_one_line_error(&["build-graph", "--model", s(&model), "--out", s(&out), "--precision", "fp8"], "--precision");
    assert!(err.contains("fp8") && err.contains("bf16, fp16 or fp32"), "{err}");
    assert_one_line_error(&["build-graph", "--model", s(&model), "--out", s(&out), "--emulate-half"], "--emulate-half");
    assert!(!out.exists());

    let Some(fixtures) = common::fixtures::shared("") else { return };
    let (data, tokenizer) = (fixtures.join("prefs/test.jsonl"), fixtures.join("tokenizer/tokenizer.json"));
    for (precision, why) in [("bf16", "cannot run"), ("fp16", "would compute in float32")] {
        let art = dir.join(precision);
        build(&art, &["--precision", precision]);
        let run = dir.join("run");
        let train = ["train", "--artifacts", s(&art), "--data", s(&data), "--tokenizer", s(&tokenizer), "--out", s(&run)];
        let err = assert_one_line_error(&train, precision);
        assert!(err.contains(why) && err.contains("--ep cuda") && err.contains("CPU"), "{err}");
        assert!(!run.exists(), "a refused run leaves no directory");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `validate` accepts emulated half artifacts, all weights trained or LoRA adapters over frozen bf16
/// weights: the gradient against central differences within the format's tolerance, and the packed eval
/// graph against the (equally half) inference graph.
#[test]
fn validate_accepts_emulated_half_artifacts() {
    for model in shared_models() {
        for (precision, lora) in [("bf16", false), ("fp16", false), ("bf16", true)] {
            let tag = format!("{}-{precision}-{lora}", model.file_name().unwrap().to_string_lossy());
            let out = common::fixtures::scratch(&format!("mixed-validate-{tag}"));
            let (art, onnx) = (out.join("art"), model.join("model.onnx"));
            let mut args = vec!["build-graph", "--model", s(&onnx), "--out", s(&art), "--precision", precision, "--emulate-half", "--quiet"];
            if lora {
                args.extend(["--lora-rank", "4", "--frozen-dtype", "bfloat16"]);
            }
            let (code, _, err) = betadpo(&args);
            assert_eq!(code, 0, "{err}");
            let (code, stdout, err) = betadpo(&["validate", s(&art)]);
            assert_eq!(code, 0, "{tag}: validate failed:\n{stdout}{err}");
            let _ = std::fs::remove_dir_all(&out);
        }
    }
}

/// With LoRA over frozen bf16 weights, the bf16 products read the stored bf16 weights themselves: no
/// float32 copy is made and cast back.
#[test]
fn bf16_products_read_frozen_bf16_weights_directly() {
    let Some(model) = common::fixtures::shared("tiny-llama-dynamo") else { return };
    let out = common::fixtures::scratch("mixed-lora-frozen");
    let (art, onnx) = (out.join("art"), model.join("model.onnx"));
    let args = ["build-graph", "--model", s(&onnx), "--out", s(&art), "--precision", "bf16", "--lora-rank", "4", "--frozen-dtype", "bfloat16", "--quiet"];
    let (code, _, err) = betadpo(&args);
    assert_eq!(code, 0, "{err}");
    let g = load_model(&art.join("train.onnx")).unwrap().graph.unwrap();
    let stored: std::collections::HashSet<&str> = g.initializer.iter().filter(|t| t.data_type == dtype::BFLOAT16).map(|t| t.name.as_str()).collect();
    let direct = g.node.iter().filter(|n| ["MatMul", "Gemm"].contains(&n.op_type.as_str()) && n.input.iter().any(|x| stored.contains(x.as_str()))).count();
    // tiny-llama: 2 layers x 7 projections, each read forward and once more for its input's gradient
    assert!(direct >= 14, "only {direct} products read a stored bf16 weight");
    let widened: std::collections::HashSet<&str> =
        g.node.iter().filter(|n| n.op_type == "Cast" && stored.contains(n.input[0].as_str())).map(|n| n.output[0].as_str()).collect();
    let round_trips = g.node.iter().filter(|n| n.op_type == "Cast" && widened.contains(n.input[0].as_str())).count();
    assert_eq!(round_trips, 0, "a frozen bf16 weight is cast to float32 and back");
    let _ = std::fs::remove_dir_all(&out);
}

/// `y = a·b` through [`products_in_half`], run by ONNX Runtime's CPU provider.
fn one_product(a: &ArrayD<f32>, b: &ArrayD<f32>, precision: Precision, emulated: bool) -> betadpo::Result<ArrayD<f32>> {
    let dims = |x: &ArrayD<f32>| x.shape().iter().map(|&d| d as i64).collect::<Vec<i64>>();
    let mut g = Graph {
        nodes: vec![common::onnx_model::named_node("product", "MatMul", &["a", "b"], &["y"], vec![])],
        inputs: vec![value_info("a", dtype::FLOAT, &[Dim::Fixed(8), Dim::Fixed(64)]), value_info("b", dtype::FLOAT, &[Dim::Fixed(64), Dim::Fixed(8)])],
        outputs: vec![value_info("y", dtype::FLOAT, &[Dim::Fixed(8), Dim::Fixed(8)])],
        opsets: vec![betadpo::onnx::OperatorSetIdProto { domain: String::new(), version: 17 }],
        ir_version: 8,
        ..Default::default()
    };
    g.names = Names::from_graph(&g);
    let mut infos: TensorInfos =
        [("a", dims(a)), ("b", dims(b)), ("y", vec![8, 8])].into_iter().map(|(n, d)| (n.to_string(), TensorInfo::fixed(dtype::FLOAT, &d))).collect();
    assert_eq!(products_in_half(&mut g, &mut infos, MixedPrecision { precision, emulated }, |_| false), 1);
    g.sort_topologically()?;
    let mut session = SessionConfig::default().session_from_bytes(&prost::Message::encode_to_vec(&g.into_model()))?;
    let outs = run(&mut session, &[("a", HostTensor::F32(a.clone())), ("b", HostTensor::F32(b.clone()))])?;
    Ok(outs.into_iter().find(|(n, _)| n == "y").and_then(|(_, t)| t.as_f32().cloned()).unwrap())
}

/// What the CPU can check, found out on one product: ONNX Runtime's CPU provider has no bfloat16
/// MatMul; it runs a float16 one in float32 (it drops the casts: the result is the unrounded operands'
/// product); the emulated product is exactly what a tensor core computes — operands rounded to half, a
/// float32 sum, the result rounded to half — here computed independently in float64 with the `half` crate.
#[test]
fn what_the_cpu_runs_of_one_half_product() {
    let value = |i: usize, seed: usize| ((i * 2654435761 + seed) % 10007) as f32 / 10007.0 * 2.0 - 1.0;
    let a = ArrayD::from_shape_fn(IxDyn(&[8, 64]), |ix| value(ix[0] * 64 + ix[1], 17));
    let b = ArrayD::from_shape_fn(IxDyn(&[64, 8]), |ix| value(ix[0] * 8 + ix[1], 91));
    let product =
        |round: &dyn Fn(f32) -> f64| ArrayD::from_shape_fn(IxDyn(&[8, 8]), |ix| (0..64).map(|k| round(a[[ix[0], k]]) * round(b[[k, ix[1]]])).sum::<f64>());
    let exact = product(&|x| x as f64);
    let worst = |y: &ArrayD<f32>, want: &ArrayD<f64>| y.iter().zip(want.iter()).map(|(&y, &w)| (y as f64 - w).abs() / w.abs().max(1.0)).fold(0.0, f64::max);

    let err = one_product(&a, &b, Precision::Bf16, false).unwrap_err().to_string();
    assert!(err.contains("MatMul"), "ONNX Runtime's CPU provider now runs a bf16 MatMul ({err}): revisit train's refusal");
    let fp16 = one_product(&a, &b, Precision::Fp16, false).unwrap();
    assert!(worst(&fp16, &exact) < 1e-5, "the CPU's fp16 MatMul is {:.1e} from the float32 product: revisit train's refusal", worst(&fp16, &exact));

    let bf16 = |x: f64| half::bf16::from_f64(x).to_f64();
    let f16 = |x: f64| half::f16::from_f64(x).to_f64();
    for (precision, round, ulp) in [(Precision::Bf16, &bf16 as &dyn Fn(f64) -> f64, 2f64.powi(-7)), (Precision::Fp16, &f16, 2f64.powi(-10))] {
        let tensor_core = product(&|x| round(x as f64)).mapv(round);
        let emulated = one_product(&a, &b, precision, true).unwrap();
        // the float32 sum may land across a rounding boundary from float64's: one unit in the last place at most
        let off = worst(&emulated, &tensor_core);
        eprintln!("{precision:?}: emulated vs tensor-core arithmetic {off:.1e}, vs the exact product {:.1e}", worst(&emulated, &exact));
        assert!(off <= ulp, "{precision:?}: emulated product {off:.1e} from operands and result rounded to half");
        assert!(worst(&emulated, &exact) > ulp / 8.0, "{precision:?}: the emulated product was not rounded");
    }
}

/// epsilon-DPO's frozen reference copy computes as the policy does: each of the model's bf16 products
/// has its bf16 twin in the reference (whose weights are made after the shape probe), so policy and
/// reference agree at the start.
#[test]
fn epsilon_dpo_reference_products_are_bf16_too() {
    let Some(model) = common::fixtures::shared("tiny-llama-dynamo") else { return };
    let out = common::fixtures::scratch("mixed-epsilon");
    let objective = ObjectiveConfig { epsilon_dpo: Some(betadpo::dpo::EpsilonDpoConfig { beta0: 0.1, epsilon: 0.01 }), ..Default::default() };
    build_artifacts(&model.join("model.onnx"), &out, &BuildOptions { objective, ..options(Precision::Bf16, false) }).unwrap();
    let g = load_model(&out.join("eval.onnx")).unwrap().graph.unwrap();
    let types = dtypes(&g);
    let half_products = |reference: bool| {
        g.node
            .iter()
            .filter(|n| ["MatMul", "Gemm"].contains(&n.op_type.as_str()) && n.name.starts_with("ref/") == reference)
            .filter(|n| n.input.iter().all(|x| types.get(x) == Some(&dtype::BFLOAT16)))
            .count()
    };
    let (policy, reference) = (half_products(false), half_products(true));
    assert!(policy >= 18 && reference == policy, "bf16 products: policy {policy}, reference {reference}");
    let _ = std::fs::remove_dir_all(&out);
}
