//! A Llama LoRA training step with a hand-written backward (CPU, f32).
//!
//! candle's autograd records every op of the forward, computes a gradient for every operand of
//! every op in the backward (frozen weights included), accumulates each through a fresh zero
//! tensor and allocates every activation anew: on the benchmark Llama (4 layers, hidden 512,
//! batch 8 × 128 tokens) that made a LoRA step 2.5× slower than PyTorch + PEFT although the
//! matrix products, which are the same on both sides, took about a quarter of it. This module
//! runs the same math as [`Llama`]'s forward plus [`causal_lm_loss_sum`]'s backward directly on
//! f32 buffers, computing only what the adapters' gradients need:
//!
//! ```text
//! forward, per layer (x: [N, H], N = b·t)      backward (dy flows from the loss)
//! xn  = rms(x)·w1                              dx  = dh1 + rms'(dxn)      (skipped in layer 0)
//! q,k,v = xn·W'ᵀ (+ bias), W' = W0 + s·B·A     dxn = dq·Wq' + dk·Wk' + dv·Wv'
//! P = softmax(rope(q)·rope(k)ᵀ/√d + mask)      dP = do·vᵀ, dS = P⊙(dP − Σ_row dP⊙P)/√d
//! o = P·v                                      dq = dS·k, dk = dSᵀ·q, dv = Pᵀ·do (+ RoPE')
//! h1  = x + o·Wo'ᵀ                             dh1 = dh + rms'(dG·Wg' + dU·Wu')
//! h   = h1 + (silu(G) ⊙ U)·Wd'ᵀ,  G, U = xn2·Wg'ᵀ, xn2·Wu'ᵀ,  xn2 = rms(h1)·w2
//! logits = rms(h_L)·wf·Whᵀ;  loss = Σ_predicted (logsumexp − logit[label])
//! LoRA:  xa = x_in·Aᵀ, g = dy·B,  dB = s·dyᵀ·xa,  dA = s·gᵀ·x_in   (every adapted linear)
//! ```
//!
//! Frozen weights get no gradient, no product for one is computed, and the gradient of the
//! first layer's input (which only the frozen embedding would use) is skipped. An adapted
//! linear multiplies by the merged weight `W' = W0 + s·B·A`, formed once per step (an `out×in×r`
//! product), in both directions: one GEMM instead of the base GEMM plus two skinny ones (the
//! adapter itself stays unmerged). Attention keeps `P` (`[b, heads, t, t]`), reads the heads of
//! the token-major projections through strides, writes each head's outputs and gradients into
//! the token-major buffers in place, and skips the key blocks a query block cannot see; its
//! per-head products run in `ops::tile_mm`'s AVX-512 register tiles where available (12-row
//! query blocks), else through the GEMM (64-row blocks). Large products go through `ops::gemm` (split between threads by columns, else rows, one
//! serial GEMM per thread) and write fresh outputs without a zero fill; the adapters' rank-r
//! products use `ops::skinny`'s AVX-512 kernels where available; element-wise kernels run row
//! chunks on rayon's pool with the vectorised `exp` and reductions of `ops::vecmath`.
//!
//! With [`FusedOptions::gradient_checkpointing`] the forward keeps only each layer's input
//! (and its dropout masks) and the backward runs that layer's forward again before its
//! backward: one layer's activations live at a time instead of all of them, for one more
//! forward of the decoder layers; the results are the same (tested).
//!
//! With `lora_dropout` the branch input is `x⊙m` (inverted-dropout mask `m`, drawn from the
//! builder's stream in the same order as the autograd path draws it), so that linear keeps the
//! base GEMM plus the two skinny ones instead of `W'`, and its backward adds `s·((dy·B)·A)⊙m`.
//!
//! It applies when the model is on the CPU in f32, every trainable variable is a `lora_A` /
//! `lora_B` of a decoder linear (`q/k/v/o_proj`, `gate/up/down_proj`), and no adapter is
//! merged; otherwise [`CausalLm::fused_loss_and_grads`] returns `None` and callers use
//! autograd. Tested against the autograd path (loss and every gradient) in `tests`.
//!
//! [`causal_lm_loss_sum`]: crate::train::loss::causal_lm_loss_sum

use std::collections::HashSet;

use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use rayon::prelude::*;

use super::Llama;
use crate::error::{Error, Result};
use crate::layers::{LoraLinear, Mergeable};
#[cfg(doc)]
use crate::models::CausalLm;
use crate::ops::gemm::Out;
use crate::ops::tile_mm::{tile_mm_to, transpose};
use crate::ops::vecmath::{dot, dot3, exp1, max, sum, vectorised};
use crate::ops::{gemm, skinny};

/// The loss and the adapters' gradients of one batch, from
/// [`CausalLm::fused_loss_and_grads`].
#[derive(Debug)]
pub struct FusedGrads {
    /// `Σ −log p(label)` over the predicted tokens (not divided by their count).
    pub loss_sum: f64,
    /// The number of predicted tokens.
    pub count: usize,
    /// The gradient of `loss_sum` for every trainable variable, shaped like it.
    pub grads: Vec<(Var, Tensor)>,
}

/// How [`CausalLm::fused_loss_and_grads`] runs a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusedOptions {
    /// Activation (gradient) checkpointing per decoder layer: the forward keeps only each
    /// layer's input (and its dropout masks); the backward runs the layer's forward again to
    /// get the rest. Less memory for the activations (one layer's instead of all of them) for
    /// one more forward of the decoder layers; the results are the same.
    pub gradient_checkpointing: bool,
}

/// `dst[i·dst_rs + j] (+)= beta · Σ_k lhs[i·lrs + k·lcs] · rhs[k·rrs + j·rcs]` for `m×n` outputs,
/// on candle's threads when `parallel`.
#[allow(clippy::too_many_arguments)]
fn mm(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    (lhs, lrs, lcs): (&[f32], usize, usize),
    (rhs, rrs, rcs): (&[f32], usize, usize),
    beta: f32,
    parallel: bool,
) {
    let threads = if parallel {
        candle_core::utils::get_num_threads()
    } else {
        1
    };
    let (l, r) = ((lrs, lcs), (rrs, rcs));
    gemm::gemm_f32_rs(dims, dst, dst_rs, acc, lhs, l, rhs, r, beta, threads);
}

/// `beta·lhs·rhs` into a new row-major `m×n` buffer, threaded, without zero-filling it first
/// (on the benchmark Llama those fills were ~140 MB of memset per step).
fn mm_new(
    (m, n, k): (usize, usize, usize),
    (lhs, lrs, lcs): (&[f32], usize, usize),
    (rhs, rrs, rcs): (&[f32], usize, usize),
    beta: f32,
) -> Vec<f32> {
    gemm::gemm_f32_new(m, n, k, lhs, (lrs, lcs), rhs, (rrs, rcs), beta)
}

/// Rows per rayon task for row-wise kernels (about 16k elements each).
fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// An adapter of one linear: `A`, `B` (copied), the scale and `W' = W0 + s·B·A`.
struct Adapter {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    s: f32,
    a_var: Var,
    b_var: Var,
    /// `W0 + s·B·A`; empty with dropout, where the branch sees another input than the base.
    merged: Vec<f32>,
    /// Dropout on the branch input (PEFT's `lora_dropout`), and the stream its masks come from.
    dropout: f32,
    rng: crate::layers::LoraRng,
}

