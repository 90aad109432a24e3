//! `build-graph`: from an exported causal LM to training artifacts. Phases:
//! raise an old opset → remove a KV cache → recognise the model → add LoRA adapters (`--lora-rank`) → append the objective → probe shapes → choose parameters → lift them to
//! inputs → matrix products in half precision (`--precision`: `graph::products_in_half`) → differentiate → build eval,
//! optimizer and inference graphs → store frozen weights in their dtype
//! (a half-precision model computes in float32 from the start: `graph::compute_in_float32`) → write all files into a
//! temporary directory that is renamed into place only when complete.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

use super::hf_export::map::{beside_model, HfMap, HF_MAP_FILE};
use super::kv_cache::{remove_kv_cache, CacheRemoval};
use super::lora::{self, LoraOptions};
use super::manifest::{GraphSpec, Manifest, ModelSpec, ParameterSpec, SpecDim, TensorSpec, FORMAT, FORMAT_VERSION, MANIFEST_FILE};
use super::model::{recognise, LmSignature};
use super::objective::{self, ModelTensors, Objective, COMPLETION_MASK, HEAD_BIAS, HEAD_WEIGHT, REF_LOGPS};
use super::packing::{self, Layout, LayoutChoice};
use super::params::{find_parameters, lift_parameters, InitializerRef, Param, Selection};
use super::{beta_dpo, epsilon_dpo, optimizer, reference_copy, BetaSource, ObjectiveConfig};
use crate::autodiff::differentiate;
use crate::graph::{
    cast_per_use, compute_in_float32, drop_exact_round_trips, materialize_deferred, probe_shapes, products_in_half, raise_to_scatter_add_opset, store_frozen,
    Builder, Graph, HalfOrigin, MixedPrecision, ProbeBatch, StoredWeights, TensorInfo,
};
use crate::onnx::{dtype, load_model_mapped, save_models_sharing_data, value_info, value_info_type, Dim, MappedData};
use crate::runtime::HostTensor;
use crate::store::{write_safetensors_raw, RawTensor};
use crate::{Error, Result};

pub const PARAMS_FILE: &str = "params.safetensors";

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
}

/// The synthetic batches of the two shape probes: 2 pairs x 6 tokens, then 3 pairs x 9 tokens.
fn probe_batch(sig: &LmSignature, vocab: i64) -> ProbeBatch {
    let make = |pairs: usize, t: usize| -> Vec<(String, HostTensor)> {
        let rows = 2 * pairs;
        let ids = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| ((ix[0] * 7 + ix[1] * 3 + 1) as i64) % vocab.max(2));
        // the last row is padded by two tokens; the answer starts at t/2
        let attn = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| i64::from(!(ix[0] == rows - 1 && ix[1] >= t - 2)));
        let comp = ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| {
            let pad = ix[0] == rows - 1 && ix[1] >= t - 2;
            if ix[1] >= t / 2 && !pad {
                1.0f32
            } else {
                0.0
            }
        });
        let mut v = vec![(sig.input_ids.clone(), HostTensor::I64(ids)), (sig.attention_mask.clone(), HostTensor::I64(attn))];
        if let Some(p) = &sig.position_ids {
            v.push((p.clone(), HostTensor::I64(ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| ix[1] as i64))));
        }
        v.push((COMPLETION_MASK.into(), HostTensor::F32(comp)));
        v.push((REF_LOGPS.into(), HostTensor::F32(ArrayD::zeros(IxDyn(&[rows])))));
        v
    };
    ProbeBatch { runs: [make(2, 6), make(3, 9)] }
}

fn vocab_size(graph: &Graph, sig: &LmSignature) -> i64 {
    let plausible = |v: i64| (1..=i32::MAX as i64).contains(&v);
    let out = graph.outputs.iter().find(|o| o.name == sig.logits);
    if let Some((_, Some(shape))) = out.and_then(value_info_type) {
        if let Some(&Dim::Fixed(v)) = shape.last() {
            if plausible(v) {
                return v;
            }
        }
    }
    let w = graph.initializer(&sig.lm_head).map(|t| t.dims.clone()).unwrap_or_default();
    w.iter().copied().find(|&d| d != sig.hidden_size && plausible(d)).unwrap_or(2)
}

