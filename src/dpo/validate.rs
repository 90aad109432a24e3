//! `validate`: checks what `build-graph` wrote, independently of how it was built.
//! 1. structure: topological order, one definition per tensor, every input defined, opsets
//!    declared, and only default-domain ops in the train and optimizer graphs;
//! 2. ONNX Runtime loads every graph;
//! 3. the train graph's gradient agrees with its own loss: for random directions v,
//!    `(L(θ+εv) − L(θ−εv)) / 2ε ≈ ⟨∇L(θ), v⟩` on a random batch;
//! 4. packed artifacts: the packed graphs' log-probs and betas equal the model's own forward on
//!    padded rows ([`crate::dpo::packing::packed_matches_model`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use ort::session::Session;
use rand::{Rng, SeedableRng};

use crate::dpo::manifest::{GraphSpec, Manifest};
use crate::dpo::objective::config::LossKind;
use crate::onnx::{load_model, ModelProto};
use crate::runtime::{f32_output, run, HostTensor, SessionConfig};
use crate::store::{read_safetensors, NamedTensor};
use crate::{Error, Result};

/// One check's outcome, for the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

pub struct ValidateOptions {
    pub directions: usize,
    pub seed: u64,
    pub pairs: usize,
    pub seq_len: usize,
    /// Intra-op threads of the sessions (`None`: ONNX Runtime's choice).
    pub threads: Option<usize>,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions { directions: 3, seed: 0, pairs: 2, seq_len: 12, threads: None }
    }
}

fn check(name: &str, r: Result<String>) -> Check {
    match r {
        Ok(detail) => Check { name: name.into(), ok: true, detail },
        Err(e) => Check { name: name.into(), ok: false, detail: e.to_string() },
    }
}

pub fn validate(dir: &Path, opts: &ValidateOptions) -> Result<Vec<Check>> {
    let manifest = Manifest::load(dir)?;
    let mut checks = Vec::new();
    // Sessions are created once and reused by the numerical checks (creating SmolLM2's train
    // session alone takes ~4.5 s).
    let mut sessions: HashMap<&str, Session> = HashMap::new();
    for (which, spec) in &manifest.graphs {
        let path = dir.join(&spec.file);
        let model = match load_model(&path) {
            Ok(m) => m,
            Err(e) => {
                checks.push(Check { name: format!("{which}: load"), ok: false, detail: e.to_string() });
                continue;
            }
        };
        let default_only = which == "train" || which == "optimizer";
        checks.push(check(&format!("{which}: structure"), structure(&model, spec, default_only)));
        let loaded = SessionConfig { intra_threads: opts.threads, ..Default::default() }.session_from_file(&path);
        let detail = match &loaded {
            Ok(s) => Ok(format!("{} inputs, {} outputs", s.inputs().len(), s.outputs().len())),
            Err(e) => Err(Error::Validation(e.to_string())),
        };
        checks.push(check(&format!("{which}: ONNX Runtime loads it"), detail));
        if let Ok(session) = loaded {
            sessions.insert(which.as_str(), session);
        }
    }
    // Read once: the numerical checks share these values (SmolLM2: 540 MB).
    let stored = read_safetensors(&dir.join(&manifest.parameters_file)).map(|(t, _)| t);
    let tensors = || stored.as_deref().map_err(|e| Error::Validation(e.to_string()));
    checks.push(check("parameters file", tensors().and_then(|t| parameters_file(t, &manifest)).map(|n| format!("{n} tensors with the manifest's shapes"))));
    let mut take = |which: &str| sessions.remove(which).ok_or_else(|| Error::Artifacts(format!("the {which} graph did not load")));
    let map = dir.join(crate::run_layout::HF_MAP_FILE);
    if map.exists() {
        // what `export --hf` reads before it writes anything
        let read =
            crate::dpo::export::hf::map::HfMap::load(&map).map(|m| format!("{} tensors, each listed once, transposes of matrices only", m.tensors.len()));
        checks.push(check("Hugging Face name map", read));
    }
    checks.push(check("train: directional derivatives", take("train").and_then(|mut s| directional(tensors()?, &manifest, opts, &mut s))));
    if manifest.layout == crate::dpo::packing::Layout::Packed {
        let packed = take("eval").and_then(|mut eval| take("infer").and_then(|mut infer| packed_vs_model(tensors()?, &manifest, opts, &mut eval, &mut infer)));
        checks.push(check("packed layout: the model's own forward agrees", packed));
    }
    Ok(checks)
}

