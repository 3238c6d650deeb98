//! `lora bench`: the same measurements as `shared/bench/peft_baseline.py` (PyTorch + PEFT), with
//! the same shapes and keys, so the two can be run back to back and compared as ratios.
//!
//! Layer (the seed's shape): x `[32, 128, 768]` → 512, r 8, α 16, f32 —
//! plain forward, LoRA train step (`L = sum(y)`, grads for A and B, by the layer's own
//! backward; also through candle's autograd), the same with dX,
//! unmerged and merged inference. Timings are medians after warm-up.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::config::InitLoraWeights;
use crate::error::Result;
use crate::layers::{normal, LoraLinear, LoraRng, LoraSpec, Mergeable};

/// The median of `runs` timings of `f` in milliseconds, after `warm` untimed calls.
pub fn median_ms(runs: usize, warm: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    let mut ts = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

/// The medians (ms) of `N` functions timed in turn: each round calls every function once, so
/// all of them see the same machine state; `warm` untimed rounds first.
pub fn medians_interleaved<const N: usize>(
    runs: usize,
    warm: usize,
    fs: [&dyn Fn() -> Result<()>; N],
) -> Result<[f64; N]> {
    for _ in 0..warm {
        for f in &fs {
            f()?;
        }
    }
    let mut ts: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(runs.max(1)));
    for _ in 0..runs.max(1) {
        for (f, t) in fs.iter().zip(ts.iter_mut()) {
            let start = Instant::now();
            f()?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(ts.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }))
}

/// The layer half of the PEFT baseline's keys.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBench {
    /// `nn.Linear(768, 512)` forward, ms.
    pub layer_plain_forward_ms: f64,
    /// LoRA layer step for `L = sum(y)` with grads for A and B only
    /// ([`LoraLinear::forward_backward`]: the layer's own backward, no autograd), ms.
    pub layer_lora_train_step_ms: f64,
    /// The same with the input's gradient too (as inside a network), ms.
    pub layer_lora_train_step_with_dx_ms: f64,
    /// The step as `forward_t(x).sum_all().backward()` through candle's autograd (not in the
    /// baseline), ms.
    pub layer_lora_train_step_autograd_ms: f64,
    /// The same with the input's gradient (not in the baseline), ms.
    pub layer_lora_train_step_with_dx_autograd_ms: f64,
    /// Unmerged LoRA inference, ms.
    pub layer_unmerged_forward_ms: f64,
    /// Merged LoRA inference, ms.
    pub layer_merged_forward_ms: f64,
}

/// Runs the layer benchmarks at the seed's shape with `runs` timed runs each.
pub fn layer_bench(runs: usize) -> Result<LayerBench> {
    let dev = Device::Cpu;
    let rng = LoraRng::new(0);
    let x = normal(&[32, 128, 768], 1.0, &rng, &dev)?;
    let w = normal(&[512, 768], 0.02, &rng, &dev)?;
    let b = normal(&[512], 0.02, &rng, &dev)?;
    let plain = LoraLinear::frozen(w.clone(), Some(b.clone()));
    let spec = LoraSpec {
        init: InitLoraWeights::Random,
        ..LoraSpec::new(8, 16.0)
    };
    let mut lora = LoraLinear::new(w, Some(b), &spec, &rng, "0")?;
    let x_var = Var::from_tensor(&x)?;
    // L = Σ y, its gradient one value broadcast to y's shape (read in place by the backward).
    let sum_grad =
        |y: &Tensor| Ok(Tensor::ones((), DType::F32, y.device())?.broadcast_as(y.shape())?);
    let step = |l: &LoraLinear, x: &Tensor| -> Result<()> {
        std::hint::black_box(l.forward_backward(x, sum_grad)?);
        Ok(())
    };
    let autograd_step = |l: &LoraLinear, x: &Tensor| -> Result<()> {
        let grads = l.forward_t(x, true)?.sum_all()?.backward()?;
        std::hint::black_box(grads);
        Ok(())
    };
    let fwd = |l: &LoraLinear| -> Result<()> {
        std::hint::black_box(l.forward_t(&x, false)?);
        Ok(())
    };
    let layer_lora_train_step_ms = median_ms(runs, 3, || step(&lora, &x))?;
    let layer_lora_train_step_with_dx_ms = median_ms(runs, 3, || step(&lora, x_var.as_tensor()))?;
    let layer_lora_train_step_autograd_ms = median_ms(runs, 3, || autograd_step(&lora, &x))?;
    let layer_lora_train_step_with_dx_autograd_ms =
        median_ms(runs, 3, || autograd_step(&lora, x_var.as_tensor()))?;
    // The three forwards are compared with each other (unmerged ÷ merged, merged ÷ plain), so
    // they are timed in turn within one loop: a drift of the machine's speed during the run
    // then moves all three alike instead of whichever was measured last.
    let unmerged = lora.clone();
    lora.merge()?;
    let [layer_plain_forward_ms, layer_unmerged_forward_ms, layer_merged_forward_ms] =
        medians_interleaved(
            runs,
            3,
            [&|| fwd(&plain), &|| fwd(&unmerged), &|| fwd(&lora)],
        )?;
    Ok(LayerBench {
        layer_plain_forward_ms,
        layer_lora_train_step_ms,
        layer_lora_train_step_with_dx_ms,
        layer_lora_train_step_autograd_ms,
        layer_lora_train_step_with_dx_autograd_ms,
        layer_unmerged_forward_ms,
        layer_merged_forward_ms,
    })
}