fn lm_inputs(sig: &LmSignature) -> Vec<TensorSpec> {
    let token_ids = |name: &str, role: &str| TensorSpec::new(name, role, "int64", &[SpecDim::Named("rows"), SpecDim::Named("sequence")]);
    let mut v = vec![token_ids(&sig.input_ids, "input_ids"), token_ids(&sig.attention_mask, "attention_mask")];
    if let Some(p) = &sig.position_ids {
        v.push(token_ids(p, "position_ids"));
    }
    v
}

fn param_inputs(params: &[Param]) -> Vec<TensorSpec> {
    params.iter().filter(|p| p.trainable).map(|p| TensorSpec::float(&p.name, "parameter", &p.dims).of_parameter(&p.name)).collect()
}

fn metric_outputs(obj: &Objective, cfg: &ObjectiveConfig) -> Vec<TensorSpec> {
    let beta_shape = if cfg.beta_source == BetaSource::Sequence && cfg.has_head() { "rows" } else { "pairs" };
    let per = if beta_shape == "rows" { "sequence" } else { "pair" };
    let mut v = vec![
        TensorSpec::float(&obj.loss, "loss", &[]).described("mean preference loss (plus the beta regulariser)"),
        TensorSpec::float_named(&obj.chosen_rewards, "metric", &["pairs"])
            .described("rewards/chosen: beta x (policy - reference) log-prob of the chosen answer"),
        TensorSpec::float_named(&obj.rejected_rewards, "metric", &["pairs"]).described("rewards/rejected"),
        TensorSpec::float_named(&obj.policy_logps, "metric", &["rows"]).described("logps: policy log-prob of each row's answer"),
        TensorSpec::float_named(&obj.beta, "beta", &[beta_shape]).described(&format!("beta per {per}")),
    ];
    if let Some(bb) = &obj.beta_dpo {
        v.push(TensorSpec::float(&bb.stats_next, "margin_stats", &[2]).described("beta-DPO's running mean and std of the margin, after this batch"));
        v.push(TensorSpec::float_named(&bb.kept, "kept", &["pairs"]).described("1 for the pairs beta-DPO's filter keeps"));
    }
    if let Some(pb) = &obj.epsilon_dpo {
        v.extend(epsilon_dpo::outputs(pb));
    }
    v
}

fn set_outputs(graph: &mut Graph, specs: &[TensorSpec]) {
    graph.outputs = specs
        .iter()
        .map(|s| {
            let t = if s.dtype == "int64" { dtype::INT64 } else { dtype::FLOAT };
            let dims: Vec<Dim> = s
                .shape
                .iter()
                .map(|d| match d.as_i64() {
                    Some(v) => Dim::Fixed(v),
                    None => Dim::Sym(d.as_str().unwrap_or("").to_string()),
                })
                .collect();
            value_info(&s.name, t, &dims)
        })
        .collect();
}

