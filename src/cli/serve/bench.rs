//! `lora bench --serving`: mixed-adapter batching throughput, time to first token, and an HTTP
//! load test.
//!
//! Throughput: the baseline's small Llama (`scripts/peft_serving.py` builds the same shapes),
//! 8 random rank-8 adapters on every decoder linear; 16 sequences of 32 prompt tokens each
//! decode 64 new tokens greedily (no stop) through the [`Batcher`], all for one adapter
//! (`single`) or two per adapter (`mixed`), the two alternating run by run.
//!
//! Load test: `lora serve`'s router on a loopback port (the shipped quickstart model, 8
//! adapters), 200 concurrent completion requests over plain HTTP/1.1, each bounded by a
//! timeout; latency percentiles and the count of requests that did not return 200.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use lora::builder::{LoraBuilder, MapSource};
use lora::config::InitLoraWeights;
use lora::models::{Llama, LlamaConfig, Sampling, ServeAdapter};
use lora::serve::{Batcher, Event, SeqRequest};
use lora::LoraConfig;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};

use super::{build_state, serve_on, Limits};

const SEQS: usize = 16;
const PROMPT: usize = 32;
const NEW: usize = 64;
const ADAPTERS: usize = 8;
const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The baseline's small Llama (vocab 4096, hidden 512, 4 layers), random weights.
fn bench_weights(cfg: &LlamaConfig) -> anyhow::Result<BTreeMap<String, candle_core::Tensor>> {
    let rng = lora::LoraRng::new(7);
    let dev = Device::Cpu;
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![v, h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, sh) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [h, h]),
            ("self_attn.v_proj", [h, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), sh.to_vec()));
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    shapes
        .into_iter()
        .map(|(n, sh)| {
            let std = if n.ends_with("norm.weight") {
                0.0
            } else {
                0.02
            };
            let t = lora::layers::normal(&sh, std, &rng, &dev)?;
            let t = if std == 0.0 { t.ones_like()? } else { t };
            Ok((n, t))
        })
        .collect()
}