/// What a dropout-adapted linear keeps for its backward: the inverted-dropout mask `[n, in]`
/// and `xa = (x⊙m)·Aᵀ` `[n, r]`.
struct Dropped {
    mask: Vec<f32>,
    xa: Vec<f32>,
}

/// One linear of a decoder layer: frozen `W0: [out, in]`, bias, optional adapter.
struct Lin<'a> {
    w0: &'a [f32],
    bias: Option<&'a [f32]>,
    out: usize,
    inp: usize,
    adapter: Option<Adapter>,
}

impl Lin<'_> {
    /// The weight the products use: `W'` when adapted without dropout, else `W0`.
    fn w(&self) -> &[f32] {
        match &self.adapter {
            Some(a) if a.dropout == 0.0 => &a.merged,
            _ => self.w0,
        }
    }

    /// `y = x·Wᵀ + b` for `x: [n, in]` → `[n, out]`; with dropout on the adapter,
    /// `y = x·W0ᵀ + b + s·((x⊙m)·Aᵀ)·Bᵀ` with the mask `m` given (a recomputed forward) or a
    /// fresh one, kept for the backward.
    fn forward(&self, x: &[f32], n: usize, mask: Option<Vec<f32>>) -> (Vec<f32>, Option<Dropped>) {
        let y = self.forward_base(x, n);
        match &self.adapter {
            Some(ad) if ad.dropout > 0.0 => {
                let (mut y, r) = (y, ad.r);
                let mask = mask.unwrap_or_else(|| ad.rng.keep_mask(n * self.inp, ad.dropout));
                let xd: Vec<f32> = x[..n * self.inp]
                    .iter()
                    .zip(&mask)
                    .map(|(x, m)| x * m)
                    .collect();
                let mut xa = vec![0f32; n * r];
                mm(
                    (n, r, self.inp),
                    &mut xa,
                    r,
                    false,
                    (&xd, self.inp, 1),
                    (&ad.a, 1, self.inp),
                    1.0,
                    true,
                );
                mm(
                    (n, self.out, r),
                    &mut y,
                    self.out,
                    true,
                    (&xa, r, 1),
                    (&ad.b, 1, r),
                    ad.s,
                    true,
                );
                (y, Some(Dropped { mask, xa }))
            }
            _ => (y, None),
        }
    }

    /// `y = x·Wᵀ + b` with [`Lin::w`].
    fn forward_base(&self, x: &[f32], n: usize) -> Vec<f32> {
        let Some(b) = self.bias else {
            return mm_new(
                (n, self.out, self.inp),
                (x, self.inp, 1),
                (self.w(), 1, self.inp),
                1.0,
            );
        };
        gemm::gemm_f32_bias_new(
            n,
            self.out,
            self.inp,
            x,
            (self.inp, 1),
            self.w(),
            (1, self.inp),
            1.0,
            b,
        )
    }

    /// `dx (+)= dy·W` for `dy: [n, out]` into `dx: [n, in]`; with dropout
    /// `dx (+)= dy·W0 + s·((dy·B)·A)⊙m`.
    fn backward_x(&self, dy: &[f32], n: usize, dx: &mut [f32], acc: bool, drop: Option<&Dropped>) {
        mm(
            (n, self.inp, self.out),
            dx,
            self.inp,
            acc,
            (dy, self.out, 1),
            (self.w(), self.inp, 1),
            1.0,
            true,
        );
        self.dropout_backward_x(dy, n, dx, drop);
    }

    /// [`Lin::backward_x`] into a new buffer.
    fn backward_x_new(&self, dy: &[f32], n: usize, drop: Option<&Dropped>) -> Vec<f32> {
        let w = (self.w(), self.inp, 1);
        let mut dx = mm_new((n, self.inp, self.out), (dy, self.out, 1), w, 1.0);
        self.dropout_backward_x(dy, n, &mut dx, drop);
        dx
    }

    /// With dropout on the adapter: `dx += s·((dy·B)·A)⊙m`.
    fn dropout_backward_x(&self, dy: &[f32], n: usize, dx: &mut [f32], drop: Option<&Dropped>) {
        if let (Some(ad), Some(dr)) = (&self.adapter, drop) {
            let (r, inp) = (ad.r, self.inp);
            let mut g = vec![0f32; n * r];
            mm(
                (n, r, self.out),
                &mut g,
                r,
                false,
                (dy, self.out, 1),
                (&ad.b, r, 1),
                1.0,
                true,
            );
            let mut low = vec![0f32; n * inp];
            mm(
                (n, inp, r),
                &mut low,
                inp,
                false,
                (&g, r, 1),
                (&ad.a, inp, 1),
                ad.s,
                true,
            );
            dx[..n * inp]
                .par_chunks_mut(CHUNK)
                .zip(low.par_chunks(CHUNK))
                .zip(dr.mask.par_chunks(CHUNK))
                .for_each(|((d, l), m)| {
                    d.iter_mut()
                        .zip(l)
                        .zip(m)
                        .for_each(|((d, l), m)| *d += l * m)
                });
        }
    }

    /// The adapter's gradients for input `x: [n, in]` and output gradient `dy: [n, out]`.
    fn lora_grads(
        &self,
        x: &[f32],
        dy: &[f32],
        n: usize,
        drop: Option<&Dropped>,
        out: &mut Vec<(Var, Tensor)>,
    ) -> Result<()> {
        let Some(ad) = &self.adapter else {
            return Ok(());
        };
        let (r, inp, o) = (ad.r, self.inp, self.out);
        // With dropout the branch saw x⊙m (and its `xa` was kept); without, x.
        let xd: Vec<f32>;
        let (x, saved_xa): (&[f32], Option<&[f32]>) = match drop {
            Some(dr) => {
                xd = x[..n * inp]
                    .iter()
                    .zip(&dr.mask)
                    .map(|(x, m)| x * m)
                    .collect();
                (&xd, Some(&dr.xa))
            }
            None => (x, None),
        };
        let (da, db) = if skinny::available() {
            skinny_lora_grads(x, dy, saved_xa, ad, (n, inp, o))
        } else {
            gemm_lora_grads(x, dy, saved_xa, ad, (n, inp, o))
        };
        let dev = candle_core::Device::Cpu;
        out.push((ad.a_var.clone(), Tensor::from_vec(da, (r, inp), &dev)?));
        out.push((ad.b_var.clone(), Tensor::from_vec(db, (o, r), &dev)?));
        Ok(())
    }
}

