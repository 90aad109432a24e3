//! Subcommands. Each lives in its own file and turns flags into library calls.

mod build_graph;
mod validate;

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
    /// Check artifacts: structure, standard ops only, ONNX Runtime loads them, gradients agree with the loss.
    Validate(validate::Args),
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildGraph(a) => build_graph::run(a),
        Command::Validate(a) => validate::run(a),
    }
}
