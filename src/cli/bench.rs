//! `lora bench`: the PyTorch + PEFT baseline's measurements (same keys), see `lora::app::bench`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// Arguments of `lora bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Also write the results as JSON (the baseline's keys) to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Timed runs per layer measurement (the Llama step runs max(5, N/3) times, as the baseline).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    runs: u64,
    /// Only the layer measurements (skip the Llama training step).
    #[arg(long)]
    layers_only: bool,
    /// Only the serving measurements: 16 concurrent requests to one adapter and over 8
    /// adapters (tokens/s, time to first token), and a 200-request HTTP load test.
    #[arg(long, conflicts_with = "layers_only")]
    serving: bool,
}

/// Runs `lora bench`: layer timings, the Llama LoRA training step, the memory ledger and the
/// peak RSS. Threads: `RAYON_NUM_THREADS` (all cores by default).
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.json {
        // Fail before minutes of measuring, not after.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            anyhow::bail!("{}: the folder does not exist", path.display());
        }
    }
    let runs = usize::try_from(a.runs)?;
    let mut res = serde_json::Map::new();
    res.insert("candle".into(), "0.11".into());
    res.insert("cpu".into(), lora::app::bench::cpu_info());
    res.insert(
        "threads".into(),
        candle_core::utils::get_num_threads().into(),
    );
    if a.serving {
        res.extend(super::serve::bench::throughput((runs / 3).max(3))?);
        res.extend(super::serve::bench::load_test(
            200,
            std::time::Duration::from_secs(300),
        )?);
    } else {
        let layer = lora::app::bench::layer_bench(runs)?;
        if let serde_json::Value::Object(m) = serde_json::to_value(&layer)? {
            res.extend(m);
        }
    }
    if !a.layers_only && !a.serving {
        let llama = lora::app::bench::llama_bench((runs / 3).max(5), Some(&crate::ALLOC))?;
        if let serde_json::Value::Object(m) = serde_json::to_value(&llama)? {
            res.extend(m);
        }
    }
    if let Some(mib) = lora::app::bench::peak_rss_mib() {
        res.insert("peak_rss_mib".into(), mib.into());
    }
    for (k, v) in &res {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                println!("{k}: {:.3}", n.as_f64().unwrap_or(f64::NAN))
            }
            other => println!("{k}: {other}"),
        }
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(res))?;
        lora::tensor_file::write_text_atomic(path, &(text + "\n")).context("writing the JSON")?;
    }
    Ok(())
}
