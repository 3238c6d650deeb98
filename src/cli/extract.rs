//! `lora extract`: a LoRA adapter from a full fine-tune (truncated SVD of tuned − base).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use lora::algebra::{extract, save_adapter_dir, ExtractOptions, RankSpec};
use lora::Checkpoint;

/// Arguments of `lora extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The base checkpoint: a `.safetensors` file or a model folder.
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned checkpoint, same layout and names as the base.
    #[arg(long)]
    tuned: PathBuf,
    /// The rank per module: a number (capped at min(out, in)), or auto:F for the smallest rank
    /// keeping the fraction F of each change's energy Σσ² (e.g. auto:0.9).
    #[arg(long)]
    rank: String,
    /// Only these modules (names or dot-aligned suffixes, comma-separated): q_proj,v_proj.
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Refuse when a changed tensor cannot be carried by a LoRA (norms, biases, new tensors),
    /// instead of leaving it out with a warning.
    #[arg(long)]
    strict: bool,
    /// The output adapter folder.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `lora extract`.
pub fn run(a: ExtractArgs) -> anyhow::Result<()> {
    let rank: RankSpec = a.rank.parse()?;
    let base =
        Checkpoint::open(&a.base).with_context(|| format!("opening {}", a.base.display()))?;
    let tuned =
        Checkpoint::open(&a.tuned).with_context(|| format!("opening {}", a.tuned.display()))?;
    let opts = ExtractOptions {
        rank,
        target_modules: a.target_modules.clone(),
        strict: a.strict,
    };
    let (adapter, report) = extract(&base, &tuned, &opts)?;
    save_adapter_dir(&adapter, &a.out, a.force, &[&a.base, &a.tuned], "extract")
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let width = report
        .modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6);
    println!(
        "{:width$}  {:>12}  {:>9}  {:>12}",
        "module", "shape", "rank", "kept energy"
    );
    for m in &report.modules {
        let shape = format!("{}x{}", m.shape[0], m.shape[1]);
        println!(
            "{:width$}  {:>12}  {:>4}/{:<4}  {:>11.4}%",
            m.module,
            shape,
            m.rank,
            m.full_rank,
            100.0 * m.kept_energy
        );
    }
    for l in &report.left_out {
        eprintln!("warning: left out `{}`: {}", l.tensor, l.reason);
    }
    println!(
        "{} modules, r = lora_alpha = {}, {} parameters for {} changed weights ({:.2}%); {} tensors unchanged, {} left out",
        report.modules.len(),
        report.rank,
        report.params,
        report.replaced_params,
        100.0 * report.params as f64 / report.replaced_params.max(1) as f64,
        report.unchanged,
        report.left_out.len()
    );
    println!("wrote {}", a.out.display());
    Ok(())
}
