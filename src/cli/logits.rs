//! `lora logits`: run a Llama-family model (optionally with an adapter) on token ids from a
//! safetensors file and write the logits, for comparison with transformers + PEFT.
//!
//! A `*ForSequenceClassification` checkpoint (BERT, Llama, Mistral, Qwen2) gives
//! `logits [batch, num_labels]`; the ids file may also hold `attention_mask` and
//! `token_type_ids` (BERT) beside the ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use lora::models::{CausalLm, Llama, LoraInit};
use lora::tensor_file::{self, SafeFile};
use lora::Adapter;

/// The key read from `--ids` when none is given.
const DEFAULT_IDS_KEY: &str = "input_ids";

/// Arguments of `lora logits`.
#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// The model folder (`config.json` + safetensors weights, as transformers saves them).
    #[arg(long)]
    model: PathBuf,
    /// An adapter folder to apply (`adapter_config.json` + `adapter_model.safetensors`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fold the adapter into the weights before running.
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// Token ids `[batch, seq]` (integers): `FILE.safetensors[:KEY]`, key `input_ids` by default.
    #[arg(long, value_name = "FILE[:KEY]")]
    ids: String,
    /// Where to write `logits` `[batch, seq, vocab]` (f32), atomically.
    #[arg(long)]
    out: PathBuf,
    /// The dtype weights are loaded and run in: f32, bf16 or f16 (logits are written in f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
}

/// Parses `f32`, `bf16`, `f16`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(format!("`{s}` is not one of f32, bf16, f16")),
    }
}

/// Opens `--model` with `--adapter` (merged when `merge`).
pub fn open_model(
    model: &Path,
    adapter: Option<&Path>,
    merge: bool,
    dtype: DType,
) -> anyhow::Result<Llama> {
    let dev = Device::Cpu;
    let lora = adapter
        .map(|a| {
            Adapter::load(a, &dev)
                .with_context(|| format!("loading adapter {}", a.display()))
                .map(LoraInit::from)
        })
        .transpose()?;
    let mut llama = Llama::open(model, lora, dtype, &dev)
        .with_context(|| format!("loading model {}", model.display()))?;
    if merge {
        llama.merge_adapters().context("merging the adapter")?;
    }
    Ok(llama)
}

/// `FILE[:KEY]` → (file, key): the whole string when it names a file.
fn split_ids_spec(spec: &str) -> (PathBuf, String) {
    if Path::new(spec).is_file() {
        return (spec.into(), DEFAULT_IDS_KEY.into());
    }
    match spec.rsplit_once(':') {
        Some((p, k)) if !p.is_empty() && !k.is_empty() => (p.into(), k.into()),
        _ => (spec.into(), DEFAULT_IDS_KEY.into()),
    }
}

/// Reads integer ids `[batch, seq]` (or `[seq]`) and checks them against the vocabulary.
fn read_ids(spec: &str, vocab: usize) -> anyhow::Result<Tensor> {
    let (path, key) = split_ids_spec(spec);
    let file = SafeFile::open(&path)?;
    let t = file.tensor(&key, &Device::Cpu)?;
    let what = format!("ids tensor `{key}` in {}", path.display());
    if !matches!(t.dtype(), DType::I64 | DType::U32 | DType::U8) {
        bail!(
            "{what} has dtype {:?}; token ids must be integers (i64)",
            t.dtype()
        );
    }
    let t = match t.rank() {
        1 => t.unsqueeze(0)?,
        2 => t,
        _ => bail!("{what} has shape {:?}; expected [batch, seq]", t.dims()),
    };
    if t.elem_count() == 0 {
        bail!("{what} is empty");
    }
    let t = t.to_dtype(DType::I64)?;
    let (lo, hi) = (
        t.min_all()?.to_scalar::<i64>()?,
        t.max_all()?.to_scalar::<i64>()?,
    );
    if lo < 0 || hi >= vocab as i64 {
        bail!("{what} holds ids in {lo}..={hi}, outside the vocabulary 0..{vocab}");
    }
    Ok(t.to_dtype(DType::U32)?)
}