/// `(dA, dB)` of an adapter, `dA = s·(dy·B)ᵀ·x` `[r, in]`, `dB = s·dyᵀ·xa` `[out, r]` with
/// `xa = x·Aᵀ` (given, or made here), by the AVX-512 skinny kernels: the rows are split across
/// threads, each pass reads its rows of `x` and `dy` once per product from cache, and the
/// threads' partial sums are added at the end.
fn skinny_lora_grads(
    x: &[f32],
    dy: &[f32],
    saved_xa: Option<&[f32]>,
    ad: &Adapter,
    (n, inp, o): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let r = ad.r;
    let bt: Vec<f32> = (0..r * o).map(|q| ad.b[(q % o) * r + q / o]).collect();
    let threads = candle_core::utils::get_num_threads().max(1);
    let rows = n.div_ceil(threads).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..n)
        .step_by(rows)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| {
            let m = rows.min(n - r0);
            let (xr, dyr) = (&x[r0 * inp..(r0 + m) * inp], &dy[r0 * o..(r0 + m) * o]);
            let made: Vec<f32>;
            let xa = match saved_xa {
                Some(xa) => &xa[r0 * r..(r0 + m) * r],
                None => {
                    let mut xa = vec![0f32; m * r];
                    skinny::dots((m, r, inp), xr, inp, &ad.a, inp, 1.0, &mut xa);
                    made = xa;
                    &made[..]
                }
            };
            let mut g = vec![0f32; m * r];
            skinny::dots((m, r, o), dyr, o, &bt, o, 1.0, &mut g);
            let (mut da, mut dbt) = (vec![0f32; r * inp], vec![0f32; r * o]);
            skinny::rank_update((m, r, inp), &g, r, xr, inp, ad.s, &mut da, inp);
            skinny::rank_update((m, r, o), xa, r, dyr, o, ad.s, &mut dbt, o);
            (da, dbt)
        })
        .collect();
    let (mut da, mut dbt) = (vec![0f32; r * inp], vec![0f32; r * o]);
    for (pa, pb) in partials {
        da.iter_mut().zip(&pa).for_each(|(d, p)| *d += p);
        dbt.iter_mut().zip(&pb).for_each(|(d, p)| *d += p);
    }
    let db = (0..o * r).map(|q| dbt[(q % r) * o + q / r]).collect();
    (da, db)
}

/// [`skinny_lora_grads`] by the general GEMM (CPUs without AVX-512).
fn gemm_lora_grads(
    x: &[f32],
    dy: &[f32],
    saved_xa: Option<&[f32]>,
    ad: &Adapter,
    (n, inp, o): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let r = ad.r;
    let made: Vec<f32>;
    let xa = match saved_xa {
        Some(xa) => xa,
        None => {
            let mut xa = vec![0f32; n * r];
            mm(
                (n, r, inp),
                &mut xa,
                r,
                false,
                (x, inp, 1),
                (&ad.a, 1, inp),
                1.0,
                true,
            );
            made = xa;
            &made
        }
    };
    let mut g = vec![0f32; n * r];
    mm(
        (n, r, o),
        &mut g,
        r,
        false,
        (dy, o, 1),
        (&ad.b, r, 1),
        1.0,
        true,
    );
    let mut db = vec![0f32; o * r];
    mm(
        (o, r, n),
        &mut db,
        r,
        false,
        (dy, 1, o),
        (xa, r, 1),
        ad.s,
        true,
    );
    let mut da = vec![0f32; r * inp];
    mm(
        (r, inp, n),
        &mut da,
        inp,
        false,
        (&g, 1, r),
        (x, inp, 1),
        ad.s,
        true,
    );
    (da, db)
}

/// The weights of one decoder layer.
struct Layer<'a> {
    n1: &'a [f32],
    n2: &'a [f32],
    q: Lin<'a>,
    k: Lin<'a>,
    v: Lin<'a>,
    o: Lin<'a>,
    gate: Lin<'a>,
    up: Lin<'a>,
    down: Lin<'a>,
}

/// What one layer's forward keeps for its backward.
struct Saved {
    x: Vec<f32>,
    inv1: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    o: Vec<f32>,
    h1: Vec<f32>,
    inv2: Vec<f32>,
    xn2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    hm: Vec<f32>,
    /// Dropout state of `q, k, v, o, gate, up, down` (`None` without dropout).
    drops: [Option<Dropped>; 7],
}

/// What the forward keeps of a layer for the backward: everything, or (with gradient
/// checkpointing) its input and the dropout masks of `q, k, v, o, gate, up, down`.
enum Kept {
    All(Box<Saved>),
    Input(Vec<f32>, [Option<Vec<f32>>; 7]),
}

/// One decoder layer's forward from its input `x: [N, H]`: the layer's output and what its
/// backward needs. `masks` are dropout masks to reuse (a recomputed forward); `None` draws
/// fresh ones where the adapter has dropout.
fn layer_forward(
    l: &Layer,
    x: Vec<f32>,
    dm: &Dims,
    masks: [Option<Vec<f32>>; 7],
) -> (Vec<f32>, Saved) {
    let n = dm.n;
    let [mq, mk, mv, mo, mg, mu, md] = masks;
    let (xn, inv1) = rms_forward(&x, l.n1, dm.eps);
    let (mut q, dq_) = l.q.forward(&xn, n, mq);
    rope_inplace(&mut q, dm.heads, dm, false);
    let (mut k, dk_) = l.k.forward(&xn, n, mk);
    rope_inplace(&mut k, dm.kv_heads, dm, false);
    let (v, dv_) = l.v.forward(&xn, n, mv);
    let (p, o) = attention_forward(&q, &k, &v, dm);
    let (mut h1, do_) = l.o.forward(&o, n, mo);
    add_into(&mut h1, &x);
    let (xn2, inv2) = rms_forward(&h1, l.n2, dm.eps);
    let (g, dg_) = l.gate.forward(&xn2, n, mg);
    let (u, du_) = l.up.forward(&xn2, n, mu);
    let hm = swiglu_forward(&g, &u);
    let (mut out, dd_) = l.down.forward(&hm, n, md);
    add_into(&mut out, &h1);
    let s = Saved {
        x,
        inv1,
        xn,
        q,
        k,
        v,
        p,
        o,
        h1,
        inv2,
        xn2,
        g,
        u,
        hm,
        drops: [dq_, dk_, dv_, do_, dg_, du_, dd_],
    };
    (out, s)
}

/// Shapes and tables shared by every layer.
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    eps: f32,
    window: Option<usize>,
    /// `[t, d]` rope tables (both halves equal).
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Attention's small products through [`tile_mm_to`] (AVX-512) rather than the GEMM.
    tiles: bool,
}

impl Dims {
    /// Query rows per attention block ([`QBLOCK_TILES`] or [`QBLOCK_GEMM`]).
    fn qblock(&self) -> usize {
        if self.tiles {
            QBLOCK_TILES
        } else {
            QBLOCK_GEMM
        }
    }
}

/// `y = w ⊙ x·inv` per row with `inv = 1/√(mean(x²) + ε)`; returns `(y, inv)`.
fn rms_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let rows = x.len() / h;
    let mut inv = vec![0f32; rows];
    let (per, len) = (rows_per_task(h), rows * h);
    let mut y = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(h * per)
        .zip(inv.par_chunks_mut(per))
        .zip(x[..len].par_chunks(h * per))
        .for_each(|((y, inv), x)| {
            vectorised(
                #[inline(always)]
                || {
                    for ((y, inv), x) in y.chunks_exact_mut(h).zip(inv).zip(x.chunks_exact(h)) {
                        let ms = dot(x, x) / h as f32;
                        *inv = 1.0 / (ms + eps).sqrt();
                        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                            y.write(w * (x * *inv));
                        }
                    }
                },
            )
        });
    // SAFETY: the pieces cover the `rows` whole rows of `h` values, each written above.
    unsafe { y.set_len(len) };
    (y, inv)
}