fn structure(model: &ModelProto, spec: &GraphSpec, default_only: bool) -> Result<String> {
    let g = model.graph.as_ref().ok_or_else(|| Error::graph("no graph"))?;
    let declared: HashSet<&str> = model.opset_import.iter().map(|o| if o.domain == "ai.onnx" { "" } else { o.domain.as_str() }).collect();
    let mut defined: HashSet<&str> = HashSet::new();
    for t in g.input.iter().map(|v| v.name.as_str()).chain(g.initializer.iter().map(|t| t.name.as_str())) {
        defined.insert(t);
    }
    let inputs: HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    for (i, n) in g.node.iter().enumerate() {
        let label = || format!("node {i} {} ({})", n.name, n.op_type);
        let domain = if n.domain == "ai.onnx" { "" } else { n.domain.as_str() };
        if !declared.contains(domain) {
            return Err(Error::graph(format!("{}: domain {:?} has no opset import", label(), n.domain)));
        }
        if default_only && !domain.is_empty() {
            return Err(Error::graph(format!("{}: op outside the default ONNX domain ({})", label(), n.domain)));
        }
        for x in &n.input {
            if !x.is_empty() && !defined.contains(x.as_str()) {
                return Err(Error::graph(format!("{}: input {x} is not defined before it (not topological, or undefined)", label())));
            }
        }
        for o in &n.output {
            if o.is_empty() {
                continue;
            }
            if !defined.insert(o.as_str()) {
                let what = if inputs.contains(o.as_str()) { "a graph input" } else { "defined twice" };
                return Err(Error::graph(format!("{}: output {o} is {what}", label())));
            }
        }
    }
    for o in &g.output {
        if !defined.contains(o.name.as_str()) {
            return Err(Error::graph(format!("graph output {} is never produced", o.name)));
        }
    }
    let graph_inputs: HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    for t in &spec.inputs {
        if !graph_inputs.contains(t.name.as_str()) {
            return Err(Error::graph(format!("the manifest names input {} ({}) but the graph has none", t.name, t.role)));
        }
    }
    let graph_outputs: HashSet<&str> = g.output.iter().map(|v| v.name.as_str()).collect();
    for t in &spec.outputs {
        if !graph_outputs.contains(t.name.as_str()) {
            return Err(Error::graph(format!("the manifest names output {} ({}) but the graph has none", t.name, t.role)));
        }
    }
    Ok(format!("{} nodes, topological, single definitions{}", g.node.len(), if default_only { ", default domain only" } else { "" }))
}

fn parameters_file(tensors: &[NamedTensor], m: &Manifest) -> Result<usize> {
    m.check_parameter_values(tensors, Path::new(&m.parameters_file))?;
    let by_name: HashMap<&str, &crate::store::NamedTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for p in m.trainable() {
        let t = by_name[p.name.as_str()];
        if t.data.iter().any(|v| !v.is_finite()) {
            return Err(Error::Validation(format!("parameter {} holds non-finite values", p.name)));
        }
    }
    Ok(tensors.len())
}

/// A random batch in the manifest's layout: `pairs` pairs of `seq_len` tokens, the answer in the
/// second half, the last row right-padded.
pub fn random_batch(m: &Manifest, spec: &GraphSpec, rng: &mut impl Rng, pairs: usize, t: usize) -> Vec<(String, HostTensor)> {
    let mut v = if m.layout == super::Layout::Packed { random_packed_batch(m, spec, rng, pairs, t) } else { random_padded_batch(m, spec, rng, pairs, t) };
    v.extend(random_beta_dpo_inputs(m, spec, rng, pairs));
    v
}

