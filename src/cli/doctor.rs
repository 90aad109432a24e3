//! `betadpo doctor`: what ONNX Runtime and the GPU stack this machine has, for an execution provider.

use anyhow::Result;
use betadpo::runtime::{doctor, ExecutionProvider};

#[derive(clap::Args)]
pub struct Args {
    /// The execution provider to check (cpu, cuda, tensorrt); a GPU provider's libraries are provisioned
    /// as a run would, once a usable NVIDIA driver is found.
    #[arg(long, default_value = "cpu")]
    ep: ExecutionProvider,
}

pub fn run(a: Args) -> Result<()> {
    let report = doctor::examine(&a.ep);
    let width = report.lines.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    for (label, value) in &report.lines {
        println!("{label:<width$}  {value}");
    }
    if let Some(problem) = report.problem {
        anyhow::bail!(problem);
    }
    println!("the {} execution provider can run here", a.ep.display_name());
    Ok(())
}
