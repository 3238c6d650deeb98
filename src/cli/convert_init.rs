//! `lora convert-init`: turn a PiSSA / OLoRA adapter (trained on the residual base) into a plain
//! rank-2r LoRA for the original base (PEFT's `path_initial_model_for_weight_conversion`).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lora::Adapter;

/// Arguments of `lora convert-init`.
#[derive(Debug, Args)]
pub struct ConvertInitArgs {
    /// The adapter as initialised, before training (`lora train` writes it to
    /// `<out>/initial_adapter`).
    #[arg(long)]
    initial: PathBuf,
    /// The trained adapter (on the residual base).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the plain LoRA adapter.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `lora convert-init`.
pub fn run(a: ConvertInitArgs) -> anyhow::Result<()> {
    let load = |p: &PathBuf| {
        Adapter::load(p, &Device::Cpu).with_context(|| format!("loading adapter {}", p.display()))
    };
    let (initial, trained) = (load(&a.initial)?, load(&a.adapter)?);
    if a.out.exists() && std::fs::read_dir(&a.out)?.next().is_some() {
        anyhow::bail!("{}: already exists and is not empty", a.out.display());
    }
    let converted = lora::convert::convert_init(&initial, &trained)?;
    converted
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "converted {} modules to a rank-{} LoRA for the original base; wrote {}",
        converted.modules.len(),
        converted.config.r,
        a.out.display()
    );
    Ok(())
}
