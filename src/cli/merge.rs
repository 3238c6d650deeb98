//! `lora merge` / `lora unmerge`: fold an adapter into a checkpoint, or take it back out.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lora::merge::{merge_checkpoint, Direction, MergeOptions};
use lora::Adapter;

/// Arguments of `lora merge` and `lora unmerge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base checkpoint: a `.safetensors` file or a model folder (sharded or not).
    #[arg(long)]
    base: PathBuf,
    /// The adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write: a file for a file base, a folder for a folder base.
    #[arg(long)]
    out: PathBuf,
    /// Re-read the output and report max |written − (base ± ΔW)|.
    #[arg(long)]
    verify: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Refuse an adapter whose file holds tensors PEFT would not load (modules its config does
    /// not target); by default a warning lists them and they are left out, as PEFT does.
    #[arg(long)]
    strict: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `lora merge` or `lora unmerge`.
pub fn run(a: MergeArgs, direction: Direction) -> anyhow::Result<()> {
    let (adapter, ignored) = Adapter::load_report(&a.adapter, &Device::Cpu)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    if !ignored.is_empty() {
        let list = ignored.join(", ");
        if a.strict {
            anyhow::bail!(
                "{}: {} tensors of modules the config does not target, which PEFT would not load \
                 (--strict): {list}",
                a.adapter.display(),
                ignored.len()
            );
        }
        eprintln!(
            "warning: {}: left out {} tensors of modules the config does not target, as PEFT \
             does (--strict refuses them): {list}",
            a.adapter.display(),
            ignored.len()
        );
    }
    let opts = MergeOptions {
        direction,
        verify: a.verify,
        force: a.force,
    };
    let verb = if direction == Direction::Merge {
        "merging"
    } else {
        "unmerging"
    };
    let report = merge_checkpoint(&a.base, &adapter, &a.out, opts)
        .with_context(|| format!("{verb} into {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} {} modules; wrote {} tensors to {}",
        if direction == Direction::Merge {
            "merged"
        } else {
            "unmerged"
        },
        report.modules_merged,
        report.tensors_written,
        a.out.display()
    );
    if let Some(d) = report.verify_max_abs_diff {
        println!(
            "verify: max |written - (base {} delta)| = {d:.3e}",
            if direction == Direction::Merge {
                "+"
            } else {
                "-"
            }
        );
    }
    Ok(())
}
