//! Recomputation (`--gradient-checkpointing`) and vocabulary slices (`--vocab-chunk`) change what the
//! train graph keeps, never what it computes: on every fixture family (GPT-2 TorchScript, Llama
//! dynamo, the repository's own models) the loss, log-probs and every gradient equal the plain
//! graph's within 1e-6 (relative), in both layouts; and the transform did recompute each block and
//! slice, with the backward pass no longer reading their intermediate tensors. Attention in query
//! chunks (`--attention-chunks`) likewise, alone and with the other two.

mod common;

use std::collections::HashMap;

use betadpo::dpo::artifacts::recompute::MemoryOptions;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BuildOptions, HeadInput, ObjectiveConfig};
use betadpo::onnx::load_model;
use betadpo::runtime::{OptLevel, SessionConfig};
use common::golden::{diff, golden_train_outputs_in, load_golden, norm};
use ndarray::ArrayD;

fn objective() -> ObjectiveConfig {
    // the raw hidden state, differentiated through: every model weight gets a gradient from both
    // the log-probs and the beta head
    ObjectiveConfig { head_input: HeadInput::Raw, detach_head_input: false, beta_reg: 0.0, ..Default::default() }
}

const PLAIN: MemoryOptions = MemoryOptions { gradient_checkpointing: false, vocab_chunk: 0, attention_chunks: 0 };
const RECOMPUTED: MemoryOptions = MemoryOptions { gradient_checkpointing: true, vocab_chunk: 0, attention_chunks: 0 };
/// 512-word fixtures: slices of 100 words (the last one 12), so the ragged last slice is covered.
const BOTH: MemoryOptions = MemoryOptions { gradient_checkpointing: true, vocab_chunk: 100, attention_chunks: 0 };
/// Three query chunks: uneven and, at the golden batches' lengths, of different sizes.
const ATTENTION_CHUNKS: MemoryOptions = MemoryOptions { gradient_checkpointing: false, vocab_chunk: 0, attention_chunks: 3 };
const RECOMPUTED_IN_CHUNKS: MemoryOptions = MemoryOptions { gradient_checkpointing: true, vocab_chunk: 0, attention_chunks: 3 };
/// Everything at once, the attention chunks recomputed inside each block.
const ALL: MemoryOptions = MemoryOptions { gradient_checkpointing: true, vocab_chunk: 100, attention_chunks: 3 };

fn outputs(model: &std::path::Path, layout: LayoutChoice, memory: MemoryOptions, tag: &str) -> Option<HashMap<String, ArrayD<f32>>> {
    let golden = load_golden(model);
    let opts = BuildOptions { objective: objective(), layout, memory, ..Default::default() };
    // one thread (a multi-threaded run's reductions differ from run to run in the last bits) and
    // no fusions (ONNX Runtime fuses a recomputed block's nodes differently from the forward's):
    // the graphs' own arithmetic, compared
    let one_thread = SessionConfig { intra_threads: Some(1), optimization: OptLevel::Disable, ..Default::default() };
    match golden_train_outputs_in(model, &golden, &opts, tag, one_thread) {
        Ok((_, outs)) => Some(outs),
        // models the packed layout refuses are covered by tests/golden.rs
        Err(e) if e.contains("cannot pack this model") => None,
        Err(e) => panic!("{}: {e}", model.display()),
    }
}

/// Compares `memory`'s outputs with the plain graph's on every fixture model in both layouts: each
/// output within `each` (relative), all of them together within `all`.
fn compare_with_plain(memory: MemoryOptions, each: f64, all: f64, tag: &str) {
    let models = common::fixtures::all_models();
    assert!(models.len() >= 3, "fixture models missing: {models:?}");
    for model in &models {
        for layout in [LayoutChoice::Padded, LayoutChoice::Packed] {
            let Some(plain) = outputs(model, layout, PLAIN, &format!("{tag}-plain")) else { continue };
            let other = outputs(model, layout, memory.clone(), tag).expect("the plain build packed");
            let label = format!("{} {layout:?}", model.display());
            let largest = plain.values().map(norm).fold(0.0, f64::max);
            let (mut d2, mut n2) = (0.0, 0.0);
            for (name, want) in &plain {
                let got = &other[name];
                // gradients that are zero in exact arithmetic hold rounding noise on both sides
                let r = diff(got, want) / norm(want).max(1e-6 * largest);
                assert!(r <= each, "{label}: {name} differs by {r:.2e} (relative; norm {:.3e})", norm(want));
                d2 += diff(got, want).powi(2);
                n2 += norm(want).powi(2);
            }
            let r = (d2 / n2).sqrt();
            assert!(r <= all, "{label}: all outputs together differ by {r:.2e} (relative)");
        }
    }
}

