use std::path::PathBuf;

use anyhow::{Context, Result};
use betadpo::dpo::export::{export_model, locate_run};

#[derive(clap::Args)]
pub struct Args {
    /// Run directory written by train.
    #[arg(long)]
    run: PathBuf,
    /// Output model file (its weights go to <file>.data beside it when large).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let found = locate_run(&a.run)?;
    export_model(&found.artifacts, &found.params, &a.out).with_context(|| format!("exporting {}", a.run.display()))?;
    println!("wrote {} (inputs input_ids, attention_mask; outputs logits, beta) from {}", a.out.display(), found.params.display());
    Ok(())
}
