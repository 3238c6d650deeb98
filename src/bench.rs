//! `lora bench`: the same measurements as `shared/bench/peft_baseline.py` (PyTorch + PEFT), with
//! the same shapes and keys, so the two can be run back to back and compared as ratios.
//!
//! Layer (the seed's shape): x `[32, 128, 768]` → 512, r 8, α 16, f32 —
//! plain forward, LoRA train step (`sum(y).backward()`, grads for A and B), the same with dX,
//! unmerged and merged inference. Timings are medians after warm-up.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
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

/// The layer half of the PEFT baseline's keys.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBench {
    /// `nn.Linear(768, 512)` forward, ms.
    pub layer_plain_forward_ms: f64,
    /// LoRA layer `sum(y).backward()` with grads for A and B only, ms.
    pub layer_lora_train_step_ms: f64,
    /// The same with the input's gradient too (as inside a network), ms.
    pub layer_lora_train_step_with_dx_ms: f64,
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
    let step = |l: &LoraLinear, x: &Tensor| -> Result<()> {
        let grads = l.forward_t(x, true)?.sum_all()?.backward()?;
        std::hint::black_box(grads);
        Ok(())
    };
    let fwd = |l: &LoraLinear| -> Result<()> {
        std::hint::black_box(l.forward_t(&x, false)?);
        Ok(())
    };
    let layer_plain_forward_ms = median_ms(runs, 3, || fwd(&plain))?;
    let layer_lora_train_step_ms = median_ms(runs, 3, || step(&lora, &x))?;
    let layer_lora_train_step_with_dx_ms = median_ms(runs, 3, || step(&lora, x_var.as_tensor()))?;
    let layer_unmerged_forward_ms = median_ms(runs, 3, || fwd(&lora))?;
    lora.merge()?;
    let layer_merged_forward_ms = median_ms(runs, 3, || fwd(&lora))?;
    Ok(LayerBench {
        layer_plain_forward_ms,
        layer_lora_train_step_ms,
        layer_lora_train_step_with_dx_ms,
        layer_unmerged_forward_ms,
        layer_merged_forward_ms,
    })
}
