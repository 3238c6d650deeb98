//! `lora serve`: one base model and many adapters behind an OpenAI-style HTTP API, requests for
//! different adapters decoded together in mixed batches (see `lora::serve`).

mod adapters;
pub(super) mod bench;
mod http;
mod worker;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use lora::models::Llama;

use super::generate::{generation_eos, load_tokenizer};

/// Arguments of `lora serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The base model folder (`config.json`, safetensors weights, `tokenizer.json`); served
    /// under the folder's name.
    #[arg(long)]
    model: PathBuf,
    /// An adapter to serve as model NAME (loaded on first use); repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Sequences decoded together in one batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_batch: u64,
    /// Adapters kept loaded (least recently used ones are dropped).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_adapters: u64,
    /// Requests queued or running before new ones get 503.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_queue: u64,
}

/// `NAME=DIR` → (name, dir).
fn parse_adapter(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    let Some((name, dir)) = spec
        .split_once('=')
        .filter(|(n, d)| !n.is_empty() && !d.is_empty())
    else {
        bail!("--adapter `{spec}`: expected NAME=DIR");
    };
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        bail!("--adapter {name}: {}: not a folder", dir.display());
    }
    Ok((name.to_string(), dir))
}

/// Sizes of the server's batch, adapter LRU and queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_batch: usize,
    pub max_adapters: usize,
    pub max_queue: usize,
}

/// Loads the base model and tokenizer of `model` and starts the batch thread.
pub(super) fn build_state(
    model_dir: &Path,
    paths: BTreeMap<String, PathBuf>,
    limits: Limits,
) -> anyhow::Result<Arc<http::AppState>> {
    let base_name = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "base".into());
    if paths.contains_key(&base_name) {
        bail!("--adapter {base_name}: the name is the base model's");
    }
    let tok = load_tokenizer(model_dir)?;
    let model = Llama::open(model_dir, None, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let mut eos = model.config().eos_token_ids();
    eos.extend(generation_eos(model_dir)?);
    let (ctx, vocab) = (
        model.config().max_position_embeddings,
        model.config().vocab_size,
    );
    let model = Arc::new(model);
    let worker = worker::Worker::spawn(model.clone(), limits.max_batch, limits.max_queue)?;
    Ok(Arc::new(http::AppState {
        base_name,
        base_path: model_dir.to_path_buf(),
        tok,
        eos,
        ctx,
        vocab,
        adapters: adapters::Adapters::new(model, paths, limits.max_adapters),
        worker,
        counter: AtomicU64::new(0),
    }))
}

/// Serves `state` on `listener` until `shutdown` completes.
pub(super) async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<http::AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving")
}

/// Runs `lora serve` until interrupted.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let mut paths = BTreeMap::new();
    for spec in &a.adapters {
        let (name, dir) = parse_adapter(spec)?;
        if paths.insert(name.clone(), dir).is_some() {
            bail!("--adapter {name}: the name is taken");
        }
    }
    let limits = Limits {
        max_batch: usize::try_from(a.max_batch)?,
        max_adapters: usize::try_from(a.max_adapters)?,
        max_queue: usize::try_from(a.max_queue)?,
    };
    let state = build_state(&a.model, paths, limits)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        drop(out);
        serve_on(listener, state, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
