//! What `--data` names: a JSONL or JSON file, a Parquet file, a folder of Parquet shards as the
//! Hugging Face Hub lays them out, a folder of `<split>.jsonl` files, or a `datasets`
//! `save_to_disk` folder, resolved to the files that hold the rows of one split.
//!
//! Files are told apart by their first bytes (Parquet's `PAR1`, Arrow's `ARROW1` or stream marker),
//! not their names. Anything else gets an error that says what `--data` can be.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::data_arrow::ArrowFile;
use crate::{Error, Result};

/// The split read from a folder when none is named.
pub const DEFAULT_SPLIT: &str = "train";
/// The split `--eval-data` reads from a folder when none is named.
pub const DEFAULT_EVAL_SPLIT: &str = "test";

/// The files holding one split's rows, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// JSON Lines, or one JSON array of rows.
    Json(PathBuf),
    Arrow(Vec<(PathBuf, ArrowFile)>),
}

/// Resolves `path` to its rows' files. `split` picks a split of a folder (default
/// [`DEFAULT_SPLIT`]); naming one for a single file is refused, since a file has no splits.
pub fn resolve(path: &Path, split: Option<&str>) -> Result<DataSource> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && looks_like_hub_name(path) => return Err(hub_name_error(path)),
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.is_dir() {
        return resolve_folder(path, split.unwrap_or(DEFAULT_SPLIT));
    }
    if let Some(s) = split {
        return Err(Error::Data(format!("{}: a file has no splits (split \"{s}\" was asked for); splits are read from folders", path.display())));
    }
    Ok(match sniff(path)? {
        Some(kind) => DataSource::Arrow(vec![(path.to_path_buf(), kind)]),
        None => DataSource::Json(path.to_path_buf()),
    })
}

/// The Arrow container a file starts like, if any.
pub fn sniff(path: &Path) -> Result<Option<ArrowFile>> {
    let mut head = [0u8; 6];
    let mut file = crate::fs_guard::open_regular(path)?;
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    Ok(match &head[..n] {
        [b'P', b'A', b'R', b'1', ..] => Some(ArrowFile::Parquet),
        b"ARROW1" => Some(ArrowFile::IpcFile),
        [0xff, 0xff, 0xff, 0xff, ..] => Some(ArrowFile::IpcStream),
        _ => None,
    })
}

/// `owner/name` with no such file: a Hub dataset id, which betadpo does not download.
fn looks_like_hub_name(path: &Path) -> bool {
    let s = path.to_string_lossy();
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && path.extension().is_none()
        && !Path::new(parts[0]).exists()
}

fn hub_name_error(path: &Path) -> Error {
    let name = path.display();
    Error::Data(format!(
        "{name}: no such file or folder; if it is a Hugging Face dataset name, betadpo does not download datasets: write it to a file first, \
         e.g. python -c \"from datasets import load_dataset; load_dataset('{name}', split='train').to_parquet('train.parquet')\" \
         (or .save_to_disk('folder')), then pass --data train.parquet"
    ))
}

fn resolve_folder(dir: &Path, split: &str) -> Result<DataSource> {
    if dir.join("dataset_dict.json").is_file() {
        let splits = dataset_dict_splits(dir)?;
        if !splits.iter().any(|s| s == split) {
            return Err(Error::Data(format!(
                "{}: no split \"{split}\" (it has {}); choose one with --data-split/--eval-data-split",
                dir.display(),
                splits.join(", ")
            )));
        }
        return saved_split(&dir.join(split));
    }
    if dir.join("state.json").is_file() {
        return saved_split(dir);
    }
    // A folder of JSON files named by split (train.jsonl, test.jsonl), at the top or under data/.
    for sub in ["", "data"] {
        for ext in ["jsonl", "json"] {
            let file = dir.join(sub).join(format!("{split}.{ext}"));
            if file.is_file() {
                return Ok(DataSource::Json(file));
            }
        }
    }
    let shards = parquet_shards(dir)?;
    if shards.is_empty() {
        return Err(folder_error(dir));
    }
    let chosen: Vec<PathBuf> = shards.iter().filter(|(_, s)| s.as_deref() == Some(split)).map(|(p, _)| p.clone()).collect();
    if !chosen.is_empty() {
        return Ok(DataSource::Arrow(chosen.into_iter().map(|p| (p, ArrowFile::Parquet)).collect()));
    }
    let mut named: Vec<&str> = shards.iter().filter_map(|(_, s)| s.as_deref()).collect();
    if named.is_empty() {
        // Shards that name no split are all one.
        return Ok(DataSource::Arrow(shards.into_iter().map(|(p, _)| (p, ArrowFile::Parquet)).collect()));
    }
    named.sort_unstable();
    named.dedup();
    Err(Error::Data(format!(
        "{}: no Parquet files of split \"{split}\" (found {}); choose one with --data-split/--eval-data-split",
        dir.display(),
        named.join(", ")
    )))
}

