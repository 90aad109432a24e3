//! libFuzzer target for the model loader: what `build-graph` does with a model file before ONNX
//! Runtime sees it (decode, resolve external data, check tensors and nodes, sort, recognise the
//! LM signature). Any input may be refused; none may panic, hang or read outside its directory.
//!
//! Each input is written as `model.onnx` into a scratch directory that also holds a small
//! `weights.bin`, so external-data entries that name it resolve and those that escape are refused.
//! Seed corpus: `fuzz/seed_corpus.sh` (the quickstart model and the tiny test models).

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("betadpo-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("weights.bin"), vec![0x3fu8; 1 << 16]).unwrap();
        dir
    })
}

fn load(path: &std::path::Path) -> betadpo::Result<()> {
    let mut graph = betadpo::graph::Graph::from_model(betadpo::onnx::load_model(path)?)?;
    graph.sort_topologically()?;
    betadpo::dpo::model::recognise(&graph, None)?;
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("model.onnx");
    std::fs::write(&path, data).unwrap();
    if let Err(e) = load(&path) {
        let msg = e.to_string();
        assert!(!msg.trim().is_empty() && !msg.contains('\n'), "an error must be one line: {msg:?}");
    }
});
