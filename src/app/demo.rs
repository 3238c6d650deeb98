//! `lora demo`: the seed's five checks of a LoRA linear layer, run on [`LoraLinear`] at the
//! seed's shapes, with figures that are measured rather than quoted.
//!
//! ```text
//! x [32, 128, 768] (N(0, 1)) → y [32, 128, 512];  W0 [512, 768], b [512]: nn.Linear's init
//! LoRA: r = 8, α = 16 (s = 2), dropout 0.1 on the LoRA branch input, f32, CPU
//! y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ      A [8, 768], B [512, 8]
//! ```
//!
//! 1. parameter counts: plain linear, LoRA, and `r = 0` (full fine-tuning);
//! 2. training memory: peak heap bytes of one forward + backward step (`loss = sum(y)`) above
//!    the level before it, for full fine-tuning and for LoRA, counted by
//!    [`CountingAlloc`] when the binary installs it, plus the gradient and AdamW bytes;
//! 3. output change after an update of A and B (the seed's `A, B += 0.01·N(0, 1)` from `B = 0`);
//! 4. merge and unmerge: max |Δ| of the merged and of the re-unmerged output against the
//!    unmerged one (criterion < 1e-5), with an adapter whose `B ≠ 0`;
//! 5. inference speed: medians of plain, unmerged and merged forwards.
//!
//! Every random value comes from one [`LoraRng`] seed, so all figures but the timings (and the
//! memory, which depends on the thread count) repeat exactly.

use std::fmt::Write as _;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::app::alloc::CountingAlloc;
use crate::app::bench::median_ms;
use crate::config::InitLoraWeights;
use crate::error::Result;
use crate::layers::{
    kaiming_uniform, normal, with_low_rank_reference, LoraLinear, LoraRng, LoraSpec, Mergeable,
};

/// The merged-vs-unmerged tolerance the seed states (max |Δ| < 1e-5).
pub const MERGE_TOLERANCE: f64 = 1e-5;

/// The step the seed takes on A and B in check 3: `A, B += LR·N(0, 1)`.
pub const UPDATE_LR: f32 = 0.01;

/// The layer and input shapes (the seed's by default).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoShape {
    /// Batch size (32).
    pub batch: usize,
    /// Sequence length (128).
    pub seq: usize,
    /// Input features (768).
    pub in_features: usize,
    /// Output features (512).
    pub out_features: usize,
    /// LoRA rank r (8).
    pub r: usize,
    /// LoRA α (16).
    pub alpha: f64,
    /// Dropout on the LoRA branch input in training (0.1).
    pub dropout: f32,
}

impl Default for DemoShape {
    fn default() -> Self {
        DemoShape {
            batch: 32,
            seq: 128,
            in_features: 768,
            out_features: 512,
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
        }
    }
}

impl DemoShape {
    /// The LoRA spec with PEFT's default init (A kaiming-uniform, B = 0).
    pub fn spec(&self) -> LoraSpec {
        LoraSpec {
            dropout: self.dropout,
            ..LoraSpec::new(self.r, self.alpha)
        }
    }
}

/// What to run: shapes, seed and timing runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    /// Layer and input shapes.
    pub shape: DemoShape,
    /// Seed of every random value.
    pub seed: u64,
    /// Timed runs per inference variant (the median is reported).
    pub runs: usize,
    /// Untimed warm-up runs before them.
    pub warmup: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            shape: DemoShape::default(),
            seed: 0,
            runs: 30,
            warmup: 5,
        }
    }
}

/// The input and frozen weights every check shares.
#[derive(Debug, Clone)]
pub struct DemoSetup {
    /// The options these were drawn with.
    pub options: DemoOptions,
    /// Input `[batch, seq, in]`, N(0, 1).
    pub x: Tensor,
    /// Frozen weight `[out, in]`, U(±1/√in) as `nn.Linear`.
    pub w: Tensor,
    /// Frozen bias `[out]`, U(±1/√in) as `nn.Linear`.
    pub b: Tensor,
    /// The random source (init, updates, dropout), seeded with `options.seed`.
    pub rng: LoraRng,
}