/// `dx (+)= inv·(w⊙dy) − inv³·x·Σ(dy⊙w⊙x)/H`, the gradient of [`rms_forward`] at `x`.
fn rms_backward(dy: &[f32], x: &[f32], inv: &[f32], w: &[f32], dx: &mut [f32]) {
    let h = w.len();
    let per = rows_per_task(h);
    dx.par_chunks_mut(h * per)
        .zip(dy.par_chunks(h * per))
        .zip(x.par_chunks(h * per))
        .zip(inv.par_chunks(per))
        .for_each(|(((dx, dy), x), inv)| {
            vectorised(
                #[inline(always)]
                || {
                    for (((dx, dy), x), &inv) in dx
                        .chunks_exact_mut(h)
                        .zip(dy.chunks_exact(h))
                        .zip(x.chunks_exact(h))
                        .zip(inv)
                    {
                        let c = inv * inv * inv * dot3(dy, w, x) / h as f32;
                        for (((dx, dy), x), w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                            *dx += inv * w * dy - c * x;
                        }
                    }
                },
            )
        });
}

/// RoPE in place on token-major `x: [b·t, n·d]` (`n` heads of `d`):
/// `x ← x ⊙ cos + rotate_half(x) ⊙ sin` per head, position `t` of each row; with `inverse`
/// the rotation by −angle (`sin` negated), which is RoPE's backward (its transpose, as the
/// tables' two halves are equal).
fn rope_inplace(x: &mut [f32], n: usize, dm: &Dims, inverse: bool) {
    let (t, d) = (dm.t, dm.d);
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(n * d).enumerate().for_each(|(row, x)| {
        let ti = row % t;
        let (c, s) = (&dm.cos[ti * d..][..d], &dm.sin[ti * d..][..d]);
        vectorised(
            #[inline(always)]
            || {
                for head in x.chunks_exact_mut(d) {
                    let (x1, x2) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * c[j] - b * (sign * s[j]);
                        x2[j] = b * c[half + j] + a * (sign * s[half + j]);
                    }
                }
            },
        )
    });
}

/// Query rows per attention block through the GEMM: a block's queries only need the keys up
/// to its last row, so the products skip the masked upper blocks (a quarter of the work at
/// 128 tokens).
const QBLOCK_GEMM: usize = 64;
/// Query rows per attention block through [`tile_mm_to`] (two 6-row tiles): small products
/// cost it nothing extra, and thinner blocks skip more of the masked triangle (at 128 tokens
/// 55 % of the full products against 75 %). Attention fwd + bwd of one benchmark layer, 2
/// threads: 0.89× the time of 64-row blocks (about 4.9 → 4.1 ms; median of 6 alternating
/// rounds of 100).
const QBLOCK_TILES: usize = 12;

/// The query blocks of a `t`-token sequence: `(first row, rows, first key, keys)`; the keys
/// span what the block's rows may see (causal, and the sliding window when set).
fn query_blocks(dm: &Dims) -> Vec<(usize, usize, usize, usize)> {
    let qblock = dm.qblock();
    (0..dm.t)
        .step_by(qblock)
        .map(|r0| {
            let rows = qblock.min(dm.t - r0);
            let k0 = dm.window.map_or(0, |w| (r0 + 1).saturating_sub(w));
            (r0, rows, k0, r0 + rows - k0)
        })
        .collect()
}

/// `c (+)= beta·a·y` for attention's small products on this thread, `y` row-major (rows `y_rs`
/// apart), into the `m×n` block at `c` (row stride `c_rs`): [`tile_mm_to`] with `tiles`, else
/// the GEMM.
///
/// # Safety
/// `c` must be valid for writes (and reads of initialised values when `acc`) of the block,
/// with nothing else accessing it during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn small_mm(
    tiles: bool,
    dims: (usize, usize, usize),
    (c, c_rs): (*mut f32, usize),
    acc: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (y, y_rs): (&[f32], usize),
    beta: f32,
) {
    // SAFETY: the caller's contract on `c`; both check the operands' extents.
    unsafe {
        if tiles {
            tile_mm_to(dims, a, (a_rs, a_cs), y, y_rs, beta, c, c_rs, acc);
        } else {
            let (ast, yst) = ((a_rs, a_cs), (y_rs, 1));
            gemm::gemm_f32_to(dims, c, c_rs, acc, a, ast, y, yst, beta);
        }
    }
}

/// One head of a token-major `x` (`t` rows `x_rs` apart, `d` columns from the slice's start)
/// transposed to `[d, t]`: the right operand of a product with `xᵀ`.
fn transposed_head(x: &[f32], x_rs: usize, dm: &Dims) -> Vec<f32> {
    let (t, d) = (dm.t, dm.d);
    let mut out = vec![0f32; d * t];
    if dm.tiles {
        transpose(x, x_rs, (t, d), &mut out);
        return out;
    }
    for (j, row) in x.chunks(x_rs).take(t).enumerate() {
        for (c, v) in row[..d].iter().enumerate() {
            out[c * t + j] = *v;
        }
    }
    out
}

/// Causal attention over token-major `q: [b·t, H·d]`, `k, v: [b·t, KV·d]` (heads read in
/// place through strides): returns the probabilities `[b, H, t, t]` (0 where masked) and the
/// output, token-major `[b·t, H·d]`, which each head's task writes in place.
fn attention_forward(q: &[f32], k: &[f32], v: &[f32], dm: &Dims) -> (Vec<f32>, Vec<f32>) {
    let (t, d, h, kvh) = (dm.t, dm.d, dm.heads, dm.kv_heads);
    let rep = h / kvh;
    let (hd, kvd) = (h * d, kvh * d);
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = query_blocks(dm);
    let mut p = vec![0f32; dm.b * h * t * t];
    let mut o: Vec<f32> = Vec::with_capacity(dm.n * hd);
    // Each task writes its head's columns of `o` (below).
    let out = Out {
        ptr: o.as_mut_ptr(),
        rs: hd,
    };
    p.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / h, bh % h);
        let qh = &q[bi * t * hd + hi * d..];
        let kv = bi * t * kvd + (hi / rep) * d;
        let (kt, vh) = (transposed_head(&k[kv..], kvd, dm), &v[kv..]);
        for &(r0, rows, k0, keys) in &blocks {
            let qb = (&qh[r0 * hd..], hd, 1);
            // SAFETY: the block of `p` lies inside this task's chunk, borrowed mutably.
            unsafe {
                let pb = (p[r0 * t + k0..].as_mut_ptr(), t);
                small_mm(
                    dm.tiles,
                    (rows, keys, d),
                    pb,
                    false,
                    qb,
                    (&kt[k0..], t),
                    scale,
                );
            }
            vectorised(
                #[inline(always)]
                || {
                    for i in r0..r0 + rows {
                        // Query i sees keys lo..=i.
                        let row = &mut p[i * t..][..t];
                        let lo = dm.window.map_or(0, |w| (i + 1).saturating_sub(w));
                        row[..lo].fill(0.0);
                        row[i + 1..].fill(0.0);
                        let seen = &mut row[lo..=i];
                        let m = max(seen);
                        seen.iter_mut().for_each(|x| *x = exp1(*x - m));
                        let inv = 1.0 / sum(seen);
                        seen.iter_mut().for_each(|x| *x *= inv);
                    }
                },
            );
            let pb = (&p[r0 * t + k0..], t, 1);
            // SAFETY: rows bi·t + r0.. (rows of them) × columns hi·d..(hi + 1)·d of `o` are
            // this task's alone (one task per sequence and head) and inside its capacity.
            unsafe {
                let ob = (out.at(bi * t + r0, hi * d).ptr, hd);
                small_mm(
                    dm.tiles,
                    (rows, d, keys),
                    ob,
                    false,
                    pb,
                    (&vh[k0 * kvd..], kvd),
                    1.0,
                );
            }
        }
    });
    // SAFETY: the blocks cover rows 0..t of every sequence and every head's columns, and each
    // product above wrote its whole block (`acc` false): all n·H·d values are initialised.
    unsafe { o.set_len(dm.n * hd) };
    (p, o)
}

