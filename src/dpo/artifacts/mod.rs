//! `build-graph`: from an exported causal LM to training artifacts, as a pipeline of named phases,
//! each in its own file with its own test:
//!
//! 1. [`load`]: load the model, normalise it (float32 compute, opset, no KV cache), recognise its signature
//! 2. [`hf_names`]: the Hugging Face name map beside the model
//! 3. [`adapters`]: LoRA adapters (`--lora-rank`)
//! 4. [`layout`]: packed or padded batches
//! 5. [`append_objective`]: the beta head, answer log-probs, loss and metrics
//! 6. [`probe`]: every tensor's shape, from two probe runs
//! 6a. [`attention_chunks`]: attention in query chunks against the keys each chunk sees (`--attention-chunks`)
//! 7. [`parameters`]: the trainable set, lifted to graph inputs
//! 8. `graph::products_in_half`: half-precision matrix products (`--precision`)
//! 9. [`differentiate`]: the eval graph, and the train graph with its reverse pass
//! 9a. [`gradient_order`]: each decoder block's weight gradients computed with the block, not at the end of the run (`--gradient-checkpointing`)
//! 9b. [`recompute`]: decoder blocks and vocabulary slices recomputed in the reverse pass (`--gradient-checkpointing`, `--vocab-chunk`)
//! 10. [`infer_graph`]: the deployable model with its head
//! 11. [`optimizer`]: the optimizer graph
//! 12. [`assemble_manifest`]: the manifest
//! 13. [`store_weights`]: initial values and frozen weights in their dtype
//! 14. [`write`]: every file, swapped into place only when complete
//!
//! A new transform is one new file and one new line in [`build_artifacts`].

pub mod adapters;
pub mod append_objective;
pub mod assemble_manifest;
pub mod attention_chunks;
pub mod differentiate;
pub mod gradient_order;
pub mod hf_names;
pub mod infer_graph;
pub mod layout;
pub mod load;
pub mod optimizer;
pub mod parameters;
pub mod probe;
pub mod recompute;
pub mod specs;
pub mod store_weights;
#[cfg(test)]
mod test_model;
pub mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::manifest::{GraphSpec, Manifest};
use super::model::kv_cache::CacheRemoval;
use super::model::lora::LoraOptions;
use super::model::params::Selection;
use super::objective;
use super::packing::LayoutChoice;
use super::ObjectiveConfig;
use crate::graph::{products_in_half, MixedPrecision};
use crate::run_layout::graph_file;
use crate::Result;

pub use differentiate::LOSS_SCALE;

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub objective: ObjectiveConfig,
    /// How batches are laid out in the train and eval graphs.
    pub layout: LayoutChoice,
    pub selection: Selection,
    pub hidden_state: Option<String>,
    /// The dtype frozen weights are stored in (`--frozen-dtype`); `None`: the model's own.
    pub frozen_dtype: Option<crate::onnx::DType>,
    /// Train LoRA adapters (and the beta head) instead of the model's weights.
    pub lora: Option<LoraOptions>,
    /// What the model's matrix products compute in (`--precision`; see `graph::products_in_half`).
    pub precision: MixedPrecision,
    /// Recomputation and vocabulary slicing (`--gradient-checkpointing`, `--vocab-chunk`).
    pub memory: recompute::MemoryOptions,
}

/// What a build produced, for the command line's summary.
pub struct BuildReport {
    pub manifest: Manifest,
    /// Why `LayoutChoice::Auto` chose the padded layout.
    pub not_packed_because: Option<String>,
    /// How the model's KV cache was removed (empty for a model exported without one).
    pub cache_removal: CacheRemoval,
    /// The model's opset when it was older than the graphs' (see `graph::raise_to_scatter_add_opset`).
    pub opset_raised_from: Option<i64>,
    pub parameter_table: String,
    pub backward_nodes: usize,
    pub out_dir: PathBuf,
    /// Why the Hugging Face name map beside the model was not copied (it belongs to another model).
    pub hf_map_skipped: Option<String>,
    /// How many frozen weights are stored in half precision, cast to float32 where they are read.
    pub half_frozen: usize,
    /// How many of the model's matrix products compute in half precision (`--precision`).
    pub half_products: usize,
    /// What the backward pass recomputes (`--gradient-checkpointing`, `--vocab-chunk`).
    pub recomputed: crate::graph::Recomputed,
    /// Decoder blocks whose weight gradients the backward pass computes with the block.
    pub ordered: crate::graph::Ordered,
    /// Attentions computed in query chunks (`--attention-chunks`).
    pub attention_chunked: usize,
}