/// Recomputation runs the same ops on the same inputs: the same values (to rounding).
#[test]
fn recomputed_graphs_give_the_plain_graphs_values() {
    compare_with_plain(RECOMPUTED, 1e-6, 1e-6, "recomputed");
}

/// Query chunks leave out only keys the causal mask gives zero weight, so each softmax sums the
/// same nonzero terms: the same values to rounding.
#[test]
fn attention_in_query_chunks_gives_the_plain_graphs_values() {
    compare_with_plain(ATTENTION_CHUNKS, 1e-6, 1e-6, "attention-chunks");
}

/// Vocabulary slices compute the log-sum-exp in another order (per slice, then across slices) and
/// the label's logit as a dot product: loss, log-probs and the gradients as a whole within 1e-6;
/// single small gradients that nearly cancel (GPT-2's first layer norm, norm 4e-4 against 2e2 for
/// the largest) within 1e-5.
#[test]
fn sliced_and_recomputed_graphs_give_the_plain_graphs_values() {
    let models = common::fixtures::all_models();
    let golden = load_golden(&models[0]);
    let opts = BuildOptions { objective: objective(), layout: LayoutChoice::Padded, memory: BOTH, ..Default::default() };
    let (m, outs) = golden_train_outputs_in(&models[0], &golden, &opts, "logps", SessionConfig::default()).unwrap();
    let logps = &outs[&m.graph("train").unwrap().outputs.iter().find(|o| o.role == "metric" && o.name == "policy_logps").unwrap().name];
    assert!(
        diff(logps, &golden.f32s["policy_logps"]) / norm(&golden.f32s["policy_logps"]) < 1e-6,
        "log-probs {logps} vs PyTorch's {}",
        golden.f32s["policy_logps"]
    );
    compare_with_plain(BOTH, 1e-5, 1e-6, "sliced");
}

/// Query chunks, recomputed blocks and vocabulary slices together (what a long-row build uses).
#[test]
fn every_memory_option_together_gives_the_plain_graphs_values() {
    compare_with_plain(ALL, 1e-5, 1e-6, "all-options");
}

/// The forward tensors the train graph's backward pass (the nodes from the first `grad/` one on,
/// less the recomputed copies) reads, by the op that produced them.
fn backward_reads_of_forward(train: &std::path::Path) -> Vec<(String, String)> {
    let g = load_model(train).unwrap().graph.unwrap();
    let first_backward = g.node.iter().position(|n| n.name.starts_with("grad/")).unwrap();
    let op_of: HashMap<&str, &str> = g.node[..first_backward].iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n.op_type.as_str()))).collect();
    let mut reads: Vec<(String, String)> = g.node[first_backward..]
        .iter()
        .filter(|n| !n.name.starts_with("recomputed/"))
        .flat_map(|n| n.input.iter())
        .filter_map(|x| op_of.get(x.as_str()).map(|op| (x.clone(), op.to_string())))
        .collect();
    reads.sort();
    reads.dedup();
    reads
}

/// With both options the backward pass reads no product and no attention probabilities from the
/// forward pass (the model's, and the vocabulary slices' logits): their copies are recomputed.
#[test]
fn the_backward_pass_reads_recomputed_blocks_and_slices() {
    let models: Vec<_> = ["tiny-gpt2-ts", "tiny-llama-dynamo"].into_iter().filter_map(common::fixtures::shared).collect();
    if models.len() < 2 {
        common::fixtures::skip("the shared fixtures are missing");
        return;
    }
    for model in models {
        let build = |memory: MemoryOptions, tag: &str| {
            let out = common::fixtures::scratch(&format!("recompute-reads-{tag}-{}", model.file_name().unwrap().to_string_lossy()));
            let opts = BuildOptions { objective: objective(), layout: LayoutChoice::Padded, memory, ..Default::default() };
            let report = build_artifacts(&model.join("model.onnx"), &out, &opts).unwrap();
            let reads = backward_reads_of_forward(&out.join("train.onnx"));
            let _ = std::fs::remove_dir_all(&out);
            (report.recomputed, reads, report.attention_chunked)
        };
        let big = |reads: &[(String, String)]| reads.iter().filter(|(_, op)| ["MatMul", "Gemm", "Softmax"].contains(&op.as_str())).count();
        let (plain, plain_reads, _) = build(PLAIN, "plain");
        let (both, both_reads, _) = build(BOTH, "both");
        let (_, all_reads, chunked) = build(ALL, "all");
        assert_eq!(chunked, 2, "{}: both blocks' attentions in query chunks", model.display());
        assert_eq!(big(&all_reads), 0, "{}: still kept with attention chunks: {all_reads:?}", model.display());
        assert_eq!(plain.segments, 0);
        // 2 decoder blocks and 6 vocabulary slices
        assert_eq!(both.segments, 8, "{}: {both:?}", model.display());
        assert!(big(&plain_reads) >= 8, "{}: the plain graph keeps {plain_reads:?}", model.display());
        assert_eq!(big(&both_reads), 0, "{}: still kept: {both_reads:?}", model.display());
    }
}