/// beta-DPO's running statistics (a spread near the margins' scale) and Gumbel noise; epsilon-DPO's
/// global beta at its initial value; float16's loss scale at 1 (the gradients are then the loss's).
fn random_beta_dpo_inputs(m: &Manifest, spec: &GraphSpec, rng: &mut impl Rng, pairs: usize) -> Vec<(String, HostTensor)> {
    let mut v = Vec::new();
    for i in &spec.inputs {
        let tensor = match i.role.as_str() {
            "margin_stats" => HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![rng.random_range(-1.0..1.0), rng.random_range(0.5..2.0)]).unwrap()),
            "selection_noise" => HostTensor::F32(ArrayD::from_shape_fn(IxDyn(&[pairs]), |_| -(-rng.random_range(f32::MIN_POSITIVE..1.0f32).ln()).ln())),
            "epsilon_beta" => HostTensor::F32(ArrayD::from_elem(IxDyn(&[1]), m.objective.epsilon_dpo.map_or(0.1, |e| e.beta0) as f32)),
            "loss_scale" => HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 1.0)),
            _ => continue,
        };
        v.push((i.name.clone(), tensor));
    }
    v
}

fn random_padded_batch(m: &Manifest, spec: &GraphSpec, rng: &mut impl Rng, pairs: usize, t: usize) -> Vec<(String, HostTensor)> {
    let rows = 2 * pairs;
    let vocab = m.model.vocab_size.max(2);
    let pad = |r: usize, c: usize| r == rows - 1 && c >= t - 2;
    let mut v = Vec::new();
    for i in &spec.inputs {
        let tensor = match i.role.as_str() {
            "input_ids" => HostTensor::I64(ArrayD::from_shape_fn(IxDyn(&[rows, t]), |_| rng.random_range(0..vocab))),
            "attention_mask" => HostTensor::I64(ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| i64::from(!pad(ix[0], ix[1])))),
            "position_ids" => HostTensor::I64(ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| ix[1] as i64)),
            "completion_mask" => HostTensor::F32(ArrayD::from_shape_fn(IxDyn(&[rows, t]), |ix| if ix[1] >= t / 2 && !pad(ix[0], ix[1]) { 1.0 } else { 0.0 })),
            "ref_logps" => HostTensor::F32(ArrayD::from_shape_fn(IxDyn(&[rows]), |_| rng.random_range(-40.0..-20.0))),
            _ => continue,
        };
        v.push((i.name.clone(), tensor));
    }
    v
}

/// The packed equivalent: prompts of `t / 2` tokens, rejected answers two tokens shorter than
/// the chosen ones, in rows of 3 pairs at most.
fn random_packed_batch(m: &Manifest, spec: &GraphSpec, rng: &mut impl Rng, pairs: usize, t: usize) -> Vec<(String, HostTensor)> {
    use crate::dpo::packing::{pack, HeadReads, PairTokens};
    let vocab = m.model.vocab_size.max(2) as u32;
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let (p, a) = (t / 2, t - t / 2);
    let tokens: Vec<[Vec<u32>; 3]> = (0..pairs).map(|_| [ids(p), ids(a), ids(a.saturating_sub(2).max(1))]).collect();
    let views: Vec<PairTokens> = tokens.iter().map(PairTokens::of).collect();
    let batch = pack(&views, 3 * (p + 2 * a), 0, HeadReads::of(&m.objective));
    let refs = HostTensor::F32(ArrayD::from_shape_fn(IxDyn(&[2 * pairs]), |_| rng.random_range(-40.0..-20.0)));
    batch.feeds(&spec.inputs, &refs)
}

/// The artifacts' parameters as a check feeds them: the stored values, with a zero head weight
/// (every beta equal) replaced by a small random one, which exercises the head fully.
struct Theta<'a> {
    stored: HashMap<&'a str, &'a NamedTensor>,
    live_head: HashMap<String, ArrayD<f32>>,
}

impl<'a> Theta<'a> {
    fn new(tensors: &'a [NamedTensor], m: &Manifest, rng: &mut impl Rng) -> Result<Self> {
        let mut live_head = HashMap::new();
        for t in tensors {
            if m.parameters.iter().any(|p| p.name == t.name && p.beta_head) && t.data.iter().all(|&x| x == 0.0) {
                let data = t.data.iter().map(|_| rng.random_range(-0.05..0.05)).collect();
                live_head.insert(
                    t.name.clone(),
                    ArrayD::from_shape_vec(IxDyn(&t.shape), data).map_err(|e| Error::ShapeMismatch { shape: t.shape.clone(), detail: e.to_string() })?,
                );
            }
        }
        Ok(Theta { stored: tensors.iter().map(|t| (t.name.as_str(), t)).collect(), live_head })
    }

