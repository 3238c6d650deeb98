//! `lora embed`: sentence embeddings of a JSONL file's texts with a BERT sentence-transformers
//! folder (its pooling and normalisation), optionally with an adapter.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Args;
use lora::models::{LoraInit, SentenceEncoder};
use lora::tensor_file;
use lora::Adapter;

/// Arguments of `lora embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The model folder (sentence-transformers layout, or a plain BERT folder: mean pooling).
    #[arg(long)]
    model: PathBuf,
    /// An adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL, one `{"text": "..."}` per line.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `embeddings [n, dim]` (f32), atomically.
    #[arg(long)]
    out: PathBuf,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

/// Runs `lora embed`.
pub fn run(a: EmbedArgs) -> anyhow::Result<()> {
    if a.out == a.input {
        bail!(
            "{}: --out must not overwrite the --input file",
            a.out.display()
        );
    }
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let mut texts = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", a.input.display(), i + 1))?;
        let Some(t) = v.get("text").and_then(|t| t.as_str()) else {
            bail!("{}:{}: no string \"text\"", a.input.display(), i + 1);
        };
        texts.push(t.to_string());
    }
    if texts.is_empty() {
        bail!("{}: no texts", a.input.display());
    }
    let dev = Device::Cpu;
    let lora = a
        .adapter
        .as_deref()
        .map(|p| {
            Adapter::load(p, &dev)
                .with_context(|| format!("loading adapter {}", p.display()))
                .map(LoraInit::from)
        })
        .transpose()?;
    let enc = SentenceEncoder::open(&a.model, lora, &dev)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let e = enc.embed(&texts, a.batch_size).context("embedding")?;
    let (n, d) = e.dims2()?;
    let tensors = BTreeMap::from([("embeddings".to_string(), e)]);
    tensor_file::save(&a.out, &tensors, &tensor_file::pt_metadata())
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote embeddings [{n}, {d}] to {}", a.out.display());
    Ok(())
}
