//! `lora combine`: a weighted combination of adapters (PEFT's `add_weighted_adapter`).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lora::algebra::{combine, save_adapter_dir, CombineOptions, Method, SignMethod};
use lora::Adapter;

/// Arguments of `lora combine`.
#[derive(Debug, Args)]
pub struct CombineArgs {
    /// An input adapter folder; repeat for each adapter.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (negative weights subtract): `0.7,0.3`.
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        required = true
    )]
    weights: Vec<f64>,
    /// linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, or the `_svd` variant of a
    /// pruning method (ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd).
    #[arg(long, default_value = "svd")]
    method: String,
    /// The rank of svd results (default: the largest input rank).
    #[arg(long)]
    rank: Option<usize>,
    /// The fraction of elements kept by the pruning methods, in (0, 1].
    #[arg(long)]
    density: Option<f64>,
    /// How ties methods elect the sign: total (sign of the sum) or frequency (majority of signs).
    #[arg(long, default_value = "total")]
    majority_sign: String,
    /// The seed of the dare methods' random masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
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

/// Runs `lora combine`.
pub fn run(a: CombineArgs) -> anyhow::Result<()> {
    let method: Method = a.method.parse()?;
    let majority_sign = match a.majority_sign.as_str() {
        "total" => SignMethod::Total,
        "frequency" => SignMethod::Frequency,
        other => anyhow::bail!("--majority-sign `{other}`: use total or frequency"),
    };
    let adapters = a
        .adapters
        .iter()
        .map(|p| {
            Adapter::load(p, &Device::Cpu)
                .with_context(|| format!("loading adapter {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let labels: Vec<String> = a.adapters.iter().map(|p| p.display().to_string()).collect();
    let inputs: Vec<(&str, &Adapter)> = labels.iter().map(String::as_str).zip(&adapters).collect();
    let opts = CombineOptions {
        method,
        weights: a.weights.clone(),
        rank: a.rank,
        density: a.density,
        majority_sign,
        seed: a.seed,
    };
    let (combined, report) = combine(&inputs, &opts)?;
    let input_paths: Vec<&std::path::Path> = a.adapters.iter().map(PathBuf::as_path).collect();
    save_adapter_dir(&combined, &a.out, a.force, &input_paths, "combine")
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    let mut ranks: Vec<usize> = report.module_ranks.values().copied().collect();
    ranks.sort();
    ranks.dedup();
    println!(
        "{} of {} adapters (weights {:?}): {} modules, r = lora_alpha = {} (module ranks {:?}), {} parameters",
        report.method,
        adapters.len(),
        a.weights,
        report.module_ranks.len(),
        report.rank,
        ranks,
        combined.num_params()
    );
    if method.is_random() {
        println!("dare masks drawn with --seed {}", a.seed);
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