/// The base model and `ADAPTERS` random adapters prepared for batching.
fn bench_model() -> anyhow::Result<(Arc<Llama>, Vec<Arc<ServeAdapter>>)> {
    let cfg: LlamaConfig = serde_json::from_value(json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 4096, "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": 512, "tie_word_embeddings": false
    }))?;
    let w = bench_weights(&cfg)?;
    let vb = || LoraBuilder::new(MapSource::new(w.clone()), DType::F32, Device::Cpu);
    let base = Llama::load(&cfg, &vb())?;
    let adapters = (0..ADAPTERS)
        .map(|i| {
            let mut lc = LoraConfig::new(8, 16.0, &TARGETS);
            lc.init_lora_weights = InitLoraWeights::Random;
            let m = Llama::load(&cfg, &vb().with_config(lc)?.with_seed(i as u64 + 1)?)?;
            Ok(Arc::new(base.serve_adapter(&m.adapter()?)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((Arc::new(base), adapters))
}

/// Decodes `SEQS` sequences (sequence `i` with `adapter_of(i)`) to the end: tokens/s over the
/// whole run and the median time to first token (ms).
fn run_batch(
    base: &Arc<Llama>,
    adapters: &[Arc<ServeAdapter>],
    adapter_of: impl Fn(usize) -> usize,
) -> anyhow::Result<(f64, f64)> {
    let vocab = base.config().vocab_size;
    let mut b = Batcher::new(base.clone(), SEQS);
    let t0 = Instant::now();
    for i in 0..SEQS {
        let prompt = (0..PROMPT)
            .map(|j| ((i * 131 + j * 17) % vocab) as u32)
            .collect();
        b.add(
            i as u64,
            SeqRequest {
                prompt,
                adapter: Some(adapters[adapter_of(i)].clone()),
                max_new_tokens: NEW,
                sampling: Sampling::default(),
                stop: vec![],
            },
        )?;
    }
    let mut first = vec![None; SEQS];
    let mut tokens = 0usize;
    while !b.is_empty() {
        for (id, ev) in b.step()? {
            if let Event::Token(_) = ev {
                tokens += 1;
                first[id as usize].get_or_insert(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut ttft: Vec<f64> = first.into_iter().flatten().collect();
    Ok((tokens as f64 / wall, median(&mut ttft)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The p-th percentile (nearest rank) of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let k = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

/// The throughput keys: `runs` alternating single/mixed runs, medians.
pub fn throughput(runs: usize) -> anyhow::Result<Map<String, Value>> {
    let (base, adapters) = bench_model()?;
    run_batch(&base, &adapters, |_| 0)?; // warm-up
    let (mut single, mut mixed, mut ttft_s, mut ttft_m) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let (t, f) = run_batch(&base, &adapters, |_| 0)?;
        single.push(t);
        ttft_s.push(f);
        let (t, f) = run_batch(&base, &adapters, |i| i % ADAPTERS)?;
        mixed.push(t);
        ttft_m.push(f);
    }
    let (s, m) = (median(&mut single), median(&mut mixed));
    let mut res = Map::new();
    res.insert("serve_single_adapter_tokens_per_s".into(), s.into());
    res.insert("serve_mixed_8_adapters_tokens_per_s".into(), m.into());
    res.insert("serve_mixed_over_single".into(), (m / s).into());
    res.insert("serve_single_ttft_ms".into(), median(&mut ttft_s).into());
    res.insert("serve_mixed_ttft_ms".into(), median(&mut ttft_m).into());
    res.insert(
        "serve_config".into(),
        json!({"vocab": 4096, "hidden": 512, "intermediate": 1408, "layers": 4, "heads": 8,
               "requests": SEQS, "prompt": PROMPT, "new_tokens": NEW, "adapters": ADAPTERS,
               "r": 8, "alpha": 16, "targets": TARGETS, "runs": runs}),
    );
    Ok(res)
}

/// One POST over a fresh connection, each read and write bounded by `timeout`: (status,
/// latency ms).
fn post(addr: std::net::SocketAddr, body: &str, timeout: Duration) -> anyhow::Result<(u16, f64)> {
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {head:?}"))?;
    Ok((status, t0.elapsed().as_secs_f64() * 1e3))
}

/// The load test: `n` concurrent requests, each bounded by `timeout`.
pub fn load_test(n: usize, timeout: Duration) -> anyhow::Result<Map<String, Value>> {
    let dir = std::env::temp_dir().join(format!("lora-serve-bench-{}", std::process::id()));
    let result = load_test_in(&dir, n, timeout);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn load_test_in(
    dir: &std::path::Path,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Map<String, Value>> {
    let base = dir.join("base");
    std::fs::create_dir_all(&base)?;
    for (name, bytes) in lora::app::quickstart::run::BASE_FILES {
        std::fs::write(base.join(name), bytes)?;
    }
    let mut paths = BTreeMap::new();
    for i in 0..ADAPTERS {
        let mut lc = LoraConfig::new(4, 8.0, &TARGETS);
        lc.init_lora_weights = InitLoraWeights::Random;
        let cfg = LlamaConfig::from_dir(&base)?;
        let ck = lora::Checkpoint::open(&base)?;
        let vb = LoraBuilder::new(ck, DType::F32, Device::Cpu)
            .with_config(lc)?
            .with_seed(i as u64 + 1)?;
        let d = dir.join(format!("a{i}"));
        Llama::load(&cfg, &vb)?.adapter()?.save(&d)?;
        paths.insert(format!("a{i}"), d);
    }
    let state = build_state(
        &base,
        paths,
        Limits {
            max_batch: 32,
            max_adapters: ADAPTERS,
            max_queue: 4 * n,
        },
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve_on(listener, state, async {
        let _ = stop_rx.await;
    }));
    // One client thread per request, all at once; every read and write has a deadline.
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<(u16, f64)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let model = if i % (ADAPTERS + 1) == ADAPTERS {
                    "base".to_string()
                } else {
                    format!("a{}", i % (ADAPTERS + 1))
                };
                let prompts = ["The cat", "Once upon a time", "hello there", "Q: why?\nA:"];
                let body = json!({"model": model, "prompt": prompts[i % 4],
                                  "max_tokens": 16, "temperature": 0})
                .to_string();
                sc.spawn(move || post(addr, &body, timeout))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    let mut lat: Vec<f64> = results
        .iter()
        .filter_map(|r| match r {
            Ok((200, ms)) => Some(*ms),
            _ => None,
        })
        .collect();
    let failed = n - lat.len();
    lat.sort_by(f64::total_cmp);
    let mut res = Map::new();
    res.insert("serve_load_requests".into(), n.into());
    res.insert("serve_load_ok".into(), lat.len().into());
    res.insert("serve_load_failed".into(), failed.into());
    res.insert("serve_load_p50_ms".into(), percentile(&lat, 50.0).into());
    res.insert("serve_load_p99_ms".into(), percentile(&lat, 99.0).into());
    res.insert("serve_load_wall_s".into(), wall.into());
    res.insert(
        "serve_load_requests_per_s".into(),
        (lat.len() as f64 / wall).into(),
    );
    Ok(res)
}
