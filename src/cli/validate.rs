//! `betadpo validate`: its flags, and the checks of artifacts or a run printed one per line.

use std::path::PathBuf;

use anyhow::Result;
use betadpo::dpo::validate::{validate, ValidateOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Artifacts directory written by build-graph.
    dir: PathBuf,
    /// Random directions for the directional-derivative check.
    #[arg(long, default_value_t = 3)]
    directions: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Intra-op threads (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    betadpo::limits::at_most("--directions", a.directions, 1000, "random directions, each two runs of the train graph")?;
    let checks = validate(&a.dir, &ValidateOptions { directions: a.directions, seed: a.seed, threads: a.threads, ..Default::default() })?;
    let mut failed = 0;
    for c in &checks {
        println!("{} {:<40} {}", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail);
        failed += usize::from(!c.ok);
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed for {}", checks.len(), a.dir.display());
    }
    println!("all {} checks passed", checks.len());
    Ok(())
}
