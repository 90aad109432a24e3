//! build-graph against PyTorch autograd: the loss and every parameter gradient of the train graph
//! equal `golden.safetensors` (computed in float64 by PyTorch) for the prompt, sequence and
//! fixed-beta objectives, on every fixture model, and the default trainable set equals the
//! golden's parameter set.

mod common;

use common::golden::{diff, golden_train_outputs, load_golden, norm, rel, Golden};

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use betadpo::dpo::artifacts::recompute::MemoryOptions;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BetaAggregate, BetaSource, BuildOptions, HeadInput, Layout, Manifest, ObjectiveConfig};
use ndarray::{ArrayD, IxDyn};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Prompt,
    Sequence,
    Fixed,
}

/// Builds `objective` in `layout` and runs its train graph on the golden batch with the golden's
/// beta head; returns the manifest and every float output by name.
fn train_graph_outputs(
    model_dir: &Path,
    golden: &Golden,
    objective: ObjectiveConfig,
    layout: Layout,
    memory: MemoryOptions,
    tag: &str,
) -> Result<(Manifest, HashMap<String, ArrayD<f32>>), String> {
    let choice = if layout == Layout::Packed { LayoutChoice::Packed } else { LayoutChoice::Padded };
    golden_train_outputs(model_dir, golden, &BuildOptions { objective, layout: choice, memory, ..Default::default() }, tag)
}

fn check_model(model_dir: &Path, mode: Mode) {
    check_model_in(model_dir, mode, Layout::Padded).unwrap();
}

fn check_model_in(model_dir: &Path, mode: Mode, layout: Layout) -> Result<(), String> {
    check_model_with(model_dir, mode, layout, MemoryOptions::default())
}

/// Errs only when the build refuses the model (the packed layout does so for masks it cannot replace).
fn check_model_with(model_dir: &Path, mode: Mode, layout: Layout, memory: MemoryOptions) -> Result<(), String> {
    let golden = load_golden(model_dir);
    let objective = ObjectiveConfig {
        beta_source: if matches!(mode, Mode::Sequence) { BetaSource::Sequence } else { BetaSource::Prompt },
        beta_min: 0.0,
        beta_max: f64::INFINITY,
        beta_reg: 0.0,
        // PyTorch's goldens read the raw hidden state (the normalized head has its own test below),
        // and differentiate through that read (the detached head is checked by validate's differences)
        head_input: HeadInput::Raw,
        detach_head_input: false,
        fixed_beta: matches!(mode, Mode::Fixed).then_some(0.1),
        ..Default::default()
    };
    // tests run in parallel: the recomputed build of a mode needs its own scratch folder
    let tag = if memory.gradient_checkpointing { format!("{mode:?}-recompute") } else { format!("{mode:?}") };
    let (m, outs) = train_graph_outputs(model_dir, &golden, objective, layout, memory, &tag)?;
    let spec = m.graph("train").unwrap();
    let (loss_key, grad_prefix) = match mode {
        Mode::Prompt => ("loss", "grad/"),
        Mode::Sequence => ("loss_sequence", "grad_sequence/"),
        Mode::Fixed => ("loss_fixed_beta", "grad_fixed_beta/"),
    };
    let label = format!("{} {mode:?} {layout:?}", model_dir.display());
    let loss = &outs[&spec.output("loss").unwrap().name];
    let r = rel(loss, &golden.f32s[loss_key].clone().into_shape_with_order(IxDyn(&[])).unwrap());
    assert!(r < 1e-4, "{label}: loss {loss} vs golden {}, relative error {r:.2e}", golden.f32s[loss_key]);
    let logps = &outs[&spec.outputs.iter().find(|o| o.name == "policy_logps").unwrap().name];
    assert!(rel(logps, &golden.f32s["policy_logps"]) < 1e-4, "{label}: policy log-probs differ");

    // Some gradients are zero in exact arithmetic (e.g. a key bias, which shifts every attention
    // score of a query equally); there both sides hold rounding noise, so relative errors are taken
    // against at least a millionth of the largest gradient.
    let largest = golden.f32s.iter().filter(|(k, _)| k.starts_with(grad_prefix)).map(|(_, g)| norm(g)).fold(0.0, f64::max);
    let mut compared = 0;
    for p in m.trainable() {
        let grad = &outs[&spec.output_for("gradient", &p.name).unwrap().name];
        let mut expected: Option<ArrayD<f32>> = None;
        for r in &p.initializers {
            let Some(g) = golden.f32s.get(&format!("{grad_prefix}{}", r.name)) else { continue };
            let g = if r.transposed { g.t().to_owned() } else { g.clone() };
            expected = Some(match expected {
                None => g,
                Some(e) => e + g,
            });
        }
        let Some(expected) = expected else {
            // sequence goldens carry head gradients only
            assert!(matches!(mode, Mode::Sequence) && !p.beta_head, "{label}: no golden gradient for {}", p.name);
            continue;
        };
        let r = diff(grad, &expected) / norm(&expected).max(1e-6 * largest);
        assert!(r < 1e-3, "{label}: gradient of {} off by {r:.2e} (relative)", p.name);
        compared += 1;
    }
    assert!(compared > 0, "{label}: no gradient compared");

    if matches!(mode, Mode::Prompt) {
        assert_lm_inputs_without_cache(model_dir, &m, &label);
        // default trainable set == the golden's parameter set
        let ours: BTreeSet<String> =
            m.parameters.iter().filter(|p| p.trainable && !p.beta_head).flat_map(|p| p.initializers.iter().map(|r| r.name.clone())).collect();
        let theirs: BTreeSet<String> =
            golden.f32s.keys().filter_map(|k| k.strip_prefix("grad/")).filter(|k| !k.starts_with("beta_head.")).map(str::to_string).collect();
        assert_eq!(ours, theirs, "{label}: trainable set differs from the golden's parameters");
    }
    Ok(())
}