    fn view(&self, name: &str) -> Result<ArrayViewD<'_, f32>> {
        if let Some(a) = self.live_head.get(name) {
            return Ok(a.view());
        }
        let t = self.stored.get(name).ok_or_else(|| Error::ParameterMismatch(format!("no value for parameter {name} in the parameters file")))?;
        ArrayViewD::from_shape(IxDyn(&t.shape), &t.data).map_err(|e| Error::ParameterMismatch(format!("parameter {name}: {e}")))
    }

    fn value(&self, name: &str) -> Result<ArrayD<f32>> {
        Ok(self.view(name)?.to_owned())
    }
}

fn packed_vs_model(tensors: &[NamedTensor], m: &Manifest, opts: &ValidateOptions, eval: &mut Session, infer: &mut Session) -> Result<String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let theta = Theta::new(tensors, m, &mut rng)?;
    crate::dpo::packing::packed_matches_model(m, (eval, infer), &|n| theta.value(n), &mut rng)
}

type HeldLoss<'a> = Box<dyn Fn(&[(String, HostTensor)]) -> Result<f64> + 'a>;
/// Which parameters a part of a direction moves.
type ParamFilter<'a> = Box<dyn Fn(&str) -> bool + 'a>;

/// Whether the model's gradient sees the learned beta as a constant (`--detach-head-input`) while
/// the head's own parameters still move it.
fn detached_head(m: &Manifest) -> bool {
    m.objective.detach_head_input && m.objective.has_head()
}

/// beta-DPO, epsilon-DPO and the detached head: the loss with the betas (and beta-DPO's kept set) held
/// at their values in `at` (the graph's outputs at the unperturbed parameters), which is what their
/// gradient (the model's, for the detached head) differentiates; it is checked against the graph's own
/// loss there. `None` for the other methods.
fn held_beta_loss<'a>(m: &'a Manifest, spec: &'a GraphSpec, batch: &'a [(String, HostTensor)], at: &[(String, HostTensor)]) -> Result<Option<HeldLoss<'a>>> {
    let method = match (&m.objective.beta_dpo, &m.objective.epsilon_dpo) {
        (Some(_), _) => "beta-DPO",
        (None, Some(_)) => "epsilon-DPO",
        (None, None) if detached_head(m) => "the detached head",
        (None, None) => return Ok(None),
    };
    let name = |role: &str, k: usize| spec.outputs.iter().filter(|o| o.role == role).nth(k).map(|o| o.name.clone());
    let missing = || Error::Artifacts(format!("the {method} train graph lacks its beta, kept or log-prob outputs"));
    let (beta, logps) = (name("beta", 0).ok_or_else(missing)?, name("metric", 2).ok_or_else(missing)?);
    let refs_name = spec.input("ref_logps").map(|i| i.name.clone()).ok_or_else(missing)?;
    let refs: Vec<f64> = batch.iter().find(|(n, _)| *n == refs_name).and_then(|(_, t)| t.as_f32()).ok_or_else(missing)?.iter().map(|&x| x as f64).collect();
    let pairs = refs.len() / 2;
    let betas_out: Vec<f64> = f32_output(at, &beta)?.iter().map(|&x| x as f64).collect();
    let betas_at: Vec<f64> = (0..pairs).map(|i| betas_out.get(i).or(betas_out.first()).copied().unwrap_or(f64::NAN)).collect();
    let kept_at: Vec<f32> = match name("kept", 0) {
        Some(kept) => f32_output(at, &kept)?.iter().copied().collect(),
        None => vec![1.0; pairs],
    };
    // the log-beta regulariser, a constant while the betas are held
    let cfg = &m.objective;
    let reg = if cfg.beta_reg > 0.0 && cfg.has_head() {
        cfg.beta_reg * betas_out.iter().map(|b| (b.ln() - cfg.beta_init.ln()).powi(2)).sum::<f64>() / betas_out.len().max(1) as f64
    } else {
        0.0
    };
    // a per-sequence head (`--beta-source sequence`) gives chosen and rejected their own betas
    let (beta_c, beta_r): (Vec<f64>, Vec<f64>) =
        if betas_out.len() == 2 * pairs { (betas_out[..pairs].to_vec(), betas_out[pairs..].to_vec()) } else { (betas_at.clone(), betas_at.clone()) };
    let head = detached_head(m);
    let held: HeldLoss<'a> = Box::new(move |outs: &[(String, HostTensor)]| {
        let p: Vec<f64> = f32_output(outs, &logps)?.iter().map(|&x| x as f64).collect();
        let b = p.len() / 2;
        let (dc, dr): (Vec<f64>, Vec<f64>) = (0..b).map(|i| (p[i] - refs[i], p[b + i] - refs[b + i])).unzip();
        if head {
            return Ok(head_loss_at_betas(cfg, &beta_c, &beta_r, &dc, &dr) + reg);
        }
        let u: Vec<f64> = dc.iter().zip(&dr).map(|(c, r)| c - r).collect();
        Ok(crate::dpo::objective::beta_dpo::detached_loss(&m.objective, &betas_at, &kept_at, &u) + reg)
    });
    let graph_loss = f32_output(at, &spec.output("loss").ok_or_else(missing)?.name)?.iter().next().copied().unwrap_or(f32::NAN) as f64;
    let ours = held(at)?;
    let gap = (ours - graph_loss).abs();
    if gap.is_nan() || gap > 1e-4 * graph_loss.abs().max(1.0) {
        return Err(Error::Validation(format!("{method}'s loss {graph_loss} differs from the paper's formula at its own betas ({ours})")));
    }
    Ok(Some(held))
}