fn dataset_dict_splits(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("dataset_dict.json");
    let text = crate::fs_guard::read_to_string(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: invalid JSON ({e})", path.display())))?;
    let splits = v.get("splits").and_then(|s| s.as_array()).ok_or_else(|| Error::Data(format!("{}: no \"splits\" list", path.display())))?;
    Ok(splits.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
}

/// One split saved by `Dataset.save_to_disk`: `state.json` lists its Arrow files in order.
fn saved_split(dir: &Path) -> Result<DataSource> {
    let path = dir.join("state.json");
    let text = crate::fs_guard::read_to_string(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Data(format!("{}: invalid JSON ({e})", path.display())))?;
    let files = v.get("_data_files").and_then(|f| f.as_array()).ok_or_else(|| Error::Data(format!("{}: no \"_data_files\" list", path.display())))?;
    let mut out = Vec::new();
    for f in files {
        let name = f.get("filename").and_then(|n| n.as_str()).ok_or_else(|| Error::Data(format!("{}: a data file without \"filename\"", path.display())))?;
        // The listed names are plain file names beside state.json; anything else would read outside the dataset.
        if Path::new(name).components().count() != 1 || name == ".." {
            return Err(Error::Data(format!("{}: data file {name:?} is not a file name in the folder", path.display())));
        }
        let file = dir.join(name);
        let kind = sniff(&file)?.ok_or_else(|| Error::Data(format!("{}: not an Arrow file", file.display())))?;
        out.push((file, kind));
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{}: lists no data files", path.display())));
    }
    Ok(DataSource::Arrow(out))
}

/// `*.parquet` files in `dir` and up to two folders below it (the Hub's `data/` and
/// `<config>/<split>/`), sorted, each with the split its name or folder gives, if any.
fn parquet_shards(dir: &Path) -> Result<Vec<(PathBuf, Option<String>)>> {
    let mut out = Vec::new();
    collect_parquet(dir, dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn collect_parquet(root: &Path, dir: &Path, depth: usize, out: &mut Vec<(PathBuf, Option<String>)>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() && depth < 2 {
            collect_parquet(root, &path, depth + 1, out)?;
        } else if path.is_file() && name.ends_with(".parquet") {
            let split = shard_split(root, &path);
            out.push((path, split));
        }
    }
    Ok(())
}

/// The split a shard belongs to: `train-00000-of-00002.parquet` and `train.parquet` say it in the
/// name, `default/train/0000.parquet` in the folder.
fn shard_split(root: &Path, path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_string_lossy().to_string();
    let numbered = regex::Regex::new(r"^(.+?)-\d+-of-\d+$").ok()?;
    if let Some(c) = numbered.captures(&stem) {
        return Some(c[1].to_string());
    }
    if ["train", "test", "validation", "valid", "dev", "eval"].contains(&stem.as_str()) {
        return Some(stem);
    }
    let parent = path.parent()?;
    let folder = parent.file_name()?.to_string_lossy().to_string();
    (parent != root && folder != "data").then_some(folder)
}

/// A folder that holds no data betadpo reads: say what it should hold and what it does.
fn folder_error(dir: &Path) -> Error {
    Error::Data(format!(
        "{} is a folder without data files: --data takes a .jsonl, .json or .parquet file, a folder of Parquet shards \
         (train-00000-of-00001.parquet, as on the Hugging Face Hub) or of split files (train.jsonl), or a `datasets` \
         save_to_disk folder (dataset_dict.json, or state.json with data-*.arrow); it holds {}",
        dir.display(),
        crate::paths::listing(dir)
    ))
}