impl DemoSetup {
    /// Draws the input and the frozen weights from `options.seed` on the CPU.
    pub fn new(options: &DemoOptions) -> Result<Self> {
        let dev = Device::Cpu;
        let s = &options.shape;
        let rng = LoraRng::new(options.seed);
        let x = normal(&[s.batch, s.seq, s.in_features], 1.0, &rng, &dev)?;
        let w = kaiming_uniform(&[s.out_features, s.in_features], s.in_features, &rng, &dev)?;
        let b = kaiming_uniform(&[s.out_features], s.in_features, &rng, &dev)?;
        Ok(DemoSetup {
            options: options.clone(),
            x,
            w,
            b,
            rng,
        })
    }

    /// A LoRA layer over the frozen weights with the given init (dropout from the shape).
    pub fn lora_layer(&self, init: InitLoraWeights) -> Result<LoraLinear> {
        let spec = LoraSpec {
            init,
            ..self.options.shape.spec()
        };
        LoraLinear::new(
            self.w.clone(),
            Some(self.b.clone()),
            &spec,
            &self.rng,
            "demo",
        )
    }

    /// The `r = 0` layer: a plain linear layer whose weight and bias are trainable.
    pub fn full_ft_layer(&self) -> Result<LoraLinear> {
        let spec = LoraSpec::new(0, self.options.shape.alpha);
        LoraLinear::new(
            self.w.clone(),
            Some(self.b.clone()),
            &spec,
            &self.rng,
            "demo",
        )
    }
}

/// Check 1: parameter counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamCounts {
    /// `nn.Linear(in, out)`: weight + bias.
    pub plain_total: usize,
    /// All of them are trainable in a plain linear layer.
    pub plain_trainable: usize,
    /// Base + A + B.
    pub lora_total: usize,
    /// A + B: `r·in + out·r`.
    pub lora_trainable: usize,
    /// The `r = 0` layer: weight and bias trainable (full fine-tuning).
    pub rank0_trainable: usize,
}

/// Check 2: memory of one training step, and of the gradients and optimizer state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryReport {
    /// Whether the peaks were measured (the counting allocator is installed).
    pub measured: bool,
    /// Peak heap bytes of one full fine-tuning step above the level before it; `None`
    /// (`null`) when not measured.
    pub full_ft_peak_bytes: Option<usize>,
    /// Peak heap bytes of one LoRA step (dropout on) above the level before it.
    pub lora_peak_bytes: Option<usize>,
    /// Heap bytes still held after the full fine-tuning step, while its gradients are alive:
    /// the gradient store and whatever its tensors still reference.
    pub full_ft_held_after_step_bytes: Option<usize>,
    /// Heap bytes still held after the LoRA step, while its gradients are alive.
    pub lora_held_after_step_bytes: Option<usize>,
    /// Gradient bytes of full fine-tuning: trainable parameters × 4.
    pub full_ft_grad_bytes: usize,
    /// Gradient bytes of LoRA: trainable parameters × 4.
    pub lora_grad_bytes: usize,
    /// AdamW state (two moments) of full fine-tuning: 2 × its gradient bytes.
    pub full_ft_adamw_state_bytes: usize,
    /// AdamW state of LoRA: 2 × its gradient bytes.
    pub lora_adamw_state_bytes: usize,
}

/// Check 5: inference medians in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeedMs {
    /// Plain linear layer (frozen W0 and b).
    pub plain: f64,
    /// LoRA, unmerged: base GEMM + the low-rank path.
    pub unmerged: f64,
    /// LoRA, merged into W0: one GEMM.
    pub merged: f64,
}

/// How the demo ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoConfig {
    /// Shapes, rank, α, dropout.
    pub shape: DemoShape,
    /// LoRA scale s = α/r.
    pub scale: f64,
    /// The seed of every random value.
    pub seed: u64,
    /// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the core count).
    pub threads: usize,
    /// Timed runs per inference variant.
    pub runs: usize,
    /// Warm-up runs before them.
    pub warmup: usize,
    /// Element type.
    pub dtype: &'static str,
    /// Device.
    pub device: &'static str,
}