pub fn build_artifacts(model_path: &Path, out_dir: &Path, opts: &BuildOptions) -> Result<BuildReport> {
    opts.objective.validate()?;
    adapters::check_selection(opts.lora.as_ref(), &opts.selection)?;
    Manifest::claim_out_dir(out_dir)?;
    let mut model = load::load(model_path, opts.hidden_state.as_deref())?;
    let hf = hf_names::find(model_path, &model.base, model.written_hf_map.take());
    let lora = adapters::add(&mut model.base, &model.sig, opts.lora.as_ref(), &hf.module_names())?;
    let mut laid = layout::choose(&model.base, &model.sig, opts.layout)?;
    let cfg = &opts.objective;
    let chunks = recompute::vocab_chunks(&opts.memory, &laid.graph, &model.sig, model.vocab);
    let sliced = chunks.is_some();
    let appended = append_objective::append(&mut laid, &model.sig, cfg, chunks)?;
    let mut infos = probe::probe(&laid.graph, laid.layout, &model.sig, model.vocab, &appended.batch_inputs, cfg)?;
    let attention_chunked = attention_chunks::attention_in_chunks(&mut laid.graph, &mut infos, opts.memory.attention_chunks);
    let params = parameters::select(&mut laid.graph, &appended.obj, &infos, &opts.selection, lora.as_ref(), appended.reference.as_ref())?;
    // before differentiation, so that the backward products are half precision too; the objective stays float32
    let half_products = products_in_half(&mut laid.graph, &mut infos, opts.precision, |n| n.name.starts_with(objective::NODE_PREFIX));
    let objectives = differentiate::Objectives { obj: &appended.obj, batch_inputs: &appended.batch_inputs, metric_outputs: &appended.outputs };
    let needs_loss_scale = opts.precision.precision.needs_loss_scale();
    let mut graphs = differentiate::train_and_eval(laid.graph, &mut infos, &params, objectives, needs_loss_scale)?;
    // with recomputation only: there it decides the peak; a plain graph keeps every block's activations
    // anyway (measured: no gain), and stays as it was, without empty tensors for other providers to meet
    let ordered = match opts.memory.gradient_checkpointing {
        true => gradient_order::weight_gradients_with_their_blocks(&mut graphs.train, &mut graphs.grads),
        false => Default::default(),
    };
    let recomputed = recompute::recompute_segments(&mut graphs.train, &graphs.grads, &opts.memory);
    let mut infer = infer_graph::inference_graph(&model.base, &model.sig, cfg, &params)?;
    // the same products as the train graph's (its names are the model's), so that eval and infer agree;
    // the full-vocabulary lm_head, which the train graph does not have, stays float32 with the beta head
    products_in_half(&mut infer, &mut infos.clone(), opts.precision, |n| n.name.starts_with(infer_graph::INFER_HEAD_PREFIX));
    let parameters = assemble_manifest::parameter_specs(&params);
    let grad_of: BTreeMap<String, String> = graphs.grads.by_param.iter().cloned().collect();
    let (opt_graph, opt_spec) = optimizer::build(&parameters, |p| grad_of[p].clone());
    let specs = graph_specs(&graphs, opt_spec, infer_graph::spec(&model.sig, model.vocab, &params));
    let manifest = assemble_manifest::assemble(assemble_manifest::ManifestParts {
        model_path,
        model: &model,
        objective: cfg,
        layout: laid.layout,
        graphs: specs,
        parameters,
        lora,
        precision: opts.precision,
        context_length: hf.context_length(),
        memory: opts.memory.spec(sliced, attention_chunked > 0),
    });
    let initial = store_weights::initial_values(&model.base, &appended.obj, &params, &model.half_origin)?;
    let half_frozen = store_weights::store_frozen_weights([&mut graphs.train, &mut graphs.eval, &mut infer], &params, opts.frozen_dtype, &model.half_origin)?;
    let backward_nodes = graphs.grads.nodes_added;
    let files = [("train", graphs.train), ("eval", graphs.eval), ("optimizer", opt_graph), ("infer", infer)];
    write::write_all(out_dir, &manifest, files, &model.data, &initial, hf.map.as_deref())?;
    Ok(BuildReport {
        manifest,
        not_packed_because: laid.not_packed_because,
        cache_removal: model.cache_removal,
        opset_raised_from: model.opset_raised_from,
        parameter_table: super::model::params::describe(&params),
        backward_nodes,
        out_dir: out_dir.to_path_buf(),
        hf_map_skipped: hf.skipped,
        half_frozen,
        half_products,
        recomputed,
        ordered,
        attention_chunked,
    })
}

/// The manifest's entry for each graph file.
fn graph_specs(g: &differentiate::TrainAndEval, optimizer: GraphSpec, infer: GraphSpec) -> BTreeMap<String, GraphSpec> {
    let eval_outputs = g.train_outputs.iter().filter(|o| o.role != "gradient").cloned().collect();
    let mut specs = BTreeMap::new();
    specs.insert("train".to_string(), GraphSpec { file: graph_file("train"), inputs: g.train_inputs.clone(), outputs: g.train_outputs.clone() });
    specs.insert("eval".to_string(), GraphSpec { file: graph_file("eval"), inputs: g.eval_inputs.clone(), outputs: eval_outputs });
    specs.insert("optimizer".to_string(), optimizer);
    specs.insert("infer".to_string(), infer);
    specs
}