/// The train and infer graphs take the model's own inputs less its KV cache (an Optimum export's
/// `past_key_values.*` and `use_cache_branch`), as `golden.json` lists them.
fn assert_lm_inputs_without_cache(model_dir: &Path, m: &Manifest, label: &str) {
    let path = model_dir.join("golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{label}: {}: {e}", path.display()));
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let inputs = meta["inputs"].as_array().unwrap_or_else(|| panic!("{label}: {} lists no model inputs", path.display()));
    let is_cache = |n: &str| n.starts_with("past_key_values.") || n == "use_cache_branch";
    let theirs: BTreeSet<&str> = inputs.iter().filter_map(|v| v.as_str()).filter(|n| !is_cache(n)).collect();
    for graph in ["train", "infer"] {
        let ours: BTreeSet<&str> = m
            .graph(graph)
            .unwrap()
            .inputs
            .iter()
            .filter(|i| ["input_ids", "attention_mask", "position_ids"].contains(&i.role.as_str()))
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(ours, theirs, "{label}: {graph} graph's model inputs");
        let cache: Vec<&str> = m.graph(graph).unwrap().inputs.iter().map(|i| i.name.as_str()).filter(|n| is_cache(n)).collect();
        assert!(cache.is_empty(), "{label}: the {graph} graph still takes {cache:?}");
    }
}

#[test]
fn prompt_beta_matches_pytorch() {
    for m in common::fixtures::all_models() {
        check_model(&m, Mode::Prompt);
    }
}

/// `--gradient-checkpointing` with vocabulary slices (of 100 words: the fixtures have 512) and
/// attention in three query chunks gives PyTorch's loss and gradients too, in both layouts.
#[test]
fn recomputed_graphs_match_pytorch() {
    let memory = MemoryOptions { gradient_checkpointing: true, vocab_chunk: 100, attention_chunks: 3 };
    for m in common::fixtures::all_models() {
        for mode in [Mode::Prompt, Mode::Sequence] {
            check_model_with(&m, mode, Layout::Padded, memory.clone()).unwrap();
            if let Err(e) = check_model_with(&m, mode, Layout::Packed, memory.clone()) {
                assert!(e.contains("cannot pack this model"), "{}: {e}", m.display());
            }
        }
    }
}

#[test]
fn sequence_beta_matches_pytorch() {
    for m in common::fixtures::all_models() {
        check_model(&m, Mode::Sequence);
    }
}

#[test]
fn fixed_beta_matches_pytorch() {
    for m in common::fixtures::all_models() {
        check_model(&m, Mode::Fixed);
    }
}

