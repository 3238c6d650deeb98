//! `lora inspect`: what an adapter holds.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lora::{merge, Adapter};

/// Arguments of `lora inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The adapter folder.
    adapter: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `lora inspect`.
pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let adapter = Adapter::load(&a.adapter, &Device::Cpu)
        .with_context(|| format!("loading adapter {}", a.adapter.display()))?;
    let modules = merge::summary(&adapter)?;
    let weights = lora::adapter::weights_path(&a.adapter);
    let bytes = std::fs::metadata(&weights)
        .with_context(|| weights.display().to_string())?
        .len();
    let cfg = &adapter.config;
    if a.json {
        let v = serde_json::json!({
            "path": a.adapter,
            "config": {
                "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "target_modules": cfg.target_modules,
                "task_type": cfg.task_type, "base_model_name_or_path": cfg.base_model_name_or_path,
            },
            "modules": modules,
            "modules_to_save": adapter.saved.iter()
                .map(|(n, t)| (n.clone(), t.dims().to_vec()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "embedding_copies": adapter.base_layers.iter()
                .map(|(n, t)| (n.clone(), t.dims().to_vec()))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "trainable_params": adapter.num_params(),
            "bytes_on_disk": bytes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("adapter   {}", a.adapter.display());
    println!(
        "config    r={} lora_alpha={} dropout={} rslora={} task_type={} base={}",
        cfg.r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.use_rslora,
        cfg.task_type.as_deref().unwrap_or("-"),
        cfg.base_model_name_or_path.as_deref().unwrap_or("-")
    );
    println!("targets   {}", serde_json::to_string(&cfg.target_modules)?);
    if cfg.use_dora {
        println!("dora      yes: a trained magnitude vector m per module (column m)");
    }
    let w = modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "\n{:<w$}  {:<9} {:>14} {:>14} {:>4} {:>7} {:>8} {:>9}{}",
        "module",
        "kind",
        "A",
        "B",
        "r",
        "alpha",
        "scale",
        "params",
        if cfg.use_dora { "  m" } else { "" }
    );
    for m in &modules {
        let mag = m
            .magnitude_shape
            .as_ref()
            .map_or(String::new(), |s| format!("  {s:?}"));
        println!(
            "{:<w$}  {:<9} {:>14} {:>14} {:>4} {:>7} {:>8.4} {:>9}{mag}",
            m.module,
            m.kind,
            format!("{:?}", m.a_shape),
            format!("{:?}", m.b_shape),
            m.rank,
            m.alpha,
            m.scale,
            m.params
        );
    }
    if !adapter.saved.is_empty() {
        println!("\nmodules_to_save (full trained copies, replace the base tensors)");
        for (n, t) in &adapter.saved {
            println!(
                "{n:<w$}  {:>14} {:>9}",
                format!("{:?}", t.dims()),
                t.elem_count()
            );
        }
    }
    if !adapter.base_layers.is_empty() {
        println!(
            "\nembedding copies (`<module>.base_layer.weight`, PEFT's save_embedding_layers; \
             they replace the base weight)"
        );
        for (n, t) in &adapter.base_layers {
            println!(
                "{n:<w$}  {:>14} {:>9}",
                format!("{:?}", t.dims()),
                t.elem_count()
            );
        }
    }
    println!(
        "\n{} modules, {} trainable parameters, {} bytes on disk",
        modules.len(),
        adapter.num_params(),
        bytes
    );
    Ok(())
}
