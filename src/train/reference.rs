//! Reference log-probs: the log-probs of each pair's two answers under the original weights (TRL's
//! `precompute_ref_log_probs`), computed for the pairs a run uses and cached in the run directory.
//!
//! Each pair is computed alone (a batch of one, so no padding), which makes its value a function
//! of the pair and the model only, not of the pairs that shared its batch: a table filled over
//! several runs (a run, its resume, an extension with more steps) holds the values one run filling
//! it at once would, and resume stays exact. A cache file is keyed by the tokenized data set, the
//! eval graph and the initial parameters, so every row in it is valid for any run with that key
//! and a changed input never reuses it; a partial table is a valid table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ort::session::Session;
use sha2::{Digest, Sha256};

use super::batch::{collate, CollateOptions};
use super::device::Device;
use super::session_io::{forward_values, Feeds};
use super::tokenize::TokenizedPair;
use crate::dpo::manifest::GraphSpec;
use crate::dpo::Manifest;
use crate::store::{read_safetensors, write_safetensors, NamedTensor};
use crate::{Error, Result};

/// `(chosen, rejected)` reference log-prob per pair, indexed by the pair's source index.
pub type RefTable = HashMap<usize, (f32, f32)>;

/// How often a long computation saves what it has, so a killed run loses at most this much work.
const SAVE_EVERY: Duration = Duration::from_secs(30);

pub fn file_digest(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    std::io::copy(&mut f, h).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Cache key: hash of the tokenized pairs and of the artifacts' eval graph (with the weights a
/// large one keeps in `<file>.data` beside it: frozen weights, which the parameters file lacks)
/// and initial parameters.
pub fn cache_key(pairs: &[TokenizedPair], artifacts: &Path, m: &Manifest) -> Result<String> {
    let mut h = Sha256::new();
    for p in pairs {
        h.update((p.source_index as u64).to_le_bytes());
        for cut in p.prompt_cut {
            h.update((cut as u64).to_le_bytes());
        }
        for part in [&p.prompt, &p.chosen, &p.rejected] {
            h.update((part.len() as u64).to_le_bytes());
            for t in part.iter() {
                h.update(t.to_le_bytes());
            }
        }
    }
    let eval = artifacts.join(&m.graph("eval")?.file);
    file_digest(&mut h, &eval)?;
    // Only when present, so the keys of models without one stay those of earlier runs.
    let external = crate::onnx::external_data_path(&eval)?;
    if external.is_file() {
        file_digest(&mut h, &external)?;
    }
    file_digest(&mut h, &artifacts.join(&m.parameters_file))?;
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

/// The reference model: the eval graph fed the original weights.
pub struct RefModel<'a> {
    pub session: &'a mut Session,
    pub spec: &'a GraphSpec,
    pub params: &'a Feeds,
    pub collate: &'a CollateOptions,
    pub device: &'a Device,
}

impl RefModel<'_> {
    /// `(chosen, rejected)` log-probs of `pair`, alone in its batch.
    fn logps(&mut self, pair: &TokenizedPair) -> Result<(f32, f32)> {
        let batch = collate(&[pair], self.collate)?;
        let out = forward_values(self.session, self.spec, &batch, &[0.0; 2], self.params, self.device)?;
        match out.policy_logps[..] {
            [chosen, rejected] => Ok((chosen, rejected)),
            _ => Err(Error::Runtime(format!("the eval graph returned {} policy log-probs for one pair, not 2", out.policy_logps.len()))),
        }
    }
}

/// The reference log-probs of one data set cached in a run directory: the rows computed so far.
pub struct RefCache {
    path: PathBuf,
    table: RefTable,
}

impl RefCache {
    /// The rows cached in `run` for data set `name` under `key`; none when there is no readable file.
    pub fn open(run: &Path, name: &str, key: &str) -> RefCache {
        let path = run.join("reference").join(format!("{name}-{key}.safetensors"));
        let table = read_table(&path).unwrap_or_default();
        RefCache { path, table }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn into_table(self) -> RefTable {
        self.table
    }

    /// The pairs among `wanted` without a cached value, each once, in the order of `wanted`.
    pub fn missing<'a>(&self, wanted: impl IntoIterator<Item = &'a TokenizedPair>) -> Vec<&'a TokenizedPair> {
        let mut seen = std::collections::HashSet::new();
        wanted.into_iter().filter(|p| !self.table.contains_key(&p.source_index) && seen.insert(p.source_index)).collect()
    }

    /// Computes `pairs` with `model` and adds them to the cache file, saving every [`SAVE_EVERY`]
    /// on the way; `progress` hears of each pair done.
    pub fn compute(&mut self, pairs: &[&TokenizedPair], model: &mut RefModel, mut progress: impl FnMut()) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut saved = Instant::now();
        for pair in pairs {
            let logps = model.logps(pair)?;
            self.table.insert(pair.source_index, logps);
            progress();
            if saved.elapsed() >= SAVE_EVERY {
                self.save()?;
                saved = Instant::now();
            }
        }
        self.save()
    }

    /// Writes the table, rows by source index (the same rows give the same file).
    fn save(&self) -> Result<()> {
        let mut order: Vec<usize> = self.table.keys().copied().collect();
        order.sort_unstable();
        // Source indices as float32, as in files from before partial tables: exact below 2^24.
        let idx: Vec<f32> = order.iter().map(|&s| s as f32).collect();
        let vals: Vec<f32> = order.iter().flat_map(|s| [self.table[s].0, self.table[s].1]).collect();
        let dir = self.path.parent().expect("the cache file is in RUN/reference");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_safetensors(
            &self.path,
            &[
                NamedTensor { name: "source_index".into(), shape: vec![idx.len()], data: idx },
                NamedTensor { name: "ref_logps".into(), shape: vec![order.len(), 2], data: vals },
            ],
            None,
        )
    }
}

/// The table in a cache file; `None` when it is missing or not one (then it is computed afresh).
fn read_table(path: &Path) -> Option<RefTable> {
    let (tensors, _) = read_safetensors(path).ok()?;
    let idx = tensors.iter().find(|t| t.name == "source_index")?;
    let vals = tensors.iter().find(|t| t.name == "ref_logps")?;
    if vals.data.len() != 2 * idx.data.len() || idx.data.iter().any(|&s| s < 0.0 || s.fract() != 0.0) {
        return None;
    }
    Some(idx.data.iter().enumerate().map(|(i, &s)| (s as usize, (vals.data[2 * i], vals.data[2 * i + 1]))).collect())
}

/// `[chosen refs; rejected refs]` for a batch, in its row order.
pub fn batch_refs(table: &RefTable, sources: &[usize]) -> Result<Vec<f32>> {
    let mut v = vec![0.0f32; 2 * sources.len()];
    for (i, s) in sources.iter().enumerate() {
        let (c, r) = *table.get(s).ok_or_else(|| Error::Other(format!("no reference log-prob for pair {s}")))?;
        v[i] = c;
        v[sources.len() + i] = r;
    }
    Ok(v)
}