/// Why a fixture cannot be packed: Mistral's sliding window (16 tokens, shorter than the golden
/// batch), OPT's positions (a cumulative sum of the mask), and Optimum's exports, which attend with
/// PyTorch's SDPA: each layer slices a shared boolean mask and makes its own additive one.
fn expected_refusal(name: &str) -> Option<&'static str> {
    match name {
        "mistral" => Some("not plain causal"),
        "opt" => Some("no position computation"),
        n if n.starts_with("optimum-") => Some("do not share one additive mask"),
        _ => None,
    }
}

/// The packed layout (shared prompts, several pairs per row, positions restarting for the rejected
/// answer) gives PyTorch's padded-batch loss and gradients.
/// Models whose mask or positions it cannot replace are refused with the reason ([`expected_refusal`]).
#[test]
fn packed_layout_matches_pytorch() {
    let mut refused = BTreeSet::new();
    for m in common::fixtures::all_models() {
        for mode in [Mode::Prompt, Mode::Sequence, Mode::Fixed] {
            if let Err(e) = check_model_in(&m, mode, Layout::Packed) {
                let name = m.file_name().unwrap().to_string_lossy().to_string();
                let why = expected_refusal(&name).unwrap_or_else(|| panic!("{name}: unexpected refusal: {e}"));
                assert!(e.contains("cannot pack this model") && e.contains(why), "{name}: unexpected refusal: {e}");
                // `auto` falls back to the padded layout and says why
                let out = common::fixtures::scratch(&format!("golden-auto-{name}"));
                let report = build_artifacts(&m.join("model.onnx"), &out, &BuildOptions { layout: LayoutChoice::Auto, ..Default::default() }).unwrap();
                assert_eq!(report.manifest.layout, Layout::Padded);
                assert!(report.not_packed_because.as_deref().is_some_and(|w| w.contains(why)), "{name}: {:?}", report.not_packed_because);
                let _ = std::fs::remove_dir_all(&out);
                refused.insert(name);
            }
        }
    }
    let expected: BTreeSet<String> =
        common::fixtures::own_models().iter().map(|m| m.file_name().unwrap().to_string_lossy().to_string()).filter(|n| expected_refusal(n).is_some()).collect();
    assert_eq!(refused, expected);
}

/// The mean-over-tokens heads have no PyTorch golden; the packed layout must give what the padded
/// one gives (loss, betas, every gradient) with a nonzero head, so every token's weight matters.
#[test]
fn packed_layout_matches_padded_for_mean_heads() {
    let Some(model) = common::fixtures::all_models().into_iter().find(|m| m.ends_with("tiny-llama-dynamo") || m.ends_with("llama")) else {
        common::fixtures::skip("no Llama fixture");
        return;
    };
    let golden = load_golden(&model);
    for source in [BetaSource::Prompt, BetaSource::Sequence] {
        let objective = ObjectiveConfig { beta_source: source, beta_aggregate: BetaAggregate::Mean, beta_max: f64::INFINITY, ..Default::default() };
        let tag = format!("mean-{source:?}");
        let (m, padded) = train_graph_outputs(&model, &golden, objective.clone(), Layout::Padded, MemoryOptions::default(), &tag).unwrap();
        let (mp, packed) = train_graph_outputs(&model, &golden, objective, Layout::Packed, MemoryOptions::default(), &tag).unwrap();
        let (spec, spec_p) = (m.graph("train").unwrap(), mp.graph("train").unwrap());
        let by_role = |spec: &betadpo::dpo::manifest::GraphSpec, outs: &HashMap<String, ArrayD<f32>>, role: &str, p: Option<&str>| -> ArrayD<f32> {
            let o = match p {
                Some(p) => spec.output_for(role, p).unwrap(),
                None => spec.output(role).unwrap(),
            };
            outs[&o.name].clone()
        };
        for role in ["loss", "beta"] {
            let (a, b) = (by_role(spec, &padded, role, None), by_role(spec_p, &packed, role, None));
            assert!(rel(&b, &a) < 1e-5, "{source:?} mean: {role} padded {a} packed {b}");
        }
        let beta = by_role(spec, &padded, "beta", None);
        assert!(beta.iter().any(|&x| (x - beta[0]).abs() > 1e-4), "{source:?} mean: the head should tell contexts apart: {beta}");
        for p in m.trainable() {
            let (a, b) = (by_role(spec, &padded, "gradient", Some(&p.name)), by_role(spec_p, &packed, "gradient", Some(&p.name)));
            let r = diff(&b, &a) / norm(&a).max(1e-9);
            assert!(r < 1e-3, "{source:?} mean: gradient of {} differs by {r:.2e} (relative)", p.name);
        }
    }
}