pub fn build_artifacts(model_path: &Path, out_dir: &Path, opts: &BuildOptions) -> Result<BuildReport> {
    opts.objective.validate()?;
    check_lora_selection(opts)?;
    Manifest::claim_out_dir(out_dir)?;
    let (model, model_data) = load_model_mapped(model_path)?;
    let mut base = Graph::from_model(model)?;
    let half_origin = compute_in_float32(&mut base)?;
    let opset_raised_from = raise_to_scatter_add_opset(&mut base);
    let cache_removal = remove_kv_cache(&mut base)?;
    base.sort_topologically()?;
    let sig = recognise(&base, opts.hidden_state.as_deref())?;
    if !base.producers().contains_key(sig.hidden.as_str()) && !base.has_input(&sig.hidden) {
        return Err(Error::graph(format!("--hidden-state {}: no such tensor in the model", sig.hidden)));
    }
    let vocab = vocab_size(&base, &sig);
    let (hf_map, hf_map_skipped) = match beside_model(model_path, &base) {
        None => (None, None),
        Some(Ok(text)) => (Some(text), None),
        Some(Err(why)) => (None, Some(why)),
    };
    let lora = match &opts.lora {
        Some(l) => Some(lora::add_adapters(&mut base, &sig, l, &module_names(hf_map.as_deref()))?),
        None => None,
    };
    let cfg = &opts.objective;
    // Objective on top of the LM.
    let mut graph = base.clone();
    let mut not_packed_because = None;
    let packed = match opts.layout {
        LayoutChoice::Padded => None,
        LayoutChoice::Packed => Some(packing::make_packable(&mut graph, &sig)?),
        LayoutChoice::Auto => match packing::make_packable(&mut graph, &sig) {
            Ok(own_positions) => Some(own_positions),
            Err(Error::NotPackable(why)) => {
                graph = base.clone();
                not_packed_because = Some(why);
                None
            }
            Err(e) => return Err(e),
        },
    };
    let layout = if packed.is_some() { Layout::Packed } else { Layout::Padded };
    // epsilon-DPO reads the reference model's logits: a frozen copy of the model inside the graph
    let reference = match cfg.epsilon_dpo {
        Some(_) => Some(reference_copy::add_reference_copy(&mut graph, &sig)?),
        None => None,
    };
    let reference_tensors = reference.as_ref().map(|r| epsilon_dpo::reference_tensors(r, &sig, layout));
    let mut tensors = ModelTensors::of(&sig, true);
    tensors.layout = layout;
    tensors.reference = reference_tensors.as_ref();
    let mut batch_inputs = match packed {
        None => {
            let mut v = lm_inputs(&sig);
            v.push(TensorSpec::float_named(COMPLETION_MASK, "completion_mask", &["rows", "sequence"]));
            v
        }
        Some(own_positions) => packing::inputs::specs(&sig, own_positions),
    };
    batch_inputs.push(TensorSpec::float_named(REF_LOGPS, "ref_logps", &["rows"]));
    if cfg.beta_dpo.is_some() {
        batch_inputs.push(
            TensorSpec::float(beta_dpo::MARGIN_STATS, "margin_stats", &[2]).described("beta-DPO's running mean and std of the margin, before this batch"),
        );
        batch_inputs
            .push(TensorSpec::float_named(beta_dpo::SELECTION_NOISE, "selection_noise", &["pairs"]).described("standard Gumbel noise for beta-DPO's filter"));
    }
    if cfg.epsilon_dpo.is_some() {
        batch_inputs.push(epsilon_dpo::input_spec());
    }
    let mut names = graph.names.clone();
    let mut b = Builder::new(&mut names, objective::NODE_PREFIX);
    let obj = objective::build(&mut b, &tensors, cfg);
    graph.nodes.extend(b.take());
    graph.names = names;
    graph.inputs.extend(obj.inputs.iter().cloned());
    graph.initializers.extend(obj.head.iter().cloned());
    let mut outputs = metric_outputs(&obj, cfg);
    set_outputs(&mut graph, &outputs);
    graph.prune();

    let mut probes = match layout {
        Layout::Padded => probe_batch(&sig, vocab),
        Layout::Packed => packing::inputs::probe_batch(&batch_inputs, vocab, cfg),
    };
    if cfg.beta_dpo.is_some() {
        for (run, pairs) in probes.runs.iter_mut().zip([2, 3]) {
            run.extend(beta_dpo::probe_inputs(pairs));
        }
    }
    if let Some(e) = cfg.epsilon_dpo {
        for run in probes.runs.iter_mut() {
            run.extend(epsilon_dpo::probe_inputs(e.beta0));
        }
    }
    let mut infos = probe_shapes(&graph, &probes)?;
    let mut params = find_parameters(&graph, &obj.loss, &infos, &opts.selection)?;
    params.retain(|p| p.name != HEAD_WEIGHT && p.name != HEAD_BIAS);
    if let Some(l) = &lora {
        train_adapters_only(&mut params, l)?;
    }
    for t in &obj.head {
        params.push(Param {
            name: t.name.clone(),
            dims: t.dims.clone(),
            trainable: true,
            beta_head: true,
            initializers: vec![InitializerRef { name: t.name.clone(), transposed: false }],
        });
    }
    if !params.iter().any(|p| p.trainable) {
        return Err(Error::BadFlag { flag: "--train/--freeze".into(), detail: "no parameter is left trainable".into() });
    }
    if let Some(r) = &reference {
        reference_copy::freeze_reference(&mut graph, r, &params);
    }
    lift_parameters(&mut graph, &params, true);
    // before differentiation, so that the backward products are half precision too; the objective stays float32
    let half_products = products_in_half(&mut graph, &mut infos, opts.precision, |n| n.name.starts_with(objective::NODE_PREFIX));

    // eval: the same graph without gradients
    let mut eval = graph.clone();
    eval.prune();

    // train: gradients of the loss for each trainable parameter (scaled, in float16: see `train::loss_scale`)
    let trainable: Vec<String> = params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let mut eval_inputs = batch_inputs.clone();
    let differentiated = if opts.precision.precision.needs_loss_scale() {
        batch_inputs.push(TensorSpec::float(LOSS_SCALE, LOSS_SCALE, &[]).described("the train graph's gradients are of loss x loss_scale"));
        scale_loss(&mut graph, &mut infos, &obj.loss)
    } else {
        obj.loss.clone()
    };
    let grads = differentiate(&mut graph, &differentiated, &trainable, &infos)?;
    for (p, gname) in &grads.by_param {
        let dims = &params.iter().find(|x| &x.name == p).unwrap().dims;
        outputs.push(TensorSpec::float(gname, "gradient", dims).of_parameter(p));
    }
    set_outputs(&mut graph, &outputs);

    let mut train_inputs = batch_inputs;
    train_inputs.extend(param_inputs(&params));
    eval_inputs.extend(param_inputs(&params));
    order_inputs(&mut graph, &train_inputs);
    order_inputs(&mut eval, &eval_inputs);

    let mut infer = inference_graph(&base, &sig, cfg, &params)?;
    // the same products as the train graph's (its names are the model's), so that eval and infer agree;
    // the full-vocabulary lm_head, which the train graph does not have, stays float32 with the beta head
    products_in_half(&mut infer, &mut infos.clone(), opts.precision, |n| n.name.starts_with(INFER_HEAD_PREFIX));
    let param_specs: Vec<ParameterSpec> = params
        .iter()
        .map(|p| ParameterSpec {
            name: p.name.clone(),
            shape: p.dims.clone(),
            trainable: p.trainable,
            beta_head: p.beta_head,
            initializers: p.initializers.clone(),
            weight_decay: p.dims.len() >= 2 && !p.beta_head,
        })
        .collect();
    let grad_of: BTreeMap<String, String> = grads.by_param.iter().cloned().collect();
    let (opt_graph, opt_spec) = optimizer::build(&param_specs, |p| grad_of[p].clone());

    let eval_outputs: Vec<TensorSpec> = outputs.iter().filter(|o| o.role != "gradient").cloned().collect();
    let mut graphs = BTreeMap::new();
    graphs.insert("train".to_string(), GraphSpec { file: "train.onnx".into(), inputs: train_inputs.clone(), outputs: outputs.clone() });
    graphs.insert("eval".to_string(), GraphSpec { file: "eval.onnx".into(), inputs: eval_inputs, outputs: eval_outputs });
    graphs.insert("optimizer".to_string(), opt_spec);
    let mut infer_inputs = lm_inputs(&sig);
    infer_inputs.extend(param_inputs(&params));
    let infer_outputs = vec![
        TensorSpec::new(&sig.logits, "logits", "float32", &[SpecDim::Named("rows"), SpecDim::Named("sequence"), SpecDim::Fixed(vocab)]),
        TensorSpec::float_named("beta", "beta", &["rows"]),
    ];
    graphs.insert("infer".to_string(), GraphSpec { file: "infer.onnx".into(), inputs: infer_inputs, outputs: infer_outputs });

    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        betadpo_version: env!("CARGO_PKG_VERSION").into(),
        model: ModelSpec {
            source: model_path.display().to_string(),
            input_ids: sig.input_ids.clone(),
            attention_mask: sig.attention_mask.clone(),
            position_ids: sig.position_ids.clone(),
            logits: sig.logits.clone(),
            hidden_state: sig.hidden.clone(),
            hidden_size: sig.hidden_size,
            vocab_size: vocab,
            opset: base.opset(),
        },
        objective: cfg.clone(),
        layout,
        max_sequence_tokens: (layout == Layout::Packed).then_some(packing::VERIFIED_SEQUENCE_TOKENS),
        graphs,
        parameters: param_specs,
        parameters_file: PARAMS_FILE.into(),
        lora,
        precision: opts.precision.precision,
        precision_emulated: opts.precision.emulated,
    };
    let initial = initial_values(&base, &obj, &params, &half_origin)?;
    let frozen: HashSet<String> = params.iter().filter(|p| !p.trainable).flat_map(|p| p.initializers.iter().map(|r| r.name.clone())).collect();
    let mut stored = StoredWeights::default();
    let mut half_frozen = 0;
    for g in [&mut graph, &mut eval, &mut infer] {
        half_frozen = half_frozen.max(store_frozen(g, &frozen, opts.frozen_dtype, &half_origin, &mut stored)?);
        materialize_deferred(g, &half_origin, &mut stored)?;
        drop_exact_round_trips(g);
        cast_per_use(g);
    }
    let graphs = [("train", graph), ("eval", eval), ("optimizer", opt_graph), ("infer", infer)];
    write_all(out_dir, &manifest, graphs, &model_data, &initial, hf_map.as_deref())?;
    Ok(BuildReport {
        manifest,
        not_packed_because,
        cache_removal,
        opset_raised_from,
        parameter_table: super::params::describe(&params),
        backward_nodes: grads.nodes_added,
        out_dir: out_dir.to_path_buf(),
        hf_map_skipped,
        half_frozen,
        half_products,
    })
}

