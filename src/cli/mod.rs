//! Command-line parsing: each subcommand lives in its own file with its `Args` and `run`.

use clap::{Parser, Subcommand};

mod inspect;
mod merge;

/// LoRA fine-tuning, merging and inspection, compatible with Hugging Face PEFT.
#[derive(Debug, Parser)]
#[command(name = "lora", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Merge an adapter into a checkpoint: `<module>.weight += ΔW`, tensor by tensor.
    Merge(merge::MergeArgs),
    /// Take an adapter back out of a merged checkpoint: `<module>.weight -= ΔW`.
    Unmerge(merge::MergeArgs),
    /// Show an adapter's config, modules, ranks, scales and sizes.
    Inspect(inspect::InspectArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Merge(a) => merge::run(a, lora::merge::Direction::Merge),
        Command::Unmerge(a) => merge::run(a, lora::merge::Direction::Unmerge),
        Command::Inspect(a) => inspect::run(a),
    }
}