/// The gradient of [`attention_forward`] (same token-major inputs) for output gradient
/// `do_tok: [b·t, H·d]`: returns token-major `(dq, dk, dv)`, with RoPE's backward applied to
/// `dq` and `dk`.
fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    do_tok: &[f32],
    dm: &Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, h, kvh) = (dm.t, dm.d, dm.heads, dm.kv_heads);
    let rep = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = query_blocks(dm);
    let (hd, kvd) = (h * d, kvh * d);
    let (mut dq, mut dk, mut dv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        Vec::with_capacity(q.len()),
        Vec::with_capacity(k.len()),
        Vec::with_capacity(v.len()),
    );
    let (dqs, dks, dvs) = (
        Out {
            ptr: dq.as_mut_ptr(),
            rs: hd,
        },
        Out {
            ptr: dk.as_mut_ptr(),
            rs: kvd,
        },
        Out {
            ptr: dv.as_mut_ptr(),
            rs: kvd,
        },
    );
    (0..dm.b * kvh).into_par_iter().for_each(|g| {
        let (bi, kvi) = (g / kvh, g % kvh);
        let kv = bi * t * kvd + kvi * d;
        let (kh, vt) = (&k[kv..], transposed_head(&v[kv..], kvd, dm));
        // SAFETY (every access through `dqs`, `dks`, `dvs` below): this task alone touches
        // rows bi·t..(bi + 1)·t of the kv head's columns of `dk` and `dv` and of its `rep`
        // query heads' columns of `dq` (one task per sequence and kv head), inside capacity.
        let (dkb, dvb) = unsafe { (dks.at(bi * t, kvi * d).ptr, dvs.at(bi * t, kvi * d).ptr) };
        for i in 0..t {
            // SAFETY: as above; zeroes before the products accumulate into them.
            unsafe {
                std::ptr::write_bytes(dkb.add(i * kvd), 0, d);
                std::ptr::write_bytes(dvb.add(i * kvd), 0, d);
            }
        }
        let mut ds = vec![0f32; dm.qblock() * t];
        for r in 0..rep {
            let hi = kvi * rep + r;
            let bh = bi * h + hi;
            let head = (bi * t) * hd + hi * d;
            let (qh, ph) = (&q[head..], &p[bh * t * t..][..t * t]);
            let doh = &do_tok[head..];
            for &(r0, rows, k0, keys) in &blocks {
                let (dob, pb) = (&doh[r0 * hd..], &ph[r0 * t + k0..]);
                // SAFETY: `ds` is this task's; the `dv` and `dq` blocks are this task's (above).
                unsafe {
                    // dP = dO·Vᵀ and dV += Pᵀ·dO over the block's keys.
                    let vb = (&vt[k0..], t);
                    small_mm(
                        dm.tiles,
                        (rows, keys, d),
                        (ds.as_mut_ptr(), keys),
                        false,
                        (dob, hd, 1),
                        vb,
                        1.0,
                    );
                    let dvk = (dvb.add(k0 * kvd), kvd);
                    small_mm(
                        dm.tiles,
                        (keys, d, rows),
                        dvk,
                        true,
                        (pb, 1, t),
                        (dob, hd),
                        1.0,
                    );
                }
                // dS = P ⊙ (dP − Σ dP⊙P) / √d.
                vectorised(
                    #[inline(always)]
                    || {
                        for (i, dsr) in ds.chunks_exact_mut(keys).take(rows).enumerate() {
                            let pr = &pb[i * t..][..keys];
                            let c = dot(dsr, pr);
                            for (x, p) in dsr.iter_mut().zip(pr) {
                                *x = p * (*x - c) * scale;
                            }
                        }
                    },
                );
                // SAFETY: as above.
                unsafe {
                    let dqb = (dqs.at(bi * t + r0, hi * d).ptr, hd);
                    let kb = (&kh[k0 * kvd..], kvd);
                    small_mm(
                        dm.tiles,
                        (rows, d, keys),
                        dqb,
                        false,
                        (&ds, keys, 1),
                        kb,
                        1.0,
                    );
                    let dkk = (dkb.add(k0 * kvd), kvd);
                    small_mm(
                        dm.tiles,
                        (keys, d, rows),
                        dkk,
                        true,
                        (&ds, 1, keys),
                        (&qh[r0 * hd..], hd),
                        1.0,
                    );
                }
            }
        }
    });
    // SAFETY: every task zeroed its rows of `dk` and `dv` before accumulating, and the query
    // blocks' products (`acc` false) wrote all rows of each head's columns of `dq`: every
    // value of the three is initialised.
    unsafe {
        dq.set_len(q.len());
        dk.set_len(k.len());
        dv.set_len(v.len());
    }
    rope_inplace(&mut dq, h, dm, true);
    rope_inplace(&mut dk, kvh, dm, true);
    (dq, dk, dv)
}

/// Elements per rayon task of the element-wise kernels.
const CHUNK: usize = 16 * 1024;

/// `silu(g) ⊙ u = g·u / (1 + e^−g)`.
fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let len = g.len().min(u.len());
    let mut y = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(u.par_chunks(CHUNK))
        .for_each(|((y, g), u)| {
            vectorised(
                #[inline(always)]
                || {
                    for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                        y.write(g / (1.0 + exp1(-g)) * u);
                    }
                },
            )
        });
    // SAFETY: the pieces of `y` pair with equally long pieces of `g` and `u` (all at least
    // `len` long), so every one of the `len` values was written above.
    unsafe { y.set_len(len) };
    y
}