/// The prefix of the names of the nodes the inference graph adds to the model (its beta head).
const INFER_HEAD_PREFIX: &str = "beta/";

/// The train graph's input scaling the loss before differentiation (float16 precision).
pub const LOSS_SCALE: &str = "loss_scale";

/// Adds `loss x loss_scale` (a scalar input) to `graph` and returns its name: differentiating it seeds the
/// backward pass with the scale, so float16 gradients stay above float16's smallest normal.
fn scale_loss(graph: &mut Graph, infos: &mut crate::graph::TensorInfos, loss: &str) -> String {
    let mut names = std::mem::take(&mut graph.names);
    let mut b = Builder::new(&mut names, objective::NODE_PREFIX);
    let scaled = b.op("Mul", &[loss, LOSS_SCALE], vec![], "scaled_loss");
    graph.nodes.extend(b.take());
    graph.names = names;
    graph.inputs.push(value_info(LOSS_SCALE, dtype::FLOAT, &[]));
    for t in [LOSS_SCALE, &scaled] {
        infos.insert(t.to_string(), TensorInfo::fixed(dtype::FLOAT, &[]));
    }
    scaled
}

/// `--train`, `--freeze` and `--trainable head` choose among the model's weights, which LoRA freezes.
fn check_lora_selection(opts: &BuildOptions) -> Result<()> {
    let Some(l) = &opts.lora else { return Ok(()) };
    l.validate()?;
    let sel = &opts.selection;
    let flag = [(sel.train.is_some(), "--train"), (sel.freeze.is_some(), "--freeze"), (sel.head_only, "--trainable head")].into_iter().find(|(set, _)| *set);
    match flag {
        Some((_, flag)) => {
            Err(Error::BadFlag { flag: flag.into(), detail: "cannot be combined with --lora-rank (choose the adapted weights with --lora-targets)".into() })
        }
        None => Ok(()),
    }
}