/// A model betadpo writes from a Hugging Face folder (`build-graph --model DIR`) has its decoder blocks
/// found by the recompute phase (the importer names every weight `model.layers.N.`, GPT-2's `h.N.`) and
/// its attentions by the query-chunk phase: one segment and one chunked attention per layer of
/// `config.json`, and the graph gives the plain graph's values, on every family the importer writes
/// (soft-capped, sliding-window and biased attentions among them).
#[test]
fn imported_models_recompute_each_decoder_block() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let mut folders: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.path()).collect();
    folders.sort();
    assert!(folders.len() >= 8, "HF fixture folders missing: {folders:?}");
    for folder in folders {
        let name = folder.file_name().unwrap().to_string_lossy().to_string();
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
        let layers = config["num_hidden_layers"].as_u64().or(config["n_layer"].as_u64()).unwrap() as usize;
        let out = common::fixtures::scratch(&format!("recompute-imported-{name}"));
        let opts = BuildOptions { objective: objective(), layout: LayoutChoice::Padded, memory: RECOMPUTED_IN_CHUNKS, ..Default::default() };
        let report = build_artifacts(&folder, &out, &opts).unwrap();
        assert_eq!(report.recomputed.segments, layers, "{name}: {:?}", report.recomputed);
        assert_eq!(report.attention_chunked, layers, "{name}");
        let recorded = &report.manifest.memory;
        assert!(recorded.gradient_checkpointing && recorded.attention_chunks == 3 && recorded.vocab_chunk == 0, "{name}: {recorded:?}");

        let plain = outputs(&folder, LayoutChoice::Padded, PLAIN, &format!("imported-plain-{name}")).unwrap();
        let recomputed = outputs(&folder, LayoutChoice::Padded, RECOMPUTED_IN_CHUNKS, &format!("imported-recomputed-{name}")).unwrap();
        let largest = plain.values().map(norm).fold(0.0, f64::max);
        for (output, want) in &plain {
            let r = diff(&recomputed[output], want) / norm(want).max(1e-6 * largest);
            assert!(r <= 1e-6, "{name}: {output} differs by {r:.2e} (relative)");
        }
    }
}

/// Each decoder block is found whole in an imported model with LoRA adapters: every product and sum
/// of layer N's forward pass falls in block N (the importer writes layer N+1's weight transposes among
/// layer N's nodes; a block once started at one of them, and took in the rest of layer N: one
/// Llama-3.2-1B-shaped block in place of sixteen, so recomputation kept nearly everything).
#[test]
fn imported_lora_models_are_cut_at_their_layers() {
    use betadpo::dpo::model::lora::LoraOptions;
    use betadpo::graph::{decoder_blocks, layer_index, Graph};
    for family in ["llama", "qwen2", "gpt2"] {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(family);
        let out = common::fixtures::scratch(&format!("recompute-lora-{family}"));
        let lora = Some(LoraOptions { rank: 2, alpha: None, dropout: 0.0, targets: None });
        let opts = BuildOptions { objective: objective(), layout: LayoutChoice::Packed, memory: RECOMPUTED_IN_CHUNKS, lora, ..Default::default() };
        build_artifacts(&folder, &out, &opts).unwrap();
        let g = Graph::from_model(load_model(&out.join("train.onnx")).unwrap()).unwrap();
        let forward_len = g.nodes.iter().position(|n| n.name.starts_with("grad/") || n.name.starts_with("recomputed/")).unwrap();
        let blocks = decoder_blocks(&g, forward_len);
        let producer: HashMap<&str, &str> =
            g.nodes[..forward_len].iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n.op_type.as_str()))).collect();
        let mut checked = 0;
        for (i, n) in g.nodes[..forward_len].iter().enumerate() {
            let computes = matches!(n.op_type.as_str(), "MatMul" | "Gemm" | "Add" | "Softmax");
            let Some(layer) = layer_index(&n.name).filter(|_| computes) else { continue };
            // a product of two activations, or of an activation and a weight (a weight arrives as itself or transposed, or cast per use)
            let reads_activation = n.input.iter().any(|x| producer.get(x.as_str()).is_some_and(|op| !matches!(*op, "Transpose" | "Cast" | "Constant")));
            if !reads_activation {
                continue;
            }
            let block = blocks.iter().position(|b| b.contains(&i));
            assert_eq!(block, Some(layer), "{family}: {} (layer {layer}) is in block {block:?} of {}", n.name, blocks.len());
            checked += 1;
        }
        assert!(checked > 10, "{family}: only {checked} nodes checked");
    }
}

