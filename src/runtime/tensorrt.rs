//! TensorRT settings that make the provider usable for training: engines and timing data cached in the run
//! directory (TensorRT spends minutes building engines; a second run loads them), and one optimisation profile
//! covering every shape the batches can take, so a new batch shape does not trigger a rebuild.
//!
//! A profile names, for each input with a varying dimension, its smallest, typical and largest shape, in
//! ONNX Runtime's syntax `input:d0xd1x...,input2:...`. The ranges of the varying dimensions follow from the
//! batch settings ([`batch_dim_ranges`]); [`profile`] is a pure function of them and the inputs' shapes.
//!
//! Which nodes TensorRT leaves to the CUDA provider behind it is read from the session afterwards
//! (`runtime::placement`), and training reports it once for the train graph.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::{Error, Result};

/// A dimension of an input: fixed, or named and varying from batch to batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputDim {
    Fixed(i64),
    Named(String),
}

/// The sizes a named dimension takes: TensorRT builds for `opt` and accepts anything in `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DimRange {
    pub min: i64,
    pub opt: i64,
    pub max: i64,
}

/// The three strings of an optimisation profile (`trt_profile_min_shapes`, `..._opt_shapes`, `..._max_shapes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// TensorRT provider settings beyond the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorRtOptions {
    /// Engine and timing caches go to `<dir>/engines` and `<dir>/timing` (created on first use by TensorRT).
    pub cache_dir: Option<PathBuf>,
    /// The optimisation profile; without it TensorRT builds for the first shapes it sees.
    pub profile: Option<Profile>,
}

/// The batch settings the shapes follow from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// Pairs per micro-batch (`--batch-size`); the last micro-batch of an epoch may hold fewer.
    pub pairs: usize,
    /// Tokens per sequence (prompt and answer) after truncation (`--max-length`).
    pub max_length: usize,
    /// Tokens per packed row (`pack_tokens`), when the artifacts take packed batches.
    pub pack_tokens: Option<usize>,
}

/// The ranges of the dimension names the train and eval graphs use (see `dpo::packing` and `dpo::artifacts`).
///
/// Padded: `pairs` and `rows` (= 2 x pairs) up to the batch, `sequence` up to `max_length`.
/// Packed: a pair writes its prompt once and both answers, at most `2 x max_length` tokens, so a row holds up
/// to `max(pack_tokens, 2 x max_length)` tokens and there are at most as many rows as pairs (typically
/// `ceil(2 x pairs x max_length / pack_tokens)`); answer tokens and head reads are bounded by the tokens written.
pub fn batch_dim_ranges(shape: &BatchShape) -> BTreeMap<&'static str, DimRange> {
    let b = shape.pairs.max(1) as i64;
    let l = shape.max_length.max(1) as i64;
    let full = |max: i64| DimRange { min: 1, opt: max, max };
    let mut ranges = BTreeMap::from([("pairs", full(b)), ("rows", DimRange { min: 2, opt: 2 * b, max: 2 * b })]);
    match shape.pack_tokens {
        None => {
            ranges.insert("sequence", full(l));
        }
        Some(t) => {
            let t = t.max(1) as i64;
            let row = t.max(2 * l);
            let typical_rows = ((2 * b * l + t - 1) / t).clamp(1, b);
            ranges.insert("packed_rows", DimRange { min: 1, opt: typical_rows, max: b });
            ranges.insert("packed_sequence", DimRange { min: 1, opt: t.min(row), max: row });
            ranges.insert("answer_tokens", full(2 * b * l));
            ranges.insert("head_reads", full(2 * b * l));
        }
    }
    ranges
}

/// The profile for `inputs` (name and dimensions each); inputs without a named dimension are left out, as
/// TensorRT wants. A named dimension without a range is an error naming input and dimension.
pub fn profile(inputs: &[(String, Vec<InputDim>)], ranges: &BTreeMap<&str, DimRange>) -> Result<Profile> {
    let mut parts: [Vec<String>; 3] = Default::default();
    for (name, dims) in inputs {
        if dims.iter().all(|d| matches!(d, InputDim::Fixed(_))) {
            continue;
        }
        let mut shapes: [Vec<String>; 3] = Default::default();
        for d in dims {
            let sizes = match d {
                InputDim::Fixed(n) => [*n; 3],
                InputDim::Named(dim) => {
                    let r = ranges.get(dim.as_str()).ok_or_else(|| {
                        Error::Runtime(format!("TensorRT profile: input '{name}' has dimension '{dim}', for which the batch settings give no range"))
                    })?;
                    [r.min, r.opt, r.max]
                }
            };
            for (shape, size) in shapes.iter_mut().zip(sizes) {
                shape.push(size.to_string());
            }
        }
        for (part, shape) in parts.iter_mut().zip(shapes) {
            part.push(format!("{name}:{}", shape.join("x")));
        }
    }
    let [min, opt, max] = parts.map(|p| p.join(","));
    Ok(Profile { min, opt, max })
}

impl TensorRtOptions {
    pub(crate) fn engine_dir(&self) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| d.join("engines"))
    }

    pub(crate) fn timing_dir(&self) -> Option<PathBuf> {
        self.cache_dir.as_ref().map(|d| d.join("timing"))
    }

    /// Applies these settings to the provider.
    pub(crate) fn apply(&self, mut trt: ort::ep::TensorRT) -> Result<ort::ep::TensorRT> {
        if let (Some(engines), Some(timing)) = (self.engine_dir(), self.timing_dir()) {
            for dir in [&engines, &timing] {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            trt = trt.with_engine_cache(true).with_engine_cache_path(engines.display()).with_timing_cache(true).with_timing_cache_path(timing.display());
        }
        if let Some(p) = &self.profile {
            trt = trt.with_profile_min_shapes(&p.min).with_profile_opt_shapes(&p.opt).with_profile_max_shapes(&p.max);
        }
        Ok(trt)
    }
}