/// PyTorch module names of the model's weights, from its Hugging Face name map (`x.weight` -> `x`).
fn module_names(hf_map: Option<&str>) -> std::collections::HashMap<String, String> {
    let Some(map) = hf_map.and_then(|text| HfMap::parse(text, Path::new(HF_MAP_FILE)).ok()) else { return Default::default() };
    let mut out = std::collections::HashMap::new();
    for t in &map.tensors {
        let Some(module) = t.name.strip_suffix(".weight") else { continue };
        for init in std::iter::once(&t.initializer).chain(t.tied_copies.iter().map(|c| &c.initializer)) {
            out.insert(init.clone(), module.to_string());
        }
    }
    out
}

/// With LoRA only the adapters and the beta head train: every model weight is frozen.
fn train_adapters_only(params: &mut [Param], spec: &lora::LoraSpec) -> Result<()> {
    for p in params.iter_mut().filter(|p| !p.beta_head) {
        p.trainable = spec.is_adapter(&p.name);
    }
    for name in spec.adapters.iter().flat_map(|a| [&a.a, &a.b]) {
        if !params.iter().any(|p| &p.name == name && p.trainable) {
            return Err(Error::graph(format!("LoRA parameter {name} does not reach the loss")));
        }
    }
    Ok(())
}

/// Graph inputs in the manifest's order (people read graphs in viewers too).
fn order_inputs(graph: &mut Graph, specs: &[TensorSpec]) {
    let pos = |n: &str| specs.iter().position(|s| s.name == n).unwrap_or(usize::MAX);
    graph.inputs.sort_by_key(|i| pos(&i.name));
}