/// Everything `lora demo` reports (its `--json` output).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoReport {
    /// Check 1.
    pub params: ParamCounts,
    /// Check 2.
    pub memory: MemoryReport,
    /// Check 3: mean |y_after − y_before| over the output after the update of A and B.
    pub output_change_mean_abs: f64,
    /// Check 3: max |explicit low-rank output − plain base layer output| before the update
    /// (B = 0, so 0 up to rounding).
    pub init_output_max_abs_diff: f64,
    /// Check 4: max |merged-weight output − explicit low-rank output| ([`MERGE_FORMS`]).
    pub merge_max_abs_diff: f64,
    /// Check 4: max |low-rank output after unmerge − explicit low-rank output before merge|.
    pub unmerge_max_abs_diff: f64,
    /// Check 4: the two forms compared.
    pub merge_forms: &'static str,
    /// Check 4: max |s·B·A|, the size of what was merged.
    pub merged_delta_max_abs: f64,
    /// Check 5.
    pub speed_ms: SpeedMs,
    /// How it ran.
    pub config: DemoConfig,
}

impl DemoReport {
    /// Check 3's criterion: the output changed.
    pub fn output_change_passes(&self) -> bool {
        self.output_change_mean_abs > 0.0
    }
    /// Check 4's criterion: merged ≡ unmerged and unmerge restores, within [`MERGE_TOLERANCE`].
    pub fn merge_passes(&self) -> bool {
        self.merge_max_abs_diff < MERGE_TOLERANCE && self.unmerge_max_abs_diff < MERGE_TOLERANCE
    }
}

/// max |a − b| over all elements.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

/// mean |a − b| over all elements.
fn mean_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.mean_all()?.to_scalar::<f32>()? as f64)
}

/// Check 1: counts from the layers themselves.
pub fn param_counts(setup: &DemoSetup) -> Result<ParamCounts> {
    let plain = LoraLinear::trainable(&setup.w, Some(&setup.b))?;
    let lora = setup.lora_layer(InitLoraWeights::Default)?;
    let rank0 = setup.full_ft_layer()?;
    Ok(ParamCounts {
        plain_total: plain.num_params(),
        plain_trainable: plain.num_trainable(),
        lora_total: lora.num_params(),
        lora_trainable: lora.num_trainable(),
        rank0_trainable: rank0.num_trainable(),
    })
}

/// Peak and held heap bytes of one `sum(forward_t(x, train)).backward()` above the level
/// before it.
fn step_bytes(layer: &LoraLinear, x: &Tensor, meter: &CountingAlloc) -> Result<(usize, usize)> {
    let base = meter.current();
    meter.reset_peak();
    let grads = layer.forward_t(x, true)?.sum_all()?.backward()?;
    let peak = meter.peak().saturating_sub(base);
    let held = meter.current().saturating_sub(base);
    drop(grads);
    Ok((peak, held))
}

/// Check 2. `meter` is the process's global allocator; without one (or when it is not
/// installed: it has never counted an allocation) the peaks are `None`, not zeros.
///
/// Each step runs once untimed first, so one-off allocations (thread pools, GEMM scratch
/// buffers) are in the level before the measured step rather than in its peak.
pub fn training_memory(setup: &DemoSetup, meter: Option<&CountingAlloc>) -> Result<MemoryReport> {
    let full = setup.full_ft_layer()?;
    let lora = setup.lora_layer(InitLoraWeights::Default)?;
    let grad_bytes = |l: &LoraLinear| l.num_trainable() * std::mem::size_of::<f32>();
    let (full_grad, lora_grad) = (grad_bytes(&full), grad_bytes(&lora));
    let mut report = MemoryReport {
        measured: false,
        full_ft_peak_bytes: None,
        lora_peak_bytes: None,
        full_ft_held_after_step_bytes: None,
        lora_held_after_step_bytes: None,
        full_ft_grad_bytes: full_grad,
        lora_grad_bytes: lora_grad,
        full_ft_adamw_state_bytes: 2 * full_grad,
        lora_adamw_state_bytes: 2 * lora_grad,
    };
    let Some(meter) = meter.filter(|m| m.is_counting()) else {
        return Ok(report);
    };
    step_bytes(&full, &setup.x, meter)?;
    step_bytes(&lora, &setup.x, meter)?;
    let (full_peak, full_held) = step_bytes(&full, &setup.x, meter)?;
    let (lora_peak, lora_held) = step_bytes(&lora, &setup.x, meter)?;
    report.measured = true;
    report.full_ft_peak_bytes = Some(full_peak);
    report.lora_peak_bytes = Some(lora_peak);
    report.full_ft_held_after_step_bytes = Some(full_held);
    report.lora_held_after_step_bytes = Some(lora_held);
    Ok(report)
}