/// The Llama LoRA training step of the PEFT baseline: the config, the timing and the memory
/// ledger.
///
/// Model: a random Llama (vocab 4096, hidden 512, intermediate 1408, 4 layers, 8 heads, 8 kv
/// heads, untied head), LoRA r 8, α 16 on `q_proj`, `v_proj`, dropout 0; batch 8 × seq 128,
/// labels = ids. One step = forward, causal-LM loss, backward, AdamW (lr 1e-4, PyTorch's
/// defaults otherwise).
#[derive(Debug, Clone, Serialize)]
pub struct LlamaBench {
    /// Median training-step time, ms.
    pub llama_lora_train_step_ms: f64,
    /// Tokens per second at that median (`batch · seq / step`).
    pub llama_lora_train_tokens_per_s: f64,
    /// Median step time with activation checkpointing per decoder layer (not in the
    /// baseline), ms.
    pub llama_lora_train_step_checkpointed_ms: f64,
    /// The model and LoRA config, as the baseline's `llama_config`.
    pub llama_config: serde_json::Value,
    /// Where the step's bytes go.
    pub memory: MemoryLedger,
}

/// Bytes of one Llama LoRA training step by kind.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryLedger {
    /// Frozen weights (every base tensor), bytes.
    pub frozen_weight_bytes: usize,
    /// Trainable adapter factors (A and B), bytes.
    pub adapter_bytes: usize,
    /// Gradients of the adapter factors, bytes.
    pub gradient_bytes: usize,
    /// AdamW state (`m` and `v`), bytes.
    pub optimizer_state_bytes: usize,
    /// Heap peak of one training step above the heap in use before it, measured with the
    /// counting allocator: activations saved for backward, temporaries and gradients.
    /// `None` when the counting allocator is not the global allocator.
    pub peak_step_heap_bytes: Option<usize>,
    /// The same with activation checkpointing per decoder layer
    /// ([`FusedOptions::gradient_checkpointing`](crate::models::FusedOptions)).
    pub peak_step_heap_bytes_checkpointed: Option<usize>,
}

/// The baseline's Llama config as `config.json` text.
const BENCH_LLAMA: &str = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 4096,
    "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": false}"#;

/// Random weights for `cfg` as transformers initialises them (normal, σ 0.02; norms 1).
fn random_llama_weights(
    cfg: &crate::models::config::LlamaConfig,
    dev: &Device,
) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let rng = LoraRng::new(0);
    let (hs, is, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.num_kv_heads() * cfg.head_dim(),
    );
    let mut w = std::collections::BTreeMap::new();
    let mut put = |name: String, shape: &[usize]| -> Result<()> {
        w.insert(name, normal(shape, 0.02, &rng, dev)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, hs])?;
    put("lm_head.weight".into(), &[v, hs])?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (n, sh) in [
            ("self_attn.q_proj", [q, hs]),
            ("self_attn.k_proj", [kv, hs]),
            ("self_attn.v_proj", [kv, hs]),
            ("self_attn.o_proj", [hs, q]),
            ("mlp.gate_proj", [is, hs]),
            ("mlp.up_proj", [is, hs]),
            ("mlp.down_proj", [hs, is]),
        ] {
            put(format!("{p}.{n}.weight"), &sh)?;
        }
    }
    let ones = Tensor::ones(hs, candle_core::DType::F32, dev)?;
    for i in 0..cfg.num_hidden_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("model.layers.{i}.{n}.weight"), ones.clone());
        }
    }
    w.insert("model.norm.weight".into(), ones);
    Ok(w)
}

