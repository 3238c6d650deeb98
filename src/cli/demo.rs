//! `lora demo`: the five checks of a LoRA linear layer at the seed's shapes (see `lora::app::demo`).

use clap::Args;
use lora::app::demo::{self, DemoOptions};

/// Arguments of `lora demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Seed of the input, weights, adapter init and updates.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Timed runs per inference variant (the median is reported).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    runs: u64,
}

/// Runs `lora demo`. Memory is measured with the binary's counting global allocator.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let options = DemoOptions {
        seed: a.seed,
        runs: usize::try_from(a.runs)?,
        ..DemoOptions::default()
    };
    let report = demo::run(&options, Some(&crate::ALLOC))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