/// `--head-input normalized` has no PyTorch golden; its beta, loss and head gradients are computed
/// here in float64 from the golden's final hidden states and log-probs (closed form:
/// beta = softplus(w . h/rms(h) x 64/H + b)), and must equal the train graph's, padded and packed, on
/// every fixture model.
#[test]
fn normalized_head_matches_closed_form() {
    for model in common::fixtures::all_models() {
        let golden = load_golden(&model);
        let objective = ObjectiveConfig { head_input: HeadInput::Normalized, detach_head_input: false, beta_max: f64::INFINITY, ..Default::default() };
        let hidden = &golden.f32s["hidden"];
        let (w, bias) = (&golden.f32s["beta_head.weight"], golden.f32s["beta_head.bias"][[0]] as f64);
        let width = w.len();
        let (pl, rl) = (&golden.f32s["policy_logps"], &golden.f32s["ref_logps"]);
        let last = &golden.i64s["prompt_last_index"];
        let pairs = last.len();
        let (mut loss, mut grad_w, mut grad_b, mut betas) = (0.0, vec![0.0; width], 0.0, vec![]);
        for i in 0..pairs {
            let h: Vec<f64> = (0..width).map(|k| hidden[[i, last[[i]] as usize, k]] as f64).collect();
            let rms = (h.iter().map(|x| x * x).sum::<f64>() / width as f64 + 1e-6).sqrt();
            let unit: Vec<f64> = h.iter().map(|x| x / rms).collect();
            let scale = 64.0 / width as f64;
            let z = unit.iter().zip(w.iter()).map(|(u, &wk)| u * wk as f64).sum::<f64>() * scale + bias;
            let beta = z.exp().ln_1p();
            let margin = (pl[[i]] - rl[[i]]) as f64 - (pl[[pairs + i]] - rl[[pairs + i]]) as f64;
            let u = beta * margin;
            loss += (-u).exp().ln_1p() / pairs as f64;
            // d loss / d z = -sigmoid(-u) * margin * sigmoid(z) / pairs
            let dz = -margin / (1.0 + u.exp()) / (1.0 + (-z).exp()) / pairs as f64;
            grad_b += dz;
            for k in 0..width {
                grad_w[k] += dz * unit[k] * scale;
            }
            betas.push(beta);
        }
        for layout in [Layout::Padded, Layout::Packed] {
            let (m, outs) = match train_graph_outputs(&model, &golden, objective.clone(), layout, MemoryOptions::default(), "normalized-head") {
                Ok(built) => built,
                Err(e) if layout == Layout::Packed && e.contains("cannot pack this model") => continue,
                Err(e) => panic!("{} {layout:?}: {e}", model.display()),
            };
            let spec = m.graph("train").unwrap();
            let label = format!("{} {layout:?}", model.display());
            let got_loss = outs[&spec.output("loss").unwrap().name][[]] as f64;
            assert!((got_loss - loss).abs() <= 1e-5 * loss.abs().max(1.0), "{label}: loss {got_loss} vs {loss}");
            let beta = &outs[&spec.output("beta").unwrap().name];
            for (i, &b) in betas.iter().enumerate() {
                assert!((beta[[i]] as f64 - b).abs() <= 1e-5 * b, "{label}: beta[{i}] {} vs {b}", beta[[i]]);
            }
            let gw = &outs[&spec.output_for("gradient", "beta_head.weight").unwrap().name];
            let err = gw.iter().zip(&grad_w).map(|(&g, e)| (g as f64 - e).powi(2)).sum::<f64>().sqrt();
            let scale = grad_w.iter().map(|e| e * e).sum::<f64>().sqrt();
            assert!(scale > 0.0 && err <= 1e-4 * scale, "{label}: head weight gradient off by {err:.2e} (norm {scale:.2e})");
            let gb = outs[&spec.output_for("gradient", "beta_head.bias").unwrap().name][[0]] as f64;
            assert!((gb - grad_b).abs() <= 1e-4 * grad_b.abs().max(1e-6), "{label}: head bias gradient {gb} vs {grad_b}");
        }
    }
}