/// The learned head's loss (objective.rs's formulas) at given betas: chosen and rejected log-ratios
/// `dc`, `dr` per pair, mean over pairs.
fn head_loss_at_betas(cfg: &crate::dpo::ObjectiveConfig, beta_c: &[f64], beta_r: &[f64], dc: &[f64], dr: &[f64]) -> f64 {
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let n = dc.len();
    let per_pair = |i: usize| {
        let u = beta_c[i] * dc[i] - beta_r[i] * dr[i];
        match cfg.loss {
            LossKind::Sigmoid => (1.0 - cfg.label_smoothing) * softplus(-u) + cfg.label_smoothing * softplus(u),
            LossKind::Ipo => (dc[i] - dr[i] - 1.0 / (beta_c[i] + beta_r[i])).powi(2),
            LossKind::Hinge => (1.0 - u).max(0.0),
        }
    };
    (0..n).map(per_pair).sum::<f64>() / n as f64
}

// `!(err < tol)` on purpose: a NaN error must fail.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn directional(tensors: &[NamedTensor], m: &Manifest, opts: &ValidateOptions, session: &mut Session) -> Result<String> {
    let spec = m.graph("train")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let batch = random_batch(m, spec, &mut rng, opts.pairs, opts.seq_len);
    let theta = Theta::new(tensors, m, &mut rng)?;
    let loss_name = &spec.output("loss").ok_or_else(|| Error::Artifacts("the train graph has no loss output".into()))?.name;
    let feeds = |param: &dyn Fn(&str) -> Result<ArrayD<f32>>| -> Result<Vec<(&str, HostTensor)>> {
        let mut f: Vec<(&str, HostTensor)> = batch.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        f.extend(spec.parameter_feeds(param)?);
        Ok(f)
    };
    let outs = run(session, &feeds(&|n| theta.value(n))?)?;
    let loss_of = held_beta_loss(m, spec, &batch, &outs)?;
    let grads: Vec<(String, ArrayD<f32>)> = spec
        .outputs
        .iter()
        .filter(|o| o.role == "gradient")
        .map(|o| Ok((o.parameter.clone().unwrap_or_default(), f32_output(&outs, &o.name)?.clone())))
        .collect::<Result<_>>()?;
    let gnorm: f64 = grads.iter().map(|(_, g)| g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()).sum::<f64>().sqrt();
    // float32 rounding in the loss grows with the sums behind it, like the square root of their
    // length: 2e-3 up to a million parameters, 2.3e-2 for SmolLM2's 135 million (measured there:
    // 6.3e-3 along the gradient, whatever the step: smaller steps trade truncation for rounding).
    let n_params: usize = grads.iter().map(|(_, g)| g.len()).sum();
    let tolerance = 2e-3 * (n_params as f64 / 1e6).sqrt().max(1.0);
    // Half products round their operands to 8 (bf16) or 11 (fp16) bits, so the gradient is that exact at
    // best, and a step below the rounding quantum is partly lost where the next product rounds its input:
    // half artifacts take a 5x longer step. Measured, worst of 4 directions on tiny-gpt2-ts and
    // tiny-llama-dynamo, all weights or LoRA rank 4, emulated: bf16 6.6e-3, fp16 3.3e-3 at this step
    // (at float32's step LoRA bf16 reached 5.5e-2; at 3e-2, truncation reaches 2.7e-2).
    let (step, tolerance) = match m.precision {
        crate::graph::Precision::Fp32 => (2e-3, tolerance),
        crate::graph::Precision::Bf16 => (1e-2, tolerance.max(2e-2)),
        crate::graph::Precision::Fp16 => (1e-2, tolerance.max(1e-2)),
    };
    let mut worst = 0.0f64;
    // The first direction is the gradient itself (largest signal, checks the magnitude); the
    // others are random (check the orientation). A random direction can be nearly orthogonal to
    // the gradient, so errors are measured against |grad| |v|, not against <grad, v>.
    for k in 0..=opts.directions {
        let v: HashMap<String, ArrayD<f32>> = if k == 0 {
            grads.iter().map(|(p, g)| (p.clone(), g.clone())).collect()
        } else {
            grads.iter().map(|(p, g)| (p.clone(), g.mapv(|_| rng.random_range(-1.0f32..1.0)))).collect()
        };
        let vnorm: f64 = v.values().map(|a| a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()).sum::<f64>().sqrt();
        if vnorm == 0.0 || gnorm == 0.0 {
            return Err(Error::Validation("the gradient is exactly zero on a random batch".into()));
        }
        let analytic: f64 = grads.iter().map(|(p, g)| g.iter().zip(v[p].iter()).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).sum();
        let eps = step / vnorm;
        // With a detached head, the model's part of the direction moves the loss at held betas and
        // the head's part the graph's loss (through beta alone); their derivatives add up.
        let is_head = |n: &str| m.parameters.iter().any(|p| p.name == n && p.beta_head);
        let parts: Vec<(ParamFilter, bool)> = if detached_head(m) {
            vec![(Box::new(|n: &str| !is_head(n)), true), (Box::new(is_head), false)]
        } else {
            vec![(Box::new(|_: &str| true), loss_of.is_some())]
        };
        let mut numeric = 0.0;
        for (moves, held_betas) in &parts {
            let mut lv = [0.0f64; 2];
            for (s, sign) in [1.0f64, -1.0].iter().enumerate() {
                let shifted = |n: &str| match v.get(n).filter(|_| moves(n)) {
                    Some(d) => Ok(ndarray::Zip::from(&theta.view(n)?).and(d).map_collect(|&a, &x| a + (x as f64 * eps * sign) as f32)),
                    None => theta.value(n),
                };
                let o = run(session, &feeds(&shifted)?)?;
                lv[s] = match (&loss_of, held_betas) {
                    (Some(held), true) => held(&o)?,
                    _ => f32_output(&o, loss_name)?.iter().next().copied().unwrap_or(f32::NAN) as f64,
                };
            }
            numeric += (lv[0] - lv[1]) / (2.0 * eps);
        }
        let err = (numeric - analytic).abs() / (gnorm * vnorm);
        worst = worst.max(err);
        if !(err < tolerance) {
            let what = if k == 0 { "along the gradient" } else { "along a random direction" };
            return Err(Error::Validation(format!(
                "directional derivative mismatch {what}: autodiff {analytic:.6e}, central difference {numeric:.6e} (error {err:.2e} of |grad||v|, tolerance {tolerance:.1e})"
            )));
        }
    }
    Ok(format!("the gradient and {} random directions, worst error {worst:.1e} of |grad||v| (tolerance {tolerance:.1e})", opts.directions))
}