/// Check 3: `(mean |y_after − y_before|, max |low-rank form − base|)` for a default-init layer
/// (B = 0; the low-rank form `x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ` against the plain layer) after `A += LR·N(0, 1)`, `B += LR·N(0, 1)`, in inference mode.
pub fn output_change(setup: &DemoSetup) -> Result<(f64, f64)> {
    let layer = setup.lora_layer(InitLoraWeights::Default)?;
    let base =
        LoraLinear::frozen(setup.w.clone(), Some(setup.b.clone())).forward_t(&setup.x, false)?;
    let before = layer.forward_t(&setup.x, false)?;
    // B = 0: the explicit low-rank form must give the base output.
    let low_rank = with_low_rank_reference(|| layer.forward_t(&setup.x, false))?;
    let init_diff = max_abs_diff(&low_rank, &base)?;
    let lr = layer
        .lora()
        .ok_or_else(|| crate::Error::State("demo layer has no adapter".into()))?;
    for v in [&lr.a, &lr.b] {
        let step = normal(v.dims(), UPDATE_LR, &setup.rng, &Device::Cpu)?;
        v.set(&(v.as_tensor() + step)?)?;
    }
    let after = layer.forward_t(&setup.x, false)?;
    Ok((mean_abs_diff(&after, &before)?, init_diff))
}

/// What check 4 found, plus the layer (unmerged again) for check 5.
#[derive(Debug)]
pub struct MergeCheck {
    /// max |merged − unmerged|.
    pub merge_max_abs_diff: f64,
    /// max |re-unmerged − unmerged|.
    pub unmerge_max_abs_diff: f64,
    /// max |s·B·A|.
    pub delta_max_abs: f64,
    /// The layer, unmerged.
    pub layer: LoraLinear,
}

/// The forms check 4 compares, as the report names them.
pub const MERGE_FORMS: &str =
    "merged weight x·(W0 + s·B·A)ᵀ + b  vs  explicit low-rank x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ";

/// Check 4 on an adapter with both factors random (PEFT's `init_lora_weights=False`), so `s·B·A`
/// is as large as W0 itself and the check is not trivially 0 as with `B = 0`.
pub fn merge_roundtrip(setup: &DemoSetup) -> Result<MergeCheck> {
    let layer = setup.lora_layer(InitLoraWeights::Random)?;
    let low_rank = with_low_rank_reference(|| layer.forward_t(&setup.x, false))?;
    merge_check(layer, &setup.x, &low_rank)
}

/// Check 4's comparisons against `low_rank`, the explicit low-rank output
/// ([`with_low_rank_reference`]): `layer` merged (one GEMM with `W0 + s·B·A`), then unmerged
/// again (its weight must be W0 again). Whatever the row count, the two sides are different
/// computations, so a wrong scale or a wrong merge shows.
pub fn merge_check(mut layer: LoraLinear, x: &Tensor, low_rank: &Tensor) -> Result<MergeCheck> {
    let delta_max_abs = match layer.delta_weight()? {
        Some(d) => d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64,
        None => 0.0,
    };
    layer.merge()?;
    let merged = layer.forward_t(x, false)?;
    layer.unmerge()?;
    let again = with_low_rank_reference(|| layer.forward_t(x, false))?;
    Ok(MergeCheck {
        merge_max_abs_diff: max_abs_diff(&merged, low_rank)?,
        unmerge_max_abs_diff: max_abs_diff(&again, low_rank)?,
        delta_max_abs,
        layer,
    })
}

