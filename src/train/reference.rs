//! Reference log-probs: the log-probs of each pair's two answers under the original weights (TRL's
//! `precompute_ref_log_probs`), computed for the pairs a run uses and cached in the run directory.
//!
//! Training pairs are computed in the batches of the first epoch (the loader's order for the run's
//! seed and batch size). Every pair is in exactly one of them, and a batch is always computed whole,
//! so a pair's value depends on the pair, the model and that batch, never on which run computed it:
//! a table filled over several runs (a run, its resume, an extension with more steps) holds the
//! values one run filling it at once would, resume stays exact, and a run that ends within the
//! first epoch computes exactly the pairs it trains on, in the batches it trains them in. Eval
//! pairs are all used by every evaluation, so they are computed in the evaluator's own batches: at
//! step 0 the policy then equals the reference bit for bit, and the first evaluation reads rewards
//! of exactly zero.
//!
//! A cache file is keyed by the tokenized data set, the eval graph and the initial parameters, so
//! every row in it is valid for any run with that key and a changed input never reuses it; a
//! partial table is a valid table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ort::session::Session;
use sha2::{Digest, Sha256};

use super::batch::{collate_parts, CollateOptions};
use super::device::Device;
use super::session_io::{forward_values, Feeds};
use crate::dpo::manifest::GraphSpec;
use crate::dpo::Manifest;
use crate::store::{write_safetensors, NamedTensor};
use crate::text::TokenizedPair;
use crate::{Error, Result};

/// `(chosen, rejected)` reference log-prob per pair, indexed by the pair's source index.
pub type RefTable = HashMap<usize, (f32, f32)>;

/// How often a long computation saves what it has, so a killed run loses at most this much work.
const SAVE_EVERY: Duration = Duration::from_secs(30);

pub fn file_digest(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = crate::fs_guard::open_regular(path)?;
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
    /// `(chosen, rejected)` log-probs of each of `pairs`, laid out as one batch and run in the passes
    /// training computes (`--micro-batch-tokens`), so each pair's values are those the train graph
    /// gets for it at the first step, and the pass holds no more memory than a training pass.
    fn logps(&mut self, pairs: &[&TokenizedPair]) -> Result<Vec<(f32, f32)>> {
        let mut by_source = std::collections::HashMap::with_capacity(pairs.len());
        for batch in collate_parts(pairs, 0, 1, self.collate)? {
            let n = batch.pairs();
            let out = forward_values(self.session, self.spec, &batch, &vec![0.0; 2 * n], self.params, self.device)?;
            let (chosen, rejected) = out.policy_logps.split_at(out.policy_logps.len() / 2);
            if chosen.len() != n || rejected.len() != n {
                return Err(Error::Runtime(format!("the eval graph returned {} policy log-probs for {n} pairs", out.policy_logps.len())));
            }
            by_source.extend(batch.source_indices.iter().copied().zip(chosen.iter().copied().zip(rejected.iter().copied())));
        }
        pairs
            .iter()
            .map(|p| {
                by_source.get(&p.source_index).copied().ok_or_else(|| Error::Internal(format!("no reference log-probs computed for pair {}", p.source_index)))
            })
            .collect()
    }
}

/// The reference log-probs of one data set cached in a run directory: the rows computed so far.
pub struct RefCache {
    path: PathBuf,
    table: RefTable,
    /// Whether this process writes the file (in data-parallel training only rank 0 does).
    writes: bool,
}

impl RefCache {
    /// The rows cached in `run` for data set `name` under `key`: none when there is no file, and
    /// none with a notice when the file is not a cache table (it is computed afresh and replaced).
    /// A cache that is not a regular file in the run (a FIFO, a device, a link out of the run) is
    /// an error: betadpo never wrote it.
    pub fn open(run: &Path, name: &str, key: &str) -> Result<RefCache> {
        let path = run.join(crate::run_layout::REFERENCE_DIR).join(format!("{name}-{key}.safetensors"));
        let table = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RefTable::default(),
            _ => {
                let (tensors, _) = match crate::store::read_safetensors_inside(run, &path) {
                    Err(e @ (Error::NotRegularFile { .. } | Error::Io { .. })) => return Err(e),
                    other => other.unwrap_or_default(),
                };
                table_of(&tensors).unwrap_or_else(|| {
                    eprintln!("warning: {}: not a reference log-prob table; computing it afresh", path.display());
                    RefTable::default()
                })
            }
        };
        Ok(RefCache { path, table, writes: true })
    }

    /// The same cache, never written by this process.
    pub fn read_only(self) -> Self {
        RefCache { writes: false, ..self }
    }

    /// Adds rows another process computed, `(source index, chosen, rejected)`, and saves.
    pub fn insert(&mut self, rows: impl IntoIterator<Item = (usize, (f32, f32))>) -> Result<()> {
        self.table.extend(rows);
        self.save()
    }

    /// The cached rows of `batches`' pairs (those it has).
    pub fn rows<'a>(&'a self, batches: &'a [Vec<&TokenizedPair>]) -> impl Iterator<Item = (usize, (f32, f32))> + 'a {
        batches.iter().flatten().filter_map(|p| self.table.get(&p.source_index).map(|&v| (p.source_index, v)))
    }

    pub fn into_table(self) -> RefTable {
        self.table
    }

    fn has(&self, pair: &TokenizedPair) -> bool {
        self.table.contains_key(&pair.source_index)
    }

    /// The batches among `batches` holding a pair that the run uses (`used`) and the cache lacks.
    pub fn missing<'a>(&self, batches: impl IntoIterator<Item = Vec<&'a TokenizedPair>>, used: impl Fn(&TokenizedPair) -> bool) -> Vec<Vec<&'a TokenizedPair>> {
        batches.into_iter().filter(|b| b.iter().any(|p| used(p) && !self.has(p))).collect()
    }

    /// Computes each of `batches` with `model` and adds its pairs to the cache file, saving every
    /// [`SAVE_EVERY`] on the way; `progress` hears how many pairs each batch had.
    pub fn compute(&mut self, batches: &[Vec<&TokenizedPair>], model: &mut RefModel, mut progress: impl FnMut(usize)) -> Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        let mut saved = Instant::now();
        for batch in batches {
            for (pair, logps) in batch.iter().zip(model.logps(batch)?) {
                self.table.insert(pair.source_index, logps);
            }
            progress(batch.len());
            if saved.elapsed() >= SAVE_EVERY {
                self.save()?;
                saved = Instant::now();
            }
        }
        self.save()
    }

    /// Writes the table, rows by source index (the same rows give the same file).
    fn save(&self) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
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

/// The table in a cache file's tensors; `None` when they are not one (then it is computed afresh).
fn table_of(tensors: &[NamedTensor]) -> Option<RefTable> {
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
        let (c, r) = *table.get(s).ok_or_else(|| Error::Internal(format!("no reference log-prob for pair {s}")))?;
        v[i] = c;
        v[sources.len() + i] = r;
    }
    Ok(v)
}
