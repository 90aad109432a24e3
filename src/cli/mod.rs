//! Subcommands. Each lives in its own file and turns flags into library calls.

mod build_graph;
mod doctor;
mod export;
mod infer;
mod quickstart;
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
    /// Write the trained model with its beta head as one ONNX model (outputs logits and beta).
    Export(export::Args),
    /// Print the learned beta per prompt (and optionally a greedy continuation).
    Infer(infer::Args),
    /// The whole pipeline on the bundled tiny model and data, in a few minutes on a CPU.
    Quickstart(quickstart::Args),
    /// Check what an execution provider needs on this machine: ONNX Runtime, driver, GPUs, CUDA/cuDNN/TensorRT libraries.
    Doctor(doctor::Args),
    /// Check artifacts: structure, standard ops only, ONNX Runtime loads them, gradients agree with the loss.
    Validate(validate::Args),
}

pub fn run() -> Result<()> {
    let cli = match Cli::try_parse_from(train::expand_config(std::env::args_os().collect())?) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) if negative_value_flag(&e).is_some() => {
            let (flag, value) = negative_value_flag(&e).unwrap_or_default();
            anyhow::bail!(betadpo::Error::BadFlag { flag, detail: format!("{value} (a negative number cannot work here)") });
        }
        Err(e) => anyhow::bail!("{} (see --help)", one_line_clap_error(&e.render().to_string())),
    };
    match cli.command {
        Command::BuildGraph(a) => build_graph::run(a),
        Command::Validate(a) => validate::run(a),
        Command::Train(a) => train::run(a),
        Command::Export(a) => export::run(a),
        Command::Infer(a) => infer::run(a),
        Command::Quickstart(a) => quickstart::run(a),
        Command::Doctor(a) => doctor::run(a),
    }
}

/// clap reads a negative number given to a flag that takes none (`--batch-size -2`, or
/// `--lr -1e-3`, whose exponent clap does not see as a number) as an unknown short option. The
/// flag before it is the one to name.
fn negative_value_flag(e: &clap::Error) -> Option<(String, String)> {
    if e.kind() != clap::error::ErrorKind::UnknownArgument {
        return None;
    }
    let bad = e.get(clap::error::ContextKind::InvalidArg)?.to_string();
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a.starts_with(&bad) && a.parse::<f64>().is_ok_and(|v| v < 0.0))?;
    let flag = args[..i].last().filter(|f| f.starts_with("--"))?;
    Some((flag.clone(), args[i].clone()))
}

/// clap's message on one line: everything before its usage block, which names the problem and
/// what it concerns (the missing flags are on the lines after the first; a tip names the flag
/// meant), joined.
fn one_line_clap_error(text: &str) -> String {
    let lines: Vec<&str> =
        text.lines().take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information")).map(str::trim).filter(|l| !l.is_empty()).collect();
    let joined = lines.join(" ");
    let joined = joined.trim_start_matches("error: ");
    if joined.is_empty() {
        "invalid arguments".into()
    } else {
        joined.to_string()
    }
}