/// The gradients of [`swiglu_forward`] for `dy`, written over `g` and `u` (`(dg, du)`):
/// with `σ = 1/(1 + e^−g)`, `dg = dy·u·σ·(1 + g·(1 − σ))`, `du = dy·g·σ`.
fn swiglu_backward(g: &mut [f32], u: &mut [f32], dy: &[f32]) {
    g.par_chunks_mut(CHUNK)
        .zip(u.par_chunks_mut(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((g, u), dy)| {
            vectorised(
                #[inline(always)]
                || {
                    for ((g, u), dy) in g.iter_mut().zip(u.iter_mut()).zip(dy) {
                        let sig = 1.0 / (1.0 + exp1(-*g));
                        let silu = *g * sig;
                        let dg = dy * *u * sig * (1.0 + *g * (1.0 - sig));
                        *u = dy * silu;
                        *g = dg;
                    }
                },
            )
        });
}

/// Cross-entropy over `logits: [N, V]` for `(row, target)` pairs, in place: the rows become
/// `softmax − onehot` (rows without a target become 0); returns `Σ (logsumexp − logit[target])`.
fn cross_entropy(logits: &mut [f32], v: usize, targets: &[Option<u32>]) -> f64 {
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, tgt)| {
            let Some(tgt) = *tgt else {
                row.fill(0.0);
                return 0.0;
            };
            vectorised(
                #[inline(always)]
                || {
                    let mx = max(row);
                    let picked = row[tgt as usize];
                    row.iter_mut().for_each(|x| *x = exp1(*x - mx));
                    let total = sum(row);
                    let inv = 1.0 / total;
                    row.iter_mut().for_each(|x| *x *= inv);
                    row[tgt as usize] -= 1.0;
                    f64::from(mx + total.ln() - picked)
                },
            )
        })
        .sum()
}

/// `a += b`.
fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(16 * 1024)
        .zip(b.par_chunks(16 * 1024))
        .for_each(|(a, b)| {
            vectorised(
                #[inline(always)]
                || a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
            )
        });
}

/// Contiguous f32 CPU data of a guarded storage.
fn data<'g, G: std::ops::Deref<Target = Storage>>(
    (st, l): &'g (G, &candle_core::Layout),
    what: &str,
) -> Result<&'g [f32]> {
    match (&**st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(Error::State(format!(
            "fused Llama step: {what} is not contiguous f32 on the CPU"
        ))),
    }
}

/// An adapter's copied factors and merged weight, when the linear has one.
fn adapter(
    lin: &LoraLinear,
    w0: &[f32],
    out: usize,
    inp: usize,
    rng: &crate::layers::LoraRng,
) -> Result<Option<Adapter>> {
    let Some(l) = lin.lora() else {
        return Ok(None);
    };
    let r = l.rank();
    let a = l.a.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let b = l.b.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let s = l.scale as f32;
    if l.dropout > 0.0 {
        return Ok(Some(Adapter {
            a,
            b,
            r,
            s,
            a_var: l.a.clone(),
            b_var: l.b.clone(),
            merged: Vec::new(),
            dropout: l.dropout,
            rng: rng.clone(),
        }));
    }
    let merged = crate::ops::merged_weight_of(w0, &a, &b, s, out, inp);
    Ok(Some(Adapter {
        a,
        b,
        r,
        s,
        a_var: l.a.clone(),
        b_var: l.b.clone(),
        merged,
        dropout: 0.0,
        rng: rng.clone(),
    }))
}

impl Llama {
    /// The decoder linears of layer `i` in the order `q, k, v, o, gate, up, down`.
    fn linears(&self, i: usize) -> [&LoraLinear; 7] {
        let bl = &self.layers[i];
        let (a, m) = (&bl.attn, &bl.mlp);
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
    }

    /// Whether [`Llama::fused_step`] applies (see the module doc).
    fn fused_applies(&self) -> bool {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let mut lora_ids = HashSet::new();
        for i in 0..self.layers.len() {
            for lin in self.linears(i) {
                if lin.is_merged()
                    || !f32_cpu(lin.weight())
                    || lin.bias().is_some_and(|b| !f32_cpu(b))
                {
                    return false;
                }
                if let Some(l) = lin.lora() {
                    if !f32_cpu(l.a.as_tensor()) || !f32_cpu(l.b.as_tensor()) {
                        return false;
                    }
                    lora_ids.insert(l.a.as_tensor().id());
                    lora_ids.insert(l.b.as_tensor().id());
                }
            }
        }
        let vars = self.trainable_vars();
        !vars.is_empty()
            && self.score.is_none()
            && vars.len() == lora_ids.len()
            && vars.iter().all(|v| lora_ids.contains(&v.as_tensor().id()))
            && f32_cpu(self.embed.table())
            && self
                .lm_head
                .as_ref()
                .is_none_or(|h| f32_cpu(h.weight()) && h.lora().is_none())
    }