/// The deployable graph: the LM plus the head reading each row's last non-padding token.
pub fn inference_graph(base: &Graph, sig: &LmSignature, cfg: &ObjectiveConfig, params: &[Param]) -> Result<Graph> {
    let mut g = base.clone();
    let mut names = g.names.clone();
    let mut b = Builder::new(&mut names, INFER_HEAD_PREFIX);
    let tensors = ModelTensors::of(sig, false);
    let constant = cfg.fixed_beta.or(cfg.beta_dpo.map(|d| d.beta0)).or(cfg.epsilon_dpo.map(|e| e.beta0));
    let beta = match constant {
        Some(f) => {
            let k = b.scalar(f, dtype::FLOAT);
            let rows = b.dim(&sig.input_ids, 0, "beta/rows");
            b.op("Expand", &[&k, &rows], vec![], "beta/fixed")
        }
        None => {
            // At inference there is no answer yet: the head reads the prompt's last token (or
            // averages over the prompt), which is the sequence rule with an empty completion.
            let head_cfg = ObjectiveConfig { beta_source: BetaSource::Sequence, ..cfg.clone() };
            let zero = crate::onnx::tensor_f32("", &[1], &[0.0]);
            let shape = b.op("Shape", &[&sig.input_ids], vec![], "beta/ids_shape");
            let no_answer = b.op("ConstantOfShape", &[&shape], vec![crate::onnx::attr_t("value", zero)], "beta/no_answer");
            objective::beta_head(&mut b, &tensors, &no_answer, &head_cfg)
        }
    };
    b.op_into("Identity", &[&beta], &["beta"], vec![]);
    g.nodes.extend(b.take());
    g.names = names;
    if cfg.has_head() {
        g.initializers.extend(objective::head_initial_values(sig.hidden_size, cfg));
    }
    let logits_vi = g.outputs.iter().find(|o| o.name == sig.logits).cloned().unwrap();
    g.outputs = vec![logits_vi, value_info("beta", dtype::FLOAT, &[Dim::Sym("rows".into())])];
    lift_parameters(&mut g, params, true);
    g.prune();
    Ok(g)
}

/// Initial values of every trainable parameter, read from the model (or the head's init): the
/// model's float32 bytes are passed through without a copy.
fn initial_values<'a>(base: &'a Graph, obj: &'a Objective, params: &'a [Param], half_origin: &HalfOrigin) -> Result<Vec<RawTensor<'a>>> {
    let mut out = Vec::new();
    for p in params.iter().filter(|p| p.trainable) {
        let t = base
            .initializer(&p.name)
            .or_else(|| obj.head.iter().find(|h| h.name == p.name))
            .ok_or_else(|| Error::graph(format!("no initial value for parameter {}", p.name)))?;
        let bytes = half_origin.float32_bytes(t)?;
        out.push(RawTensor { name: &p.name, shape: p.dims.iter().map(|&d| d as usize).collect(), bytes });
    }
    Ok(out)
}

/// Writes every file into `.<out>.partial-<pid>` (leftovers of killed builds are removed first), then swaps it into place, so `out` is either the
/// previous complete build or the new complete build, never a mix. The graphs share one copy of the frozen
/// weights (see `onnx::save_models_sharing_data`): the model's own data file, cloned, when they are unchanged and the file system shares blocks.
fn write_all<const N: usize>(
    out: &Path,
    manifest: &Manifest,
    graphs: [(&str, Graph); N],
    model_data: &[MappedData],
    params: &[RawTensor],
    hf_map: Option<&str>,
) -> Result<()> {
    // claimed again before the swap: the directory may have changed during the build
    crate::temp_files::write_dir(out, Manifest::claim_out_dir, |tmp| {
        let models = graphs.into_iter().map(|(which, g)| (manifest.graphs[which].file.clone(), g.into_model())).collect();
        save_models_sharing_data(tmp, models, model_data)?;
        write_safetensors_raw(&tmp.join(PARAMS_FILE), params, None)?;
        let text = serde_json::to_string_pretty(manifest).expect("manifest serialises");
        crate::onnx::write_atomic(&tmp.join(MANIFEST_FILE), |w| w.write_all(text.as_bytes()))?;
        if let Some(text) = hf_map {
            crate::onnx::write_atomic(&tmp.join(HF_MAP_FILE), |w| w.write_all(text.as_bytes()))?;
        }
        Ok(())
    })
}