/// Check 5: inference medians of the plain layer and of `layer` unmerged and merged (left
/// merged).
pub fn inference_speed(setup: &DemoSetup, layer: &mut LoraLinear) -> Result<SpeedMs> {
    let (runs, warm) = (setup.options.runs.max(1), setup.options.warmup);
    let x = &setup.x;
    let fwd = |l: &LoraLinear| -> Result<()> {
        std::hint::black_box(l.forward_t(x, false)?);
        Ok(())
    };
    let plain = LoraLinear::frozen(setup.w.clone(), Some(setup.b.clone()));
    layer.unmerge()?;
    let plain_ms = median_ms(runs, warm, || fwd(&plain))?;
    let unmerged_ms = median_ms(runs, warm, || fwd(layer))?;
    layer.merge()?;
    let merged_ms = median_ms(runs, warm, || fwd(layer))?;
    Ok(SpeedMs {
        plain: plain_ms,
        unmerged: unmerged_ms,
        merged: merged_ms,
    })
}

/// Runs the five checks. Pass the installed global [`CountingAlloc`] to measure memory.
pub fn run(options: &DemoOptions, meter: Option<&CountingAlloc>) -> Result<DemoReport> {
    let setup = DemoSetup::new(options)?;
    let params = param_counts(&setup)?;
    let memory = training_memory(&setup, meter)?;
    let (output_change_mean_abs, init_output_max_abs_diff) = output_change(&setup)?;
    let mut merge = merge_roundtrip(&setup)?;
    let speed_ms = inference_speed(&setup, &mut merge.layer)?;
    let s = &options.shape;
    Ok(DemoReport {
        params,
        memory,
        output_change_mean_abs,
        init_output_max_abs_diff,
        merge_max_abs_diff: merge.merge_max_abs_diff,
        unmerge_max_abs_diff: merge.unmerge_max_abs_diff,
        merge_forms: MERGE_FORMS,
        merged_delta_max_abs: merge.delta_max_abs,
        speed_ms,
        config: DemoConfig {
            shape: s.clone(),
            scale: s.spec().scale(),
            seed: options.seed,
            threads: candle_core::utils::get_num_threads(),
            runs: options.runs.max(1),
            warmup: options.warmup,
            dtype: "f32",
            device: "cpu",
        },
    })
}

/// `1234567` → `"1,234,567"`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

