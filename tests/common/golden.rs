//! Reading a fixture's `golden.safetensors` (PyTorch's values, see tests/fixtures/models/README.md).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use betadpo::dpo::packing::{pack, HeadReads, LayoutChoice, PackedBatch, PairTokens};
use betadpo::dpo::{build_artifacts, BuildOptions, Layout, Manifest, ObjectiveConfig};
use betadpo::runtime::{run, HostTensor, SessionConfig};
use betadpo::store::read_safetensors;
use ndarray::{ArrayD, IxDyn};

pub type Golden = super::fixtures::Tensors;

pub fn load_golden(dir: &Path) -> Golden {
    super::fixtures::read_tensors(&dir.join("golden.safetensors"))
}

/// The golden batch in the packed layout: its pairs read back from the padded rows.
pub fn packed_golden(golden: &Golden, objective: &ObjectiveConfig) -> PackedBatch {
    let ids = &golden.i64s["input_ids"];
    let prompt_last = &golden.i64s["prompt_last_index"];
    let seq_last = &golden.i64s["sequence_last_index"];
    let b = prompt_last.len();
    let tokens = |row: usize, from: usize, to_incl: i64| -> Vec<u32> { (from..=to_incl as usize).map(|c| ids[[row, c]] as u32).collect() };
    let triples: Vec<[Vec<u32>; 3]> = (0..b)
        .map(|i| {
            let p = prompt_last[[i]] as usize + 1;
            [tokens(i, 0, p as i64 - 1), tokens(i, p, seq_last[[i]]), tokens(b + i, p, seq_last[[b + i]])]
        })
        .collect();
    let views: Vec<PairTokens> = triples.iter().map(PairTokens::of).collect();
    // rows of ~2 pairs, so the batch spans several rows with padding at the end of one
    let row_tokens = views.iter().map(|v| v.prompt.len() + v.chosen.len() + v.rejected.len()).max().unwrap() + 4;
    pack(&views, row_tokens, 0, HeadReads::of(objective))
}

/// The golden batch's value for a train graph input of `role` (padded, or `packed`); `None` for
/// the inputs that are not the batch's (reference log-probs, parameters, method state).
pub fn batch_input(golden: &Golden, packed: Option<&PackedBatch>, role: &str) -> Option<HostTensor> {
    if let Some(t) = packed.and_then(|p| p.by_role(role)) {
        return Some(t);
    }
    Some(match role {
        "input_ids" => HostTensor::I64(golden.i64s["input_ids"].clone()),
        "attention_mask" => HostTensor::I64(golden.i64s["attention_mask"].clone()),
        "position_ids" => HostTensor::I64(golden.i64s["position_ids"].clone()),
        "completion_mask" => HostTensor::F32(golden.f32s["loss_mask"].clone()),
        _ => return None,
    })
}

/// The golden batch's tensor for a padded train-graph input of `role`, reference log-probs included
/// (None for parameters and method state).
pub fn batch_feed(golden: &Golden, role: &str) -> Option<HostTensor> {
    match role {
        "ref_logps" => Some(HostTensor::F32(golden.f32s["ref_logps"].clone())),
        _ => batch_input(golden, None, role),
    }
}

pub fn norm(a: &ArrayD<f32>) -> f64 {
    a.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

pub fn diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}

pub fn rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    diff(a, b) / norm(b).max(1e-30)
}

/// What [`golden_train_outputs`] feeds a train graph's `loss_scale` input (float16 artifacts): its
/// gradients are then this many times the loss's.
pub const FED_LOSS_SCALE: f32 = 1024.0;

/// Builds the artifacts of `opts` and runs their train graph on the golden batch with the golden's
/// beta head; returns the manifest and every float output by name.
pub fn golden_train_outputs(model_dir: &Path, golden: &Golden, opts: &BuildOptions, tag: &str) -> Result<(Manifest, HashMap<String, ArrayD<f32>>), String> {
    golden_train_outputs_in(model_dir, golden, opts, tag, SessionConfig::default())
}

/// [`golden_train_outputs`] in a session of `config` (one thread gives the same bits every run).
pub fn golden_train_outputs_in(
    model_dir: &Path,
    golden: &Golden,
    opts: &BuildOptions,
    tag: &str,
    config: SessionConfig,
) -> Result<(Manifest, HashMap<String, ArrayD<f32>>), String> {
    let layout = if opts.layout == LayoutChoice::Packed { Layout::Packed } else { Layout::Padded };
    let out = super::fixtures::scratch(&format!("golden-{}-{tag}-{layout:?}", model_dir.file_name().unwrap().to_string_lossy()));
    let packed = (layout == Layout::Packed).then(|| packed_golden(golden, &opts.objective));
    // a Hugging Face folder (config.json + safetensors) is built from directly, an export from its model.onnx
    let model = if model_dir.join("config.json").is_file() { model_dir.to_path_buf() } else { model_dir.join("model.onnx") };
    build_artifacts(&model, &out, opts).map_err(|e| e.to_string())?;
    let m = Manifest::load(&out).unwrap();
    let spec = m.graph("train").unwrap();
    let (params, _) = read_safetensors(&out.join(&m.parameters_file)).unwrap();
    let mut feeds: Vec<(&str, HostTensor)> = Vec::new();
    for i in &spec.inputs {
        if let Some(t) = batch_input(golden, packed.as_ref(), &i.role) {
            feeds.push((i.name.as_str(), t));
            continue;
        }
        let t = match i.role.as_str() {
            "ref_logps" => HostTensor::F32(golden.f32s["ref_logps"].clone()),
            "loss_scale" => HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), FED_LOSS_SCALE)),
            "parameter" => {
                // the golden's beta head is not the build's zero init
                let v = match golden.f32s.get(&i.name) {
                    Some(g) if i.name.starts_with("beta_head.") => g.clone(),
                    _ => {
                        let p = params.iter().find(|p| p.name == i.name).unwrap();
                        ArrayD::from_shape_vec(IxDyn(&p.shape), p.data.clone()).unwrap()
                    }
                };
                HostTensor::F32(v)
            }
            other => panic!("unexpected input role {other}"),
        };
        feeds.push((i.name.as_str(), t));
    }
    let mut session = config.session_from_file(&out.join(&spec.file)).unwrap();
    let outs: HashMap<String, ArrayD<f32>> = run(&mut session, &feeds).unwrap().into_iter().filter_map(|(n, t)| t.as_f32().cloned().map(|a| (n, a))).collect();
    let _ = std::fs::remove_dir_all(&out);
    Ok((m, outs))
}