/// Runs `lora logits`.
pub fn run(a: LogitsArgs) -> anyhow::Result<()> {
    let (ids_path, _) = split_ids_spec(&a.ids);
    if a.out == ids_path {
        bail!(
            "{}: --out must not overwrite the --ids file",
            a.out.display()
        );
    }
    if is_classifier(&a.model)? {
        return run_classifier(&a);
    }
    let model = open_model(&a.model, a.adapter.as_deref(), a.merge, a.dtype)?;
    let ids = read_ids(&a.ids, model.config().vocab_size)?;
    let logits = model.forward_t(&ids, false).context("running the model")?;
    let tensors = BTreeMap::from([("logits".to_string(), logits)]);
    tensor_file::save(&a.out, &tensors, &tensor_file::pt_metadata())
        .with_context(|| format!("writing {}", a.out.display()))?;
    let (b, t, v) = tensors["logits"].dims3()?;
    println!("wrote logits [{b}, {t}, {v}] to {}", a.out.display());
    Ok(())
}

/// Whether `<model>/config.json` names a `*ForSequenceClassification`. An unreadable or
/// malformed config is `false` here: the model loader then reports it.
pub fn is_classifier(model: &Path) -> anyhow::Result<bool> {
    let Ok(text) = std::fs::read_to_string(model.join("config.json")) else {
        return Ok(false);
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(false);
    };
    Ok(v.get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .is_some_and(|a| a.ends_with("ForSequenceClassification")))
}

/// Opens a classifier with `--adapter` (merged when `merge`).
pub fn open_classifier(
    model: &Path,
    adapter: Option<&Path>,
    merge: bool,
    dtype: DType,
) -> anyhow::Result<lora::models::Classifier> {
    let dev = Device::Cpu;
    let lora = adapter
        .map(|a| {
            Adapter::load(a, &dev)
                .with_context(|| format!("loading adapter {}", a.display()))
                .map(LoraInit::from)
        })
        .transpose()?;
    let mut m = lora::models::Classifier::open(model, lora, dtype, &dev)
        .with_context(|| format!("loading model {}", model.display()))?;
    if merge {
        m.merge_adapters().context("merging the adapter")?;
    }
    Ok(m)
}

/// `lora logits` for a sequence classifier: `logits [batch, num_labels]`.
fn run_classifier(a: &LogitsArgs) -> anyhow::Result<()> {
    let m = open_classifier(&a.model, a.adapter.as_deref(), a.merge, a.dtype)?;
    let vocab = match &m {
        lora::models::Classifier::Bert(b) => b.config().vocab_size,
        lora::models::Classifier::Llama(l) => l.config().vocab_size,
    };
    let ids = read_ids(&a.ids, vocab)?;
    let (path, _) = split_ids_spec(&a.ids);
    let file = SafeFile::open(&path)?;
    let side = |key: &str| -> anyhow::Result<Option<Tensor>> {
        if !file.names().iter().any(|n| n == key) {
            return Ok(None);
        }
        let t = file.tensor(key, &Device::Cpu)?.to_dtype(DType::U32)?;
        if t.dims() != ids.dims() {
            bail!(
                "`{key}` in {} has shape {:?}, the ids {:?}",
                path.display(),
                t.dims(),
                ids.dims()
            );
        }
        Ok(Some(t))
    };
    let x = lora::models::ClassifierInputs {
        attention_mask: side("attention_mask")?,
        token_type_ids: side("token_type_ids")?,
        input_ids: ids,
    };
    let logits = m.logits(&x, false).context("running the model")?;
    let (b, n) = logits.dims2()?;
    let tensors = BTreeMap::from([("logits".to_string(), logits)]);
    tensor_file::save(&a.out, &tensors, &tensor_file::pt_metadata())
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote logits [{b}, {n}] to {}", a.out.display());
    Ok(())
}
