//! Reference log-probs, computed once with the original weights before training (TRL's
//! `precompute_ref_log_probs`) and cached in the run directory under a key made of the data, the
//! tokenization and the model, so a resumed run reuses them and a changed input never does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ort::session::Session;
use sha2::{Digest, Sha256};

use super::batch::{collate, CollateOptions};
use super::session_io::{forward_values, Feeds};
use super::tokenize::TokenizedPair;
use crate::dpo::Manifest;
use crate::store::{read_safetensors, write_safetensors, NamedTensor};
use crate::{Error, Result};

/// `(chosen, rejected)` reference log-prob per pair, indexed by the pair's source index.
pub type RefTable = HashMap<usize, (f32, f32)>;

pub fn file_digest(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    std::io::copy(&mut f, h).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Cache key: hash of the tokenized pairs and of the artifacts' eval graph and initial parameters.
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
    file_digest(&mut h, &artifacts.join(&m.graph("eval")?.file))?;
    file_digest(&mut h, &artifacts.join(&m.parameters_file))?;
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

fn cache_path(run: &Path, name: &str, key: &str) -> PathBuf {
    run.join("reference").join(format!("{name}-{key}.safetensors"))
}

/// Loads the cached table or computes it with `session` (the eval graph) and `params` (the
/// original weights), in batches of `batch_size` pairs.
#[allow(clippy::too_many_arguments)]
pub fn reference_logps(
    run: &Path,
    name: &str,
    key: &str,
    pairs: &[TokenizedPair],
    m: &Manifest,
    session: &mut Session,
    params: &Feeds,
    collate_opts: &CollateOptions,
    batch_size: usize,
    device: &super::device::Device,
    mut progress: impl FnMut(usize),
) -> Result<RefTable> {
    let path = cache_path(run, name, key);
    if path.exists() {
        if let Ok((tensors, _)) = read_safetensors(&path) {
            if let (Some(idx), Some(vals)) = (tensors.iter().find(|t| t.name == "source_index"), tensors.iter().find(|t| t.name == "ref_logps")) {
                if idx.data.len() == pairs.len() {
                    return Ok(idx.data.iter().enumerate().map(|(i, &s)| (s as usize, (vals.data[2 * i], vals.data[2 * i + 1]))).collect());
                }
            }
        }
    }
    let spec = m.graph("eval")?;
    let mut table = RefTable::new();
    let mut order = Vec::new();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = collate(&refs, collate_opts)?;
        let zeros = vec![0.0f32; 2 * chunk.len()];
        let out = forward_values(session, spec, &batch, &zeros, params, device)?;
        let b = chunk.len();
        for (i, p) in chunk.iter().enumerate() {
            table.insert(p.source_index, (out.policy_logps[i], out.policy_logps[b + i]));
            order.push(p.source_index);
        }
        progress(chunk.len());
    }
    let idx: Vec<f32> = order.iter().map(|&s| s as f32).collect();
    let vals: Vec<f32> = order.iter().flat_map(|s| [table[s].0, table[s].1]).collect();
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_safetensors(
        &path,
        &[
            NamedTensor { name: "source_index".into(), shape: vec![idx.len()], data: idx },
            NamedTensor { name: "ref_logps".into(), shape: vec![order.len(), 2], data: vals },
        ],
        None,
    )?;
    Ok(table)
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