/// Runs the Llama LoRA training step `runs` times (after 2 warm-up steps) and reports the
/// median; `alloc` (the global counting allocator, when installed) measures the step's heap
/// peak. The same step with activation checkpointing is measured too (one step's heap peak,
/// then the median of 5 steps), after the plain timing.
pub fn llama_bench(
    runs: usize,
    alloc: Option<&crate::app::alloc::CountingAlloc>,
) -> Result<LlamaBench> {
    use crate::builder::{LoraBuilder, MapSource};
    use crate::models::loss::causal_lm_loss;
    use crate::models::{CausalLm, FusedOptions, Llama};
    use crate::train::optim::{AdamW, AdamWConfig};
    use rand::{Rng, SeedableRng};

    let dev = Device::Cpu;
    let cfg: crate::models::config::LlamaConfig =
        serde_json::from_str(BENCH_LLAMA).map_err(|e| crate::error::Error::State(e.to_string()))?;
    let (batch, seq, r, alpha) = (8usize, 128usize, 8usize, 16.0);
    let weights = random_llama_weights(&cfg, &dev)?;
    let frozen_weight_bytes = weights.values().map(|t| t.elem_count() * 4).sum();
    let lcfg = crate::config::LoraConfig::new(r, alpha, &["q_proj", "v_proj"]);
    let vb = LoraBuilder::new(
        MapSource::new(weights),
        candle_core::DType::F32,
        dev.clone(),
    )
    .with_config(lcfg)?;
    let model = Llama::load(&cfg, &vb)?;
    let vars = model.named_trainable_vars();
    let adapter_bytes: usize = vars.iter().map(|(_, v)| v.elem_count() * 4).sum();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-4,
            ..AdamWConfig::default()
        },
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let mut gradient_bytes = 0;
    let mut step = |opts: FusedOptions| -> Result<()> {
        if let Some(f) = model.fused_loss_and_grads(&ids, &ids, opts)? {
            let n = f.count as f64;
            let g: Vec<Option<Tensor>> = vars
                .iter()
                .map(|(_, v)| {
                    f.grads
                        .iter()
                        .find(|(x, _)| x.as_tensor().id() == v.as_tensor().id())
                        .map(|(_, g)| g / n)
                        .transpose()
                })
                .collect::<candle_core::Result<_>>()?;
            gradient_bytes = g.iter().flatten().map(|t| t.elem_count() * 4).sum();
            opt.step(&g, 1e-4)?;
            return Ok(());
        }
        let logits = model.forward_t(&ids, true)?;
        let loss = causal_lm_loss(&logits, &ids)?;
        drop(logits);
        let grads = loss.backward()?;
        let g: Vec<Option<Tensor>> = vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        drop(grads);
        gradient_bytes = g.iter().flatten().map(|t| t.elem_count() * 4).sum();
        opt.step(&g, 1e-4)?;
        Ok(())
    };
    let plain = FusedOptions::default();
    let checkpointed = FusedOptions {
        gradient_checkpointing: true,
    };
    // The first step allocates the optimizer's state for good; measure the second.
    step(plain)?;
    let mut heap_of = |opts: FusedOptions| -> Result<Option<usize>> {
        Ok(match alloc.filter(|a| a.is_counting()) {
            Some(a) => {
                let before = a.current();
                a.reset_peak();
                step(opts)?;
                Some(a.peak().saturating_sub(before))
            }
            None => None,
        })
    };
    let peak_step_heap_bytes = heap_of(plain)?;
    let peak_step_heap_bytes_checkpointed = heap_of(checkpointed)?;
    let ms = median_ms(runs.max(5), 1, || step(plain))?;
    let ckpt_ms = median_ms(5, 1, || step(checkpointed))?;
    Ok(LlamaBench {
        llama_lora_train_step_ms: ms,
        llama_lora_train_tokens_per_s: (batch * seq) as f64 / (ms / 1e3),
        llama_lora_train_step_checkpointed_ms: ckpt_ms,
        llama_config: serde_json::json!({
            "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "batch": batch, "seq": seq, "r": r,
            "alpha": alpha, "targets": ["q_proj", "v_proj"],
        }),
        memory: MemoryLedger {
            frozen_weight_bytes,
            adapter_bytes,
            gradient_bytes,
            optimizer_state_bytes: 2 * adapter_bytes,
            peak_step_heap_bytes,
            peak_step_heap_bytes_checkpointed,
        },
    })
}

/// The `cpu` key of `lora bench --json`: `{"model": <CPU model name>, "isa": <kernel target>}`,
/// the model from `/proc/cpuinfo` (`"unknown"` where that is unavailable) and the target the
/// kernels run on ([`crate::kernels::Isa::current`]: `avx512`, `avx2` or `portable`).
pub fn cpu_info() -> serde_json::Value {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    serde_json::json!({ "model": model, "isa": crate::kernels::Isa::current().name() })
}

/// The process's peak resident set size in MiB (`getrusage(RUSAGE_SELF).ru_maxrss`, which
/// Linux reports in KiB), as the baseline's `peak_rss_mib`; `None` where unavailable.
pub fn peak_rss_mib() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is a valid, writable `rusage`; getrusage only writes into it.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: getrusage returned 0, so it filled the struct (and it was zeroed before).
        let ru = unsafe { ru.assume_init() };
        let kib = ru.ru_maxrss as f64;
        if cfg!(target_os = "macos") {
            Some(kib / (1024.0 * 1024.0)) // bytes there
        } else {
            Some(kib / 1024.0)
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Every function runs `warm + runs` times, in turn (the log shows the order), and an error
    /// from any of them is returned.
    #[test]
    fn interleaved_medians_call_each_function_in_turn() {
        let log = RefCell::new(Vec::new());
        let (a, b) = (
            || -> Result<()> {
                log.borrow_mut().push('a');
                Ok(())
            },
            || -> Result<()> {
                log.borrow_mut().push('b');
                Ok(())
            },
        );
        let ms = medians_interleaved(3, 1, [&a, &b]).unwrap();
        assert!(ms.iter().all(|m| m.is_finite() && *m >= 0.0));
        assert_eq!(log.borrow().iter().collect::<String>(), "abababab");
        let fail = || -> Result<()> { Err(crate::error::Error::State("boom".into())) };
        assert!(medians_interleaved(3, 0, [&a, &fail]).is_err());
    }
}
