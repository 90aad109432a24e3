//! `betadpo build-graph`: its flags, and the library's build options made from them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use betadpo::dpo::artifacts::recompute::MemoryOptions;
use betadpo::dpo::model::lora::LoraOptions;
use betadpo::dpo::model::params::Selection;
use betadpo::dpo::packing::LayoutChoice;
use betadpo::dpo::{build_artifacts, BetaAggregate, BetaDpoConfig, BetaSource, BuildOptions, EpsilonDpoConfig, HeadInput, LossKind, ObjectiveConfig};
use betadpo::graph::{MixedPrecision, Precision};
use betadpo::onnx::dtype;

#[derive(clap::Args)]
pub struct Args {
    /// The model: a Hugging Face causal-LM folder (config.json + safetensors; betadpo writes its graph,
    /// docs/hf-import.md), or an exported ONNX file (external data next to it is found automatically).
    #[arg(long)]
    model: PathBuf,
    /// Output directory for the artifacts: created, or an earlier build there replaced atomically (any
    /// other non-empty directory is refused).
    #[arg(long)]
    out: PathBuf,
    /// Where beta is read: `prompt` (last prompt token, one beta per pair) or `sequence`.
    #[arg(long, value_enum, default_value = "prompt")]
    beta_source: BetaSource,
    /// `last` token, or `mean` of the head over the tokens.
    #[arg(long, value_enum, default_value = "last")]
    beta_aggregate: BetaAggregate,
    /// Every context's beta at initialisation.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.1)]
    beta_init: f64,
    /// Lower bound on beta (added to the softplus, so it never blocks the gradient).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    beta_min: f64,
    /// Upper bound on beta, approached smoothly (`inf` for none).
    #[arg(long, allow_negative_numbers = true, default_value = "2.0")]
    beta_max: f64,
    /// Weight of the regulariser mean((log beta - log beta_init)^2).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    beta_reg: f64,
    /// What the head reads: the state `normalized` to unit RMS, its product scaled by 64 / width (one
    /// head step then moves beta alike at every model width), or the `raw` hidden state.
    #[arg(long, value_enum, default_value = "normalized")]
    head_input: HeadInput,
    /// Whether the DPO loss reaches the model through the beta head: `detached` (the head reads the
    /// hidden state behind a stop-gradient: the loss trains the head, but cannot move the model's
    /// states to change beta) or `joint`.
    #[arg(long, value_enum, default_value = "detached")]
    head_gradient: HeadGradientArg,
    /// Preference loss.
    #[arg(long, value_enum, default_value = "sigmoid")]
    loss: LossKind,
    /// Label smoothing (conservative DPO), in [0, 0.5).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Where beta comes from: the `learned` head (default), a `fixed` constant (--fixed-beta, 0.1
    /// unless given), `beta-dpo` (Wu et al. 2024: one beta per batch from its reward margins,
    /// with the margin filter), or `epsilon-dpo` (Lee et al. 2025: a per-pair beta from the policy's
    /// perturbation towards and away from the reference, starting at --beta-init; the train graph
    /// holds a frozen copy of the model as the reference).
    #[arg(long, value_enum)]
    beta_method: Option<MethodArg>,
    /// Standard DPO with this constant beta and no head (implies --beta-method fixed).
    #[arg(long, allow_negative_numbers = true)]
    fixed_beta: Option<f64>,
    /// beta-DPO's beta_0: the batch beta is beta_0 (1 + alpha (mean kept margin - M_0)).
    #[arg(long, allow_negative_numbers = true)]
    beta_dpo_beta0: Option<f64>,
    /// beta-DPO's alpha (the paper's example: 0.6).
    #[arg(long, allow_negative_numbers = true)]
    beta_dpo_alpha: Option<f64>,
    /// beta-DPO's rho: the fraction of each batch its margin filter leaves out (0.2).
    #[arg(long, allow_negative_numbers = true)]
    beta_dpo_rho: Option<f64>,
    /// Momentum of beta-DPO's moving averages of the margin's mean M_0 and spread (0.9).
    #[arg(long, allow_negative_numbers = true)]
    beta_dpo_momentum: Option<f64>,
    /// epsilon-DPO's epsilon: the perturbation size and the relative step of beta (0.01).
    #[arg(long, allow_negative_numbers = true)]
    epsilon: Option<f64>,
    /// Name of the final hidden state, when it cannot be found automatically.
    #[arg(long)]
    hidden_state: Option<String>,
    /// Freeze parameters whose initializer name matches this regex.
    #[arg(long)]
    freeze: Option<String>,
    /// Train only parameters whose initializer name matches this regex.
    #[arg(long)]
    train: Option<String>,
    /// `all` model parameters (default) or only the beta `head`.
    #[arg(long, value_enum, default_value = "all")]
    trainable: TrainableArg,
    /// The dtype frozen weights are stored in, cast to float32 where they are read (compute, trainable
    /// parameters, gradients and AdamW moments stay float32). Default: the model's own dtype.
    #[arg(long, value_enum)]
    frozen_dtype: Option<FrozenDtypeArg>,
    /// Train LoRA adapters of this rank (and the beta head) instead of the model's weights, which
    /// stay frozen.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA's alpha: the adapters' product is scaled by alpha / rank (default 2 x rank).
    #[arg(long, allow_negative_numbers = true)]
    lora_alpha: Option<f64>,
    /// Dropout on the adapters' input (only 0 is supported yet).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Adapt the weights whose initializer or module name matches this regex (default: every
    /// MatMul/Gemm weight inside the transformer blocks, not the embedding or lm_head).
    #[arg(long)]
    lora_targets: Option<String>,
    /// What the model's matrix products (attention's included) compute in: `bf16` or `fp16` (operands cast
    /// to half where read, results cast back to float32; parameters, gradients, AdamW moments, norms,
    /// softmax, the lm_head over the answers, the beta head and the loss stay float32; `fp16` also scales
    /// the loss, see `train`), or `fp32` (default).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// With `--precision bf16|fp16`: round operands and results to half but multiply in float32, which
    /// gives a tensor core's numbers on a CPU (whose ONNX Runtime has no bfloat16 products). For checks.
    #[arg(long)]
    emulate_half: bool,
    /// How a batch enters the train graph: `packed` rows, where each pair's prompt is computed once
    /// and no padding sits between sequences (same results, fewer tokens; needs a model whose
    /// attention mask can be replaced), `padded` rows (TRL's layout), or `auto`: packed when the
    /// model allows it.
    #[arg(long, value_enum, default_value = "auto")]
    layout: LayoutChoice,
    /// Recompute each decoder block's forward pass in the backward pass (found by the layer index
    /// in the model's node or weight names), so only block inputs are kept between the two: less
    /// memory at long rows for about a third more compute. See docs/long-sequences.md.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Words per vocabulary slice of the answer log-probs: the lm_head, log-sum-exp and gradient
    /// run one slice at a time (recomputed in the backward pass), so no [answer tokens, vocab]
    /// tensor exists. 0 computes the whole vocabulary at once. Default: 8192 with
    /// --gradient-checkpointing (long rows), else 0. See docs/long-sequences.md.
    #[arg(long)]
    vocab_chunk: Option<i64>,
    /// Compute each attention in this many query chunks, each against only the keys its causal
    /// queries see: no [rows, heads, T, T] tensor exists, about half the attention products go, and
    /// the backward pass keeps half the probabilities. 0 or 1: whole. Default: 8 with
    /// --gradient-checkpointing (long rows), else whole. See docs/long-sequences.md.
    #[arg(long)]
    attention_chunks: Option<usize>,
    /// Print less.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum MethodArg {
    Learned,
    Fixed,
    BetaDpo,
    EpsilonDpo,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum FrozenDtypeArg {
    Bfloat16,
    Float16,
    Float32,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum HeadGradientArg {
    Detached,
    Joint,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum TrainableArg {
    All,
    Head,
}

fn regex(flag: &str, v: &Option<String>) -> Result<Option<regex::Regex>> {
    v.as_ref()
        .map(|s| regex::Regex::new(s).map_err(|e| betadpo::Error::BadFlag { flag: flag.into(), detail: format!("{s:?} is not a valid regex ({e})") }.into()))
        .transpose()
}

/// What `--beta-method` chose, with the flags it reads.
struct Method {
    fixed_beta: Option<f64>,
    beta_dpo: Option<BetaDpoConfig>,
    epsilon_dpo: Option<EpsilonDpoConfig>,
}

fn beta_method(a: &Args) -> Result<Method> {
    let method = a.beta_method.unwrap_or(if a.fixed_beta.is_some() { MethodArg::Fixed } else { MethodArg::Learned });
    let dpo_flags = [
        ("--beta-dpo-beta0", a.beta_dpo_beta0),
        ("--beta-dpo-alpha", a.beta_dpo_alpha),
        ("--beta-dpo-rho", a.beta_dpo_rho),
        ("--beta-dpo-momentum", a.beta_dpo_momentum),
    ];
    if method != MethodArg::BetaDpo {
        if let Some((flag, _)) = dpo_flags.iter().find(|(_, v)| v.is_some()) {
            anyhow::bail!(betadpo::Error::BadFlag { flag: (*flag).into(), detail: "needs --beta-method beta-dpo".into() });
        }
    }
    if method != MethodArg::EpsilonDpo && a.epsilon.is_some() {
        anyhow::bail!(betadpo::Error::BadFlag { flag: "--epsilon".into(), detail: "needs --beta-method epsilon-dpo".into() });
    }
    if method != MethodArg::Fixed && a.fixed_beta.is_some() {
        anyhow::bail!(betadpo::Error::BadFlag { flag: "--fixed-beta".into(), detail: "needs --beta-method fixed (or no --beta-method)".into() });
    }
    let none = Method { fixed_beta: None, beta_dpo: None, epsilon_dpo: None };
    Ok(match method {
        MethodArg::Learned => none,
        MethodArg::Fixed => Method { fixed_beta: Some(a.fixed_beta.unwrap_or(0.1)), ..none },
        MethodArg::EpsilonDpo => {
            let epsilon_dpo = EpsilonDpoConfig { beta0: a.beta_init, epsilon: a.epsilon.unwrap_or(EpsilonDpoConfig::default().epsilon) };
            Method { epsilon_dpo: Some(epsilon_dpo), ..none }
        }
        MethodArg::BetaDpo => {
            let d = BetaDpoConfig::default();
            let cfg = BetaDpoConfig {
                beta0: a.beta_dpo_beta0.unwrap_or(d.beta0),
                alpha: a.beta_dpo_alpha.unwrap_or(d.alpha),
                rho: a.beta_dpo_rho.unwrap_or(d.rho),
                momentum: a.beta_dpo_momentum.unwrap_or(d.momentum),
            };
            Method { beta_dpo: Some(cfg), ..none }
        }
    })
}

pub fn options(a: &Args) -> Result<BuildOptions> {
    let Method { fixed_beta, beta_dpo, epsilon_dpo } = beta_method(a)?;
    let objective = ObjectiveConfig {
        beta_source: a.beta_source,
        beta_aggregate: a.beta_aggregate,
        beta_init: a.beta_init,
        beta_min: a.beta_min,
        beta_max: a.beta_max,
        beta_reg: a.beta_reg,
        head_input: a.head_input,
        detach_head_input: a.head_gradient == HeadGradientArg::Detached,
        loss: a.loss,
        label_smoothing: a.label_smoothing,
        fixed_beta,
        beta_dpo,
        epsilon_dpo,
    };
    objective.validate()?;
    let selection =
        Selection { freeze: regex("--freeze", &a.freeze)?, train: regex("--train", &a.train)?, head_only: matches!(a.trainable, TrainableArg::Head) };
    if selection.head_only && !objective.has_head() {
        anyhow::bail!(betadpo::Error::BadFlag {
            flag: "--trainable head".into(),
            detail: "with --fixed-beta, beta-dpo or epsilon-dpo there is no head to train".into()
        });
    }
    let layout = a.layout;
    let frozen_dtype = a.frozen_dtype.map(|d| match d {
        FrozenDtypeArg::Bfloat16 => dtype::BFLOAT16,
        FrozenDtypeArg::Float16 => dtype::FLOAT16,
        FrozenDtypeArg::Float32 => dtype::FLOAT,
    });
    let precision = Precision::parse("--precision", &a.precision)?;
    if a.emulate_half && precision == Precision::Fp32 {
        anyhow::bail!(betadpo::Error::BadFlag { flag: "--emulate-half".into(), detail: "needs --precision bf16 or fp16".into() });
    }
    let precision = MixedPrecision { precision, emulated: a.emulate_half };
    if a.vocab_chunk.is_some_and(|c| c < 0) {
        anyhow::bail!(betadpo::Error::BadFlag { flag: "--vocab-chunk".into(), detail: "must be 0 (off) or a number of words".into() });
    }
    let defaults = if a.gradient_checkpointing { MemoryOptions::long_rows() } else { MemoryOptions::default() };
    let memory = MemoryOptions {
        gradient_checkpointing: a.gradient_checkpointing,
        vocab_chunk: a.vocab_chunk.unwrap_or(defaults.vocab_chunk),
        attention_chunks: a.attention_chunks.unwrap_or(defaults.attention_chunks),
    };
    Ok(BuildOptions { objective, layout, selection, hidden_state: a.hidden_state.clone(), lora: lora(a)?, frozen_dtype, precision, memory })
}

fn lora(a: &Args) -> Result<Option<LoraOptions>> {
    let Some(rank) = a.lora_rank else {
        let set = [("--lora-alpha", a.lora_alpha.is_some()), ("--lora-dropout", a.lora_dropout != 0.0), ("--lora-targets", a.lora_targets.is_some())];
        if let Some((flag, _)) = set.iter().find(|(_, s)| *s) {
            anyhow::bail!(betadpo::Error::BadFlag { flag: (*flag).into(), detail: "needs --lora-rank".into() });
        }
        return Ok(None);
    };
    let opts = LoraOptions { rank, alpha: a.lora_alpha, dropout: a.lora_dropout, targets: regex("--lora-targets", &a.lora_targets)? };
    opts.validate()?;
    Ok(Some(opts))
}

pub fn run(a: Args) -> Result<()> {
    let opts = options(&a)?;
    let start = Instant::now();
    let report = build_artifacts(&a.model, &a.out, &opts).with_context(|| format!("building artifacts from {}", a.model.display()))?;
    if !a.quiet {
        print!("{}", report.parameter_table);
    }
    if let Some(old) = report.opset_raised_from {
        println!("opset: the model's {old} read as {} (embedding gradients need ScatterND's reduction)", betadpo::graph::SCATTER_ADD_OPSET);
    }
    if !report.cache_removal.is_empty() {
        println!("KV cache: {}", report.cache_removal);
    }
    if let Some(why) = &report.not_packed_because {
        println!("layout: padded (cannot pack this model: {why})");
    }
    if report.half_frozen > 0 {
        println!("frozen weights: {} stored in half precision, cast to float32 where they are used", report.half_frozen);
    }
    if report.half_products > 0 {
        let how = if report.manifest.precision_emulated { " (emulated in float32)" } else { "" };
        println!("precision: {} matrix products in {}{how}, everything else in float32", report.half_products, report.manifest.precision.name());
    }
    if report.attention_chunked > 0 {
        println!("attention: {} attentions computed in query chunks (--attention-chunks)", report.attention_chunked);
    }
    let r = &report.recomputed;
    if r.segments > 0 {
        println!("recompute: {} segments, {} forward nodes run again in the backward pass for {} tensors not kept", r.segments, r.nodes, r.tensors);
    }
    if let Some(why) = &report.hf_map_skipped {
        println!("note: the Hugging Face name map was not copied, so `export --hf` will refuse these artifacts: {why}");
    }
    println!(
        "wrote {} (train/eval/optimizer/infer graphs, {} layout, {} backward nodes) in {:.2}s",
        report.out_dir.display(),
        report.manifest.layout,
        report.backward_nodes,
        start.elapsed().as_secs_f64()
    );
    if report.manifest.layout == betadpo::dpo::Layout::Packed && !a.quiet {
        println!("check the packed graphs against the model's own forward: betadpo validate {}", report.out_dir.display());
    }
    Ok(())
}