    /// One training batch by the hand-written backward (see the module doc): the summed loss
    /// of `ids: [b, t]` against `labels: [b, t]` (transformers' shift, −100 skipped) and its
    /// gradient for every trainable variable. `None` when the fused path does not apply to
    /// this model; use autograd then. Same results as
    /// `causal_lm_loss_sum(forward_t(ids, true), labels)` and its backward, to f32 rounding.
    pub(super) fn fused_step(
        &self,
        ids: &Tensor,
        labels: &Tensor,
        opts: FusedOptions,
    ) -> Result<Option<FusedGrads>> {
        if !self.fused_applies() {
            return Ok(None);
        }
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let (hs, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let (rows, tg) = crate::train::loss::predicted_rows(labels, b, t, vocab)?;
        let mut targets = vec![None; b * t];
        for (r, tg) in rows.iter().zip(&tg) {
            targets[*r as usize] = Some(*tg);
        }
        let count = rows.len();
        let ids: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::State(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }

        // Borrow every frozen tensor's data for the whole step.
        let head_w = self
            .lm_head
            .as_ref()
            .map_or(self.embed.table(), |h| h.weight());
        let mut tensors: Vec<&Tensor> = vec![self.embed.table(), self.norm.weight(), head_w];
        for (i, bl) in self.layers.iter().enumerate() {
            tensors.push(bl.input_layernorm.weight());
            tensors.push(bl.post_attention_layernorm.weight());
            for lin in self.linears(i) {
                tensors.push(lin.weight());
            }
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let d = |i: usize, what: &str| data(&guards[i], what);
        let bias_guards: Vec<Vec<_>> = (0..self.layers.len())
            .map(|i| {
                self.linears(i)
                    .map(|l| l.bias().map(|b| b.storage_and_layout()))
                    .into()
            })
            .collect();
        let (table, wf, wh) = (d(0, "embed_tokens")?, d(1, "norm")?, d(2, "lm_head")?);
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, biases) in bias_guards.iter().enumerate() {
            let base = 3 + i * 9;
            let lins = self.linears(i);
            let mk = |j: usize| -> Result<Lin> {
                let w0 = d(base + 2 + j, "linear weight")?;
                let (out, inp) = lins[j].weight().dims2()?;
                let bias = biases[j].as_ref().map(|g| data(g, "bias")).transpose()?;
                Ok(Lin {
                    w0,
                    bias,
                    out,
                    inp,
                    adapter: adapter(lins[j], w0, out, inp, self.vb.rng())?,
                })
            };
            layers.push(Layer {
                n1: d(base, "input_layernorm")?,
                n2: d(base + 1, "post_attention_layernorm")?,
                q: mk(0)?,
                k: mk(1)?,
                v: mk(2)?,
                o: mk(3)?,
                gate: mk(4)?,
                up: mk(5)?,
                down: mk(6)?,
            });
        }

        let hd = cfg.head_dim();
        let (mut cos, mut sin) = (Vec::with_capacity(t * hd), Vec::with_capacity(t * hd));
        for p in 0..t {
            for _ in 0..2 {
                for f in &self.rope.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let dm = Dims {
            b,
            t,
            n: b * t,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            d: hd,
            eps: cfg.rms_norm_eps as f32,
            window: self.window,
            cos,
            sin,
            tiles: skinny::available(),
        };
        let n = dm.n;

        // Forward.
        let mut x = vec![0f32; n * hs];
        x.par_chunks_mut(hs)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| row.copy_from_slice(&table[id as usize * hs..][..hs]));
        let mut saved = Vec::with_capacity(layers.len());
        for l in &layers {
            let (out, s) = layer_forward(l, x, &dm, Default::default());
            x = out;
            saved.push(if opts.gradient_checkpointing {
                Kept::Input(s.x, s.drops.map(|d| d.map(|d| d.mask)))
            } else {
                Kept::All(Box::new(s))
            });
        }
        let (xf, invf) = rms_forward(&x, wf, dm.eps);
        let mut logits = mm_new((n, vocab, hs), (&xf, hs, 1), (wh, 1, hs), 1.0);
        let loss_sum = cross_entropy(&mut logits, vocab, &targets);

        // Backward.
        let dxf = mm_new((n, hs, vocab), (&logits, vocab, 1), (wh, hs, 1), 1.0);
        drop(logits);
        let mut dh = vec![0f32; n * hs];
        rms_backward(&dxf, &x, &invf, wf, &mut dh);
        drop(dxf);
        let mut grads = Vec::new();
        for (li, (l, kept)) in layers.iter().zip(saved).enumerate().rev() {
            let mut s = match kept {
                Kept::All(s) => *s,
                // The layer's forward again, from its input and with the same dropout masks.
                Kept::Input(x, masks) => layer_forward(l, x, &dm, masks).1,
            };
            // MLP.
            let dhm = l.down.backward_x_new(&dh, n, s.drops[6].as_ref());
            l.down
                .lora_grads(&s.hm, &dh, n, s.drops[6].as_ref(), &mut grads)?;
            drop(s.hm);
            swiglu_backward(&mut s.g, &mut s.u, &dhm);
            drop(dhm);
            let (dg, du) = (s.g, s.u);
            let mut dxn2 = l.gate.backward_x_new(&dg, n, s.drops[4].as_ref());
            l.up.backward_x(&du, n, &mut dxn2, true, s.drops[5].as_ref());
            l.gate
                .lora_grads(&s.xn2, &dg, n, s.drops[4].as_ref(), &mut grads)?;
            l.up.lora_grads(&s.xn2, &du, n, s.drops[5].as_ref(), &mut grads)?;
            let mut dh1 = dh;

            rms_backward(&dxn2, &s.h1, &s.inv2, l.n2, &mut dh1);
            // Attention.
            let dout = l.o.backward_x_new(&dh1, n, s.drops[3].as_ref());
            l.o.lora_grads(&s.o, &dh1, n, s.drops[3].as_ref(), &mut grads)?;
            let (dq, dk, dv) = attention_backward(&s.q, &s.k, &s.v, &s.p, &dout, &dm);
            l.q.lora_grads(&s.xn, &dq, n, s.drops[0].as_ref(), &mut grads)?;
            l.k.lora_grads(&s.xn, &dk, n, s.drops[1].as_ref(), &mut grads)?;
            l.v.lora_grads(&s.xn, &dv, n, s.drops[2].as_ref(), &mut grads)?;
            if li == 0 {
                // The first layer's input comes from the frozen embedding: no gradient needed.
                break;
            }
            let mut dxn = dxn2;
            l.q.backward_x(&dq, n, &mut dxn, false, s.drops[0].as_ref());
            l.k.backward_x(&dk, n, &mut dxn, true, s.drops[1].as_ref());
            l.v.backward_x(&dv, n, &mut dxn, true, s.drops[2].as_ref());
            rms_backward(&dxn, &s.x, &s.inv1, l.n1, &mut dh1);
            dh = dh1;
        }
        Ok(Some(FusedGrads {
            loss_sum,
            count,
            grads,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{LoraBuilder, MapSource};
    use crate::config::{InitLoraWeights, LoraConfig};
    use crate::models::llama::tests::{ids, random_weights, tiny};
    use crate::models::CausalLm;
    use crate::ops::testing::values as val;
    use crate::train::loss::causal_lm_loss_sum;
    use candle_core::Device;

    fn lora_model(arch: &str, extra: &str, biases: bool, targets: &[&str]) -> Llama {
        lora_model_with(arch, extra, biases, targets, 0.0)
    }

    fn lora_model_with(
        arch: &str,
        extra: &str,
        biases: bool,
        targets: &[&str],
        dropout: f64,
    ) -> Llama {
        let cfg = tiny(arch, extra);
        let mut w = random_weights(&cfg, biases);
        if !cfg.tie_word_embeddings {
            let head = crate::layers::normal(
                &[cfg.vocab_size, cfg.hidden_size],
                0.3,
                &crate::layers::LoraRng::new(5),
                &Device::Cpu,
            )
            .unwrap();
            w.insert("lm_head.weight".into(), head);
        }
        let mut lc = LoraConfig::new(4, 8.0, targets);
        lc.init_lora_weights = InitLoraWeights::Random;
        lc.lora_dropout = dropout;
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu)
            .with_config(lc)
            .unwrap();
        Llama::load(&cfg, &vb).unwrap()
    }

    fn labels() -> Tensor {
        Tensor::new(
            &[[3i64, 7, -100, 30, 12, 5], [0, 2, 9, 9, -100, -100]],
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Loss and every adapter gradient agree with candle's autograd through the model's
    /// forward and the causal-LM loss: relative 1e-5 of each tensor's largest magnitude (f32,
    /// different summation orders).
    fn check(model: &Llama) {
        check_on(model, &ids(), &labels());
    }

    fn check_on(model: &Llama, ids: &Tensor, labels: &Tensor) -> f64 {
        // Both passes draw the same dropout masks (same stream position, same order).
        let (seed, pos) = model.vb.rng().state();
        let fused = model
            .fused_step(ids, labels, FusedOptions::default())
            .unwrap()
            .unwrap();
        model.vb.rng().restore(seed, pos);
        let logits = model.forward_t(ids, true).unwrap();
        let (sum, count) = causal_lm_loss_sum(&logits, labels).unwrap();
        assert_eq!(fused.count, count);
        let want = sum.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (fused.loss_sum - want).abs() <= 1e-5 * want.abs(),
            "{} vs {want}",
            fused.loss_sum
        );
        let g = sum.backward().unwrap();
        let vars = model.trainable_vars();
        assert_eq!(fused.grads.len(), vars.len());
        for (v, got) in &fused.grads {
            let want = g.get(v.as_tensor()).unwrap();
            let (diff, scale) = crate::ops::testing::diff_and_scale(got, want);
            assert!(scale > 0.0);
            assert!(
                diff <= 1e-5 * scale,
                "gradient differs by {diff} (scale {scale})"
            );
        }
        fused.loss_sum
    }

    const ALL: &[&str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];

    #[test]
    fn matches_autograd_llama_gqa_every_target() {
        check(&lora_model("LlamaForCausalLM", "", false, ALL));
    }

    #[test]
    fn matches_autograd_qwen2_biases_tied_head() {
        check(&lora_model(
            "Qwen2ForCausalLM",
            r#", "tie_word_embeddings": true"#,
            true,
            &["q_proj", "v_proj"],
        ));
    }

    #[test]
    fn matches_autograd_mistral_sliding_window() {
        check(&lora_model(
            "MistralForCausalLM",
            r#", "sliding_window": 3"#,
            false,
            &["k_proj", "o_proj", "down_proj"],
        ));
    }

    /// Sequences longer than two query blocks (of either size): later blocks see every
    /// earlier key, or with a sliding window only the last ones.
    #[test]
    fn matches_autograd_across_query_blocks_with_and_without_window() {
        let t = QBLOCK_GEMM * 2 + 5;
        let ids: Vec<u32> = (0..2 * t).map(|i| (i * 7 % 31) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, t), &Device::Cpu).unwrap();
        let labels = ids.to_dtype(DType::I64).unwrap();
        check_on(
            &lora_model("LlamaForCausalLM", "", false, ALL),
            &ids,
            &labels,
        );
        let windowed = lora_model(
            "MistralForCausalLM",
            r#", "sliding_window": 40"#,
            false,
            ALL,
        );
        check_on(&windowed, &ids, &labels);
    }

    /// Dropout on the adapters' input (PEFT's `lora_dropout`): the same masks as the autograd
    /// path from the same stream, and they change the loss.
    #[test]
    fn matches_autograd_with_dropout() {
        let with = lora_model_with("LlamaForCausalLM", "", false, ALL, 0.3);
        let loss = check_on(&with, &ids(), &labels());
        let without = lora_model("LlamaForCausalLM", "", false, ALL);
        let plain = check_on(&without, &ids(), &labels());
        assert!(
            (loss - plain).abs() > 1e-3 * plain.abs(),
            "{loss} vs {plain}"
        );
    }

    /// Activation checkpointing gives the same loss and gradients (1e-6 relative) as keeping
    /// every activation, with adapter dropout too (the recomputed forward reuses the masks),
    /// and leaves the dropout stream where the plain step leaves it.
    #[test]
    fn checkpointing_changes_nothing_but_memory() {
        for dropout in [0.0, 0.3] {
            let model = lora_model_with("LlamaForCausalLM", "", true, ALL, dropout);
            let (seed, pos) = model.vb.rng().state();
            let run = |gradient_checkpointing: bool| {
                model.vb.rng().restore(seed, pos);
                let opts = FusedOptions {
                    gradient_checkpointing,
                };
                let f = model.fused_step(&ids(), &labels(), opts).unwrap().unwrap();
                (f, model.vb.rng().state())
            };
            let ((plain, after_plain), (ckpt, after_ckpt)) = (run(false), run(true));
            assert_eq!(after_plain, after_ckpt, "dropout {dropout}");
            assert!((plain.loss_sum - ckpt.loss_sum).abs() <= 1e-6 * plain.loss_sum.abs());
            assert_eq!(plain.grads.len(), ckpt.grads.len());
            for ((v1, g1), (v2, g2)) in plain.grads.iter().zip(&ckpt.grads) {
                assert_eq!(v1.as_tensor().id(), v2.as_tensor().id());
                let (diff, scale) = crate::ops::testing::diff_and_scale(g2, g1);
                assert!(
                    scale > 0.0 && diff <= 1e-6 * scale,
                    "dropout {dropout}: {diff}"
                );
            }
        }
    }

    /// The adapter gradients by the skinny kernels match the plain GEMM path (odd row count,
    /// rank 11 across two rank groups, with and without a kept `xa`), within f32 rounding.
    #[test]
    fn skinny_lora_grads_match_the_gemm_path() {
        if !skinny::available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let (n, inp, o, r) = (37, 40, 24, 11);
        let var = |len: usize| {
            Var::from_tensor(&Tensor::zeros(len, DType::F32, &candle_core::Device::Cpu).unwrap())
                .unwrap()
        };
        let ad = Adapter {
            a: val(r * inp, 1),
            b: val(o * r, 2),
            r,
            s: 0.75,
            a_var: var(r * inp),
            b_var: var(o * r),
            merged: Vec::new(),
            dropout: 0.0,
            rng: crate::layers::LoraRng::new(0),
        };
        let (x, dy, xa) = (val(n * inp, 3), val(n * o, 4), val(n * r, 5));
        for saved in [None, Some(&xa[..])] {
            let (da, db) = skinny_lora_grads(&x, &dy, saved, &ad, (n, inp, o));
            let (wa, wb) = gemm_lora_grads(&x, &dy, saved, &ad, (n, inp, o));
            for (got, want) in [(&da, &wa), (&db, &wb)] {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
        }
    }

    /// Attention through the AVX-512 tiles matches it through the GEMM (values and the three
    /// gradients): grouped heads, a sequence over two query blocks, with and without a
    /// sliding window; within f32 rounding.
    #[test]
    fn attention_tiles_match_the_gemm_path() {
        if !skinny::available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let (b, t, heads, kv_heads, d) = (2, 77, 4, 2, 32);
        let (q, k, v) = (
            val(b * t * heads * d, 1),
            val(b * t * kv_heads * d, 2),
            val(b * t * kv_heads * d, 3),
        );
        let dout = val(b * t * heads * d, 4);
        for window in [None, Some(20)] {
            let dims = |tiles: bool| Dims {
                b,
                t,
                n: b * t,
                heads,
                kv_heads,
                d,
                eps: 1e-6,
                window,
                cos: val(t * d, 5),
                sin: val(t * d, 6),
                tiles,
            };
            let (gemm, tiles) = (dims(false), dims(true));
            let (pg, og) = attention_forward(&q, &k, &v, &gemm);
            let (pt, ot) = attention_forward(&q, &k, &v, &tiles);
            let bg = attention_backward(&q, &k, &v, &pg, &dout, &gemm);
            let bt = attention_backward(&q, &k, &v, &pt, &dout, &tiles);
            for (got, want) in [
                (&pt, &pg),
                (&ot, &og),
                (&bt.0, &bg.0),
                (&bt.1, &bg.1),
                (&bt.2, &bg.2),
            ] {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let cfg = tiny("LlamaForCausalLM", "");
        let mut w = random_weights(&cfg, false);
        let head = w["model.embed_tokens.weight"].clone();
        w.insert("lm_head.weight".into(), head);
        // Full fine-tuning: every weight is trainable.
        let vb = LoraBuilder::new(MapSource::new(w.clone()), DType::F32, Device::Cpu)
            .full_finetune()
            .unwrap();
        let m = Llama::load(&cfg, &vb).unwrap();
        assert!(m
            .fused_step(&ids(), &labels(), FusedOptions::default())
            .unwrap()
            .is_none());
        // No adapter at all: nothing to train.
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu);
        let m = Llama::load(&cfg, &vb).unwrap();
        assert!(m
            .fused_step(&ids(), &labels(), FusedOptions::default())
            .unwrap()
            .is_none());
    }
}
