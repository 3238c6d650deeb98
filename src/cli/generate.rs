//! `lora generate`: complete a prompt with a Llama-family model (optionally with an adapter),
//! streaming tokens to stdout as they come.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;
use lora::models::{generate, Sampler, Sampling};
use tokenizers::Tokenizer;

use super::logits::{open_model, parse_dtype};

/// Arguments of `lora generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model folder (`config.json`, safetensors weights and `tokenizer.json`).
    #[arg(long)]
    model: PathBuf,
    /// An adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fold the adapter into the weights first (faster).
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// At most this many new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The dtype weights are loaded and run in: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
}

/// Loads `<model>/tokenizer.json`.
pub(super) fn load_tokenizer(model: &Path) -> anyhow::Result<Tokenizer> {
    let path = model.join("tokenizer.json");
    if !path.is_file() {
        bail!(
            "{}: not found (generate needs the tokenizer.json that transformers saves with the model)",
            path.display()
        );
    }
    let mut tok =
        Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // A prompt is one text: the file's own padding (sentence-transformers' files fix a length)
    // and truncation would add pad tokens or cut it, which transformers does not do either.
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(tok)
}

/// End-of-sequence ids from `generation_config.json`, if the folder has one.
pub(super) fn generation_eos(model: &Path) -> anyhow::Result<Vec<u32>> {
    let path = model.join("generation_config.json");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let ids = match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).collect(),
        _ => vec![],
    };
    Ok(ids.into_iter().map(|i: u64| i as u32).collect())
}

/// Prints the text of `ids` beyond what was already printed (`printed` bytes), once it decodes
/// to whole characters.
fn stream(tok: &Tokenizer, ids: &[u32], printed: &mut usize) -> anyhow::Result<()> {
    let text = tok
        .decode(ids, true)
        .map_err(|e| anyhow::anyhow!("decoding tokens: {e}"))?;
    if text.len() > *printed && !text.ends_with('\u{FFFD}') && text.is_char_boundary(*printed) {
        let mut out = std::io::stdout().lock();
        out.write_all(&text.as_bytes()[*printed..])?;
        out.flush()?;
        *printed = text.len();
    }
    Ok(())
}

/// Runs `lora generate`.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let tok = load_tokenizer(&a.model)?;
    let mut sampler = Sampler::new(Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    })?;
    let model = open_model(&a.model, a.adapter.as_deref(), a.merge, a.dtype)?;
    let enc = tok
        .encode(a.prompt.as_str(), true)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt = enc.get_ids().to_vec();
    let mut stop = model.config().eos_token_ids();
    stop.extend(generation_eos(&a.model)?);
    let mut new = Vec::new();
    let mut printed = 0;
    let done = generate::<anyhow::Error>(
        &model,
        &prompt,
        a.max_new_tokens,
        &mut sampler,
        &stop,
        |t| {
            new.push(t);
            stream(&tok, &new, &mut printed)
        },
    )
    .and_then(|_| Ok(writeln!(std::io::stdout())?));
    match done {
        // The reader went away (`lora generate ... | head -1`): stop quietly, as Unix tools do.
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// Whether `e` is a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