/// The vocabulary slices are recomputed one at a time: each slice's logits are recomputed only once
/// every reader of the previous slice's logits gradient has run (its lm_head and hidden-state
/// gradients), so no runtime can hold all slices' logits gradients at once (ONNX Runtime did: five of
/// SmolLM2's six at the peak of a 2 x 1,024-token step).
#[test]
fn vocabulary_slices_are_recomputed_one_at_a_time() {
    for model in common::fixtures::all_models() {
        slices_wait_for_each_other(&model);
    }
}

fn slices_wait_for_each_other(model: &std::path::Path) {
    let name = model.file_name().unwrap().to_string_lossy().to_string();
    let out = common::fixtures::scratch(&format!("recompute-slices-in-turn-{name}"));
    let opts = BuildOptions { objective: objective(), layout: LayoutChoice::Padded, memory: BOTH, ..Default::default() };
    let path = if model.is_dir() { model.join("model.onnx") } else { model.to_path_buf() };
    build_artifacts(&path, &out, &opts).unwrap();
    let g = load_model(&out.join("train.onnx")).unwrap().graph.unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let producer: HashMap<&str, usize> = g.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    // the nodes node `start` is computed from
    let ancestors = |start: usize| {
        let (mut seen, mut stack) = (std::collections::HashSet::new(), vec![start]);
        while let Some(i) = stack.pop() {
            for p in g.node[i].input.iter().filter_map(|x| producer.get(x.as_str())) {
                if seen.insert(*p) {
                    stack.push(*p);
                }
            }
        }
        seen
    };
    let named = |suffix: String| g.node.iter().position(|n| n.name.ends_with(&suffix)).unwrap_or_else(|| panic!("{name}: no node {suffix}"));
    // in the forward pass, slice k + 1's product runs only once slice k's logits are reduced and picked from
    for k in 0..5 {
        let product = named(format!("dpo/dpo/vocab_chunk{}/logits", k + 1));
        let before = ancestors(product);
        for reader in ["log_sum_exp", "label_logit"] {
            let r = g.node.iter().position(|n| n.name == format!("dpo/dpo/vocab_chunk{k}/{reader}")).unwrap();
            assert!(before.contains(&r), "{name}: slice {} is computed before slice {k}'s {reader}", k + 1);
        }
    }
    // the backward pass reaches the last slice first: slice k is recomputed after slice k + 1's
    // logits gradient has been read by all its readers
    for k in 0..5 {
        let copy = named(format!("recomputed/dpo/dpo/vocab_chunk{k}/logits"));
        let gradient = &g.node[named(format!("grad/dpo/vocab_chunk{}/logits_grad", k + 1))].output[0];
        let before = ancestors(copy);
        let readers: Vec<usize> = (0..g.node.len()).filter(|&r| g.node[r].input.contains(gradient)).collect();
        assert!(!readers.is_empty());
        for r in readers {
            assert!(before.contains(&r), "{name}: slice {k} is recomputed before {} has read {gradient}", g.node[r].name);
        }
    }
}

/// `build-graph`'s memory defaults, read back from the manifest: nothing recomputed or cut without
/// `--gradient-checkpointing`; with it, 8 query chunks per attention and 8,192-word vocabulary slices
/// (not applied to a 512-word vocabulary); either option given on its own wins.
#[test]
fn build_graph_memory_defaults_follow_gradient_checkpointing() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let cases: [(&[&str], (bool, u64, u64)); 4] = [
        (&[], (false, 0, 0)),
        (&["--gradient-checkpointing"], (true, 8, 0)),
        (&["--gradient-checkpointing", "--vocab-chunk", "100", "--attention-chunks", "3"], (true, 3, 100)),
        (&["--vocab-chunk", "100"], (false, 0, 100)),
    ];
    for (k, (flags, (gc, attention, vocab))) in cases.into_iter().enumerate() {
        let out = common::fixtures::scratch(&format!("memory-defaults-{k}"));
        let mut args = vec!["build-graph", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"];
        args.extend_from_slice(flags);
        let (code, _, err) = common::cli::betadpo(&args);
        assert_eq!(code, 0, "{flags:?}: {err}");
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let memory = &manifest["memory"];
        let got = (memory["gradient_checkpointing"].as_bool().unwrap(), memory["attention_chunks"].as_u64().unwrap(), memory["vocab_chunk"].as_u64().unwrap());
        assert_eq!(got, (gc, attention, vocab), "{flags:?}: {memory}");
    }
}
