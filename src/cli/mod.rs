//! Subcommands. Each lives in its own file and turns flags into library calls.

mod build_graph;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "betadpo", version, about = "DPO with a learned, context-dependent beta, trained on ONNX Runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build training artifacts (train/eval/optimizer/inference graphs, parameters, manifest) from an exported causal LM.
    BuildGraph(build_graph::Args),
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildGraph(a) => build_graph::run(a),
    }
}
