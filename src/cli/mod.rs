//! Subcommands. Each lives in its own file and turns flags into library calls.

mod build_graph;
mod train;
mod validate;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "betadpo", version, about = "DPO with a learned, context-dependent beta, trained on ONNX Runtime", allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build training artifacts (train/eval/optimizer/inference graphs, parameters, manifest) from an exported causal LM.
    BuildGraph(build_graph::Args),
    /// Train with DPO (learned beta) on ONNX Runtime: metrics, checkpoints, exact resume.
    Train(train::Args),
    /// Check artifacts: structure, standard ops only, ONNX Runtime loads them, gradients agree with the loss.
    Validate(validate::Args),
}

pub fn run() -> Result<()> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => e.exit(),
        Err(e) => {
            // clap's usage block spans several lines; keep its first, which names the problem.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
            anyhow::bail!("{first} (see --help)");
        }
    };
    match cli.command {
        Command::BuildGraph(a) => build_graph::run(a),
        Command::Validate(a) => validate::run(a),
        Command::Train(a) => train::run(a),
    }
}