impl DemoReport {
    /// The human-readable report: the five checks as tables, PASS/FAIL where the seed states
    /// a criterion, and how this layer and these figures differ from the seed's.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut t);
        t
    }

    fn write_text(&self, t: &mut String) -> std::fmt::Result {
        let c = &self.config;
        let s = &c.shape;
        writeln!(
            t,
            "LoRA linear layer: x [{}, {}, {}] -> {}, r = {}, alpha = {} (scale {}), dropout {}, \
             {}, {}, {} threads, seed {}",
            s.batch,
            s.seq,
            s.in_features,
            s.out_features,
            s.r,
            s.alpha,
            c.scale,
            s.dropout,
            c.dtype,
            c.device,
            c.threads,
            c.seed
        )?;

        let p = &self.params;
        writeln!(t, "\n1. Parameters")?;
        writeln!(t, "   {:<34}{:>12}{:>12}", "layer", "total", "trainable")?;
        let row = |t: &mut String, name: &str, total: Option<usize>, train: usize| {
            let total = total.map_or_else(|| "-".to_string(), thousands);
            writeln!(t, "   {name:<34}{total:>12}{:>12}", thousands(train))
        };
        row(t, "plain linear", Some(p.plain_total), p.plain_trainable)?;
        row(
            t,
            &format!("LoRA, r = {}", s.r),
            Some(p.lora_total),
            p.lora_trainable,
        )?;
        row(t, "r = 0 (full fine-tuning)", None, p.rank0_trainable)?;
        let frac = p.lora_trainable as f64 / p.plain_trainable.max(1) as f64;
        writeln!(
            t,
            "   LoRA trains {:.2} % of the plain layer's parameters ({:.2} % fewer): A {}x{} + B {}x{}.",
            100.0 * frac,
            100.0 * (1.0 - frac),
            s.r,
            s.in_features,
            s.out_features,
            s.r
        )?;
        writeln!(
            t,
            "   Note: the seed prints 393,216 / 393,216 / 8,192 / 0 here. Its own code gives the \
             numbers above: its totals leave out the bias (512) and, for LoRA, A and B; its LoRA \
             trainable count is 8·768 + 512·8 = 10,240, not 8,192; and its r = 0 layer freezes \
             nothing."
        )?;

        let m = &self.memory;
        writeln!(
            t,
            "\n2. Training memory: one forward + backward, loss = sum(y), heap bytes above the \
             level before the step"
        )?;
        writeln!(
            t,
            "   {:<28}{:>13}{:>13}{:>13}{:>13}",
            "", "step peak", "held after", "gradients", "AdamW state"
        )?;
        let opt = |b: Option<usize>| b.map_or_else(|| "n/a".to_string(), mib);
        writeln!(
            t,
            "   {:<28}{:>13}{:>13}{:>13}{:>13}",
            "full fine-tuning (r = 0)",
            opt(m.full_ft_peak_bytes),
            opt(m.full_ft_held_after_step_bytes),
            mib(m.full_ft_grad_bytes),
            mib(m.full_ft_adamw_state_bytes)
        )?;
        writeln!(
            t,
            "   {:<28}{:>13}{:>13}{:>13}{:>13}",
            format!("LoRA r = {}, dropout {}", s.r, s.dropout),
            opt(m.lora_peak_bytes),
            opt(m.lora_held_after_step_bytes),
            mib(m.lora_grad_bytes),
            mib(m.lora_adamw_state_bytes)
        )?;
        match (m.full_ft_peak_bytes, m.lora_peak_bytes) {
            (Some(f), Some(l)) => writeln!(
                t,
                "   LoRA's step peak is {:.2}x full fine-tuning's ({} less); adding the AdamW \
                 state a training loop keeps between steps (the gradients are already in the \
                 peak): {} vs {}.",
                l as f64 / f.max(1) as f64,
                mib(f.saturating_sub(l)),
                mib(l + m.lora_adamw_state_bytes),
                mib(f + m.full_ft_adamw_state_bytes),
            )?,
            _ => writeln!(
                t,
                "   Step peaks not measured: the counting allocator is not installed (run the \
                 `lora` binary)."
            )?,
        }
        writeln!(
            t,
            "   Held after: what stays allocated while the step's gradients are alive (the \
             gradient store and the tensors its gradients still reference); all of it is freed \
             with them. Gradients = trainable parameters x 4 bytes; AdamW keeps two moments (2x \
             that). The input x ({}) is allocated before the step and not counted.",
            mib(s.batch * s.seq * s.in_features * 4)
        )?;

        writeln!(
            t,
            "\n3. Output change after a LoRA update (from B = 0: A, B += {}·N(0, 1), inference mode)",
            UPDATE_LR
        )?;
        writeln!(
            t,
            "   before the update, max |low-rank - base|    {:.3e}   (B = 0: LoRA adds nothing)",
            self.init_output_max_abs_diff
        )?;
        writeln!(
            t,
            "   mean |y_after - y_before|                  {:.4e}   {} (> 0)",
            self.output_change_mean_abs,
            pass(self.output_change_passes())
        )?;

        writeln!(
            t,
            "\n4. Merge / unmerge (A and B both random, max |s·B·A| = {:.4}, so the check is not \
             trivial)",
            self.merged_delta_max_abs
        )?;
        writeln!(t, "   compared: {}", self.merge_forms)?;
        writeln!(
            t,
            "   max |merged weight - low-rank form|        {:.3e}   {} (< {:.0e})",
            self.merge_max_abs_diff,
            pass(self.merge_max_abs_diff < MERGE_TOLERANCE),
            MERGE_TOLERANCE
        )?;
        writeln!(
            t,
            "   max |after unmerge - low-rank form|        {:.3e}   {} (< {:.0e})",
            self.unmerge_max_abs_diff,
            pass(self.unmerge_max_abs_diff < MERGE_TOLERANCE),
            MERGE_TOLERANCE
        )?;

        let v = &self.speed_ms;
        writeln!(
            t,
            "\n5. Inference, one forward of x, median of {} runs after {} warm-up",
            c.runs, c.warmup
        )?;
        writeln!(t, "   {:<28}{:>10}{:>12}", "", "ms", "vs plain")?;
        for (name, ms) in [
            ("plain linear", v.plain),
            ("LoRA unmerged", v.unmerged),
            ("LoRA merged", v.merged),
        ] {
            writeln!(
                t,
                "   {name:<28}{ms:>10.3}{:>11.2}x",
                ms / v.plain.max(f64::MIN_POSITIVE)
            )?;
        }
        writeln!(
            t,
            "   Unmerged LoRA costs the low-rank path on top of the base GEMM; merged is one GEMM, \
             like the plain layer. Timings vary by ±10-15 % on a shared machine."
        )?;

        writeln!(
            t,
            "\nWhere this layer differs from the seed's LinearLoRALayer"
        )?;
        for line in [
            "- Dropout applies to the LoRA branch input only, and only in training (as PEFT); the \
             seed drops the whole output, base path included.",
            "- The unmerged forward runs the low-rank path, x·Aᵀ then ·Bᵀ (two skinny GEMMs); B·A \
             is never built. The seed builds A@B on every call, which is what makes its unmerged \
             inference slower.",
            "- Layout as PEFT: A [r, in] starts kaiming-uniform, B [out, r] starts at 0. The seed's \
             lora_a [out, r] is random and lora_b [r, in] zero: the same product, the names swapped.",
            "- r = 0 is a plain linear layer with trainable weight and bias (the seed's behaviour).",
            "- Memory is heap bytes counted by the allocator during the step, not process RSS as \
             the seed prints on a CPU: RSS does not fall when memory is freed, so the second layer \
             measured inherits the first one's pages.",
        ] {
            writeln!(t, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DemoOptions {
        DemoOptions {
            shape: DemoShape {
                batch: 2,
                seq: 8,
                in_features: 48,
                out_features: 40,
                r: 4,
                alpha: 8.0,
                dropout: 0.1,
            },
            seed: 1,
            runs: 2,
            warmup: 0,
        }
    }

    #[test]
    fn param_counts_are_exact_at_the_seed_shape() {
        let setup = DemoSetup::new(&DemoOptions::default()).unwrap();
        let p = param_counts(&setup).unwrap();
        assert_eq!(
            p,
            ParamCounts {
                plain_total: 768 * 512 + 512,
                plain_trainable: 393_728,
                lora_total: 393_728 + 8 * 768 + 512 * 8,
                lora_trainable: 10_240,
                rank0_trainable: 393_728,
            }
        );
        assert_eq!(p.lora_total, 403_968);
    }

    #[test]
    fn memory_is_not_measured_without_an_installed_allocator() {
        let setup = DemoSetup::new(&small()).unwrap();
        let uninstalled = CountingAlloc::new();
        for meter in [None, Some(&uninstalled)] {
            let m = training_memory(&setup, meter).unwrap();
            assert!(!m.measured);
            assert_eq!((m.full_ft_peak_bytes, m.lora_peak_bytes), (None, None));
            // The computed figures: (48·40 + 40)·4 and (4·48 + 40·4)·4 bytes, AdamW twice that.
            assert_eq!(m.full_ft_grad_bytes, 1960 * 4);
            assert_eq!(m.lora_grad_bytes, 352 * 4);
            assert_eq!(m.lora_adamw_state_bytes, 2 * 352 * 4);
        }
    }

    #[test]
    fn output_change_equals_the_exact_low_rank_update() {
        let setup = DemoSetup::new(&small()).unwrap();
        let (change, init) = output_change(&setup).unwrap();
        assert!(init < 1e-5, "B = 0 must leave the base output: {init}");
        // Recompute the update independently: same seed, same draws, exact math.
        let again = DemoSetup::new(&small()).unwrap();
        let layer = again.lora_layer(InitLoraWeights::Default).unwrap();
        let lr = layer.lora().unwrap();
        let a = (lr.a.as_tensor()
            + normal(lr.a.dims(), UPDATE_LR, &again.rng, &Device::Cpu).unwrap())
        .unwrap();
        let b = normal(lr.b.dims(), UPDATE_LR, &again.rng, &Device::Cpu).unwrap();
        let x2 = again.x.reshape((16, 48)).unwrap();
        let delta = (x2
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * 2.0)
            .unwrap();
        let want = delta
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(change > 0.0);
        assert!(
            (change - want).abs() < 1e-6 * want.max(1.0),
            "{change} vs {want}"
        );
    }

    #[test]
    fn merge_and_unmerge_keep_the_output_within_1e_5() {
        let setup = DemoSetup::new(&DemoOptions::default()).unwrap();
        let m = merge_roundtrip(&setup).unwrap();
        assert!(m.merge_max_abs_diff < 1e-5, "{}", m.merge_max_abs_diff);
        assert!(m.unmerge_max_abs_diff < 1e-5, "{}", m.unmerge_max_abs_diff);
        // The merged delta is not negligible next to W0 (|W0| ≤ 1/√768 ≈ 0.036).
        assert!(m.delta_max_abs > 0.01, "{}", m.delta_max_abs);
        assert!(!m.layer.is_merged());
    }

    /// Issue 13 item 12: the check compares two computations, so a merge with a wrong scale
    /// fails it, at the demo's row count where the fast path builds the merged weight anyway.
    #[test]
    fn merge_check_fails_on_a_wrong_scale() {
        let setup = DemoSetup::new(&DemoOptions::default()).unwrap();
        let layer = setup.lora_layer(InitLoraWeights::Random).unwrap();
        let l = layer.lora().unwrap();
        let rows = setup.x.elem_count() / setup.w.dim(1).unwrap();
        let (out, inp) = setup.w.dims2().unwrap();
        assert!(crate::ops::merged_weight_pays(rows, inp, out));
        let wrong = LoraLinear::from_adapter(
            setup.w.clone(),
            Some(setup.b.clone()),
            l.a.as_tensor().copy().unwrap(),
            l.b.as_tensor().copy().unwrap(),
            l.scale * 1.01,
            0.0,
            "wrong",
            &setup.rng,
        )
        .unwrap();
        let low_rank = with_low_rank_reference(|| layer.forward_t(&setup.x, false)).unwrap();
        let m = merge_check(wrong, &setup.x, &low_rank).unwrap();
        assert!(m.merge_max_abs_diff > 1e-4, "{}", m.merge_max_abs_diff);
        // The right scale passes the same comparison, and it is not 0 by construction.
        let right = merge_check(layer, &setup.x, &low_rank).unwrap();
        assert!(right.merge_max_abs_diff < MERGE_TOLERANCE);
        assert!(
            right.merge_max_abs_diff > 0.0,
            "the two forms are distinct computations"
        );
    }

    #[test]
    fn report_text_has_every_check_and_verdict() {
        let r = run(&small(), None).unwrap();
        assert!(r.output_change_passes() && r.merge_passes());
        let text = r.to_text();
        for want in [
            "1. Parameters",
            "2. Training",
            "3. Output",
            "4. Merge",
            "5. Inference",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
        assert_eq!(text.matches("PASS").count(), 3, "{text}");
        assert!(text.contains("not measured"));
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["memory"]["lora_peak_bytes"].is_null());
        assert_eq!(json["params"]["lora_trainable"], 4 * 48 + 40 * 4);
        for k in ["plain", "unmerged", "merged"] {
            assert!(json["speed_ms"][k].is_number(), "{k}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(10_240), "10,240");
        assert_eq!(thousands(393_728), "393,728");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
