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
//! the token-major buffers in place, and skips the key blocks a query block cannot see
//! (`kernels::attention`, per-head products in `kernels::tile_mm`'s register tiles). Large
//! products go through `kernels::gemm` (split between threads by columns, else rows, one
//! serial GEMM per thread) and write fresh outputs without a zero fill; the adapters' rank-r
//! products use `kernels::skinny`; norms, RoPE, SwiGLU and cross-entropy are
//! `kernels::{norm, rope, activation, softmax}`. Every kernel runs on the instruction set
//! [`Isa::current`] gives at the start of the step (AVX-512, AVX2+FMA or portable).
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
//! `lora_B` of a decoder linear (`q/k/v/o_proj`, `gate/up/down_proj`), no adapter uses DoRA
//! (its magnitude vector is not in this backward) and no adapter is merged; otherwise [`CausalLm::fused_loss_and_grads`] returns `None` and callers use
//! autograd. Tested against the autograd path (loss and every gradient) in `tests`.
//!
//! [`causal_lm_loss_sum`]: crate::models::loss::causal_lm_loss_sum

use std::collections::HashSet;

use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use rayon::prelude::*;

use super::Llama;
use crate::error::{Error, Result};
use crate::kernels::activation::{swiglu_backward, swiglu_forward};
use crate::kernels::attention::{attention_backward, attention_forward, Attention, Mask};
use crate::kernels::embedding::embedding_forward;
use crate::kernels::norm::{rms_norm_backward, rms_norm_forward};
use crate::kernels::rope::rope_inplace;
use crate::kernels::softmax::cross_entropy_inplace;
use crate::kernels::{gemm, skinny, vectorised, Isa, CHUNK};
use crate::layers::{LoraLinear, Mergeable};
#[cfg(doc)]
use crate::models::CausalLm;

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
    /// The kernels' target for this step.
    isa: Isa,
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
        let (da, db) = skinny_lora_grads(x, dy, saved_xa, ad, (n, inp, o));
        let dev = candle_core::Device::Cpu;
        out.push((ad.a_var.clone(), Tensor::from_vec(da, (r, inp), &dev)?));
        out.push((ad.b_var.clone(), Tensor::from_vec(db, (o, r), &dev)?));
        Ok(())
    }
}

/// `(dA, dB)` of an adapter, `dA = s·(dy·B)ᵀ·x` `[r, in]`, `dB = s·dyᵀ·xa` `[out, r]` with
/// `xa = x·Aᵀ` (given, or made here), by the skinny kernels: the rows are split across
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
                    skinny::dots(ad.isa, (m, r, inp), xr, inp, &ad.a, inp, 1.0, &mut xa);
                    made = xa;
                    &made[..]
                }
            };
            let mut g = vec![0f32; m * r];
            skinny::dots(ad.isa, (m, r, o), dyr, o, &bt, o, 1.0, &mut g);
            let (mut da, mut dbt) = (vec![0f32; r * inp], vec![0f32; r * o]);
            skinny::rank_update(ad.isa, (m, r, inp), &g, r, xr, inp, ad.s, &mut da, inp);
            skinny::rank_update(ad.isa, (m, r, o), xa, r, dyr, o, ad.s, &mut dbt, o);
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

/// [`skinny_lora_grads`] by the general GEMM (the reference it is tested against).
#[cfg(test)]
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
    let (xn, inv1) = rms_norm_forward(dm.isa, &x, l.n1, dm.eps);
    let (mut q, dq_) = l.q.forward(&xn, n, mq);
    dm.rope(&mut q, dm.heads, false);
    let (mut k, dk_) = l.k.forward(&xn, n, mk);
    dm.rope(&mut k, dm.kv_heads, false);
    let (v, dv_) = l.v.forward(&xn, n, mv);
    let (p, o) = attention_forward(&q, &k, &v, &dm.attn);
    let (mut h1, do_) = l.o.forward(&o, n, mo);
    add_into(dm.isa, &mut h1, &x);
    let (xn2, inv2) = rms_norm_forward(dm.isa, &h1, l.n2, dm.eps);
    let (g, dg_) = l.gate.forward(&xn2, n, mg);
    let (u, du_) = l.up.forward(&xn2, n, mu);
    let hm = swiglu_forward(dm.isa, &g, &u);
    let (mut out, dd_) = l.down.forward(&hm, n, md);
    add_into(dm.isa, &mut out, &h1);
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

/// Shapes, tables and the kernel target shared by every layer.
struct Dims {
    t: usize,
    n: usize,
    heads: usize,
    kv_heads: usize,
    eps: f32,
    /// Causal, with the model's sliding window if any.
    attn: Attention<'static>,
    /// `[t, d]` rope tables (both halves equal).
    cos: Vec<f32>,
    sin: Vec<f32>,
    isa: Isa,
}

impl Dims {
    /// RoPE (or its backward) on token-major `x` with `heads` heads.
    fn rope(&self, x: &mut [f32], heads: usize, backward: bool) {
        rope_inplace(self.isa, x, self.t, heads, &self.cos, &self.sin, backward);
    }
}

/// `a += b`.
fn add_into(isa: Isa, a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            vectorised(
                isa,
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
    isa: Isa,
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
            isa,
        }));
    }
    let merged = crate::ops::merged_weight_of(isa, w0, &a, &b, s, out, inp);
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
        isa,
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
                    // DoRA (a magnitude vector) is not in the hand-written backward: autograd.
                    if !f32_cpu(l.a.as_tensor())
                        || !f32_cpu(l.b.as_tensor())
                        || l.magnitude.is_some()
                    {
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
        let isa = Isa::current();
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let (hs, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let (rows, tg) = crate::models::loss::predicted_rows(labels, b, t, vocab)?;
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
                    adapter: adapter(lins[j], w0, out, inp, self.vb.rng(), isa)?,
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
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let dm = Dims {
            t,
            n: b * t,
            heads,
            kv_heads,
            eps: cfg.rms_norm_eps as f32,
            attn: Attention {
                b,
                t,
                heads,
                kv_heads,
                d: hd,
                mask: Mask::Causal {
                    window: self.window,
                },
                lens: None,
                isa,
            },
            cos,
            sin,
            isa,
        };
        let n = dm.n;

        // Forward.
        let mut x = embedding_forward(table, hs, &ids);
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
        let (xf, invf) = rms_norm_forward(isa, &x, wf, dm.eps);
        let mut logits = mm_new((n, vocab, hs), (&xf, hs, 1), (wh, 1, hs), 1.0);
        let loss_sum = cross_entropy_inplace(isa, &mut logits, vocab, &targets);

        // Backward.
        let dxf = mm_new((n, hs, vocab), (&logits, vocab, 1), (wh, hs, 1), 1.0);
        drop(logits);
        let mut dh = vec![0f32; n * hs];
        rms_norm_backward(isa, &dxf, &x, &invf, wf, &mut dh, true);
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
            swiglu_backward(isa, &mut s.g, &mut s.u, &dhm);
            drop(dhm);
            let (dg, du) = (s.g, s.u);
            let mut dxn2 = l.gate.backward_x_new(&dg, n, s.drops[4].as_ref());
            l.up.backward_x(&du, n, &mut dxn2, true, s.drops[5].as_ref());
            l.gate
                .lora_grads(&s.xn2, &dg, n, s.drops[4].as_ref(), &mut grads)?;
            l.up.lora_grads(&s.xn2, &du, n, s.drops[5].as_ref(), &mut grads)?;
            let mut dh1 = dh;

            rms_norm_backward(isa, &dxn2, &s.h1, &s.inv2, l.n2, &mut dh1, true);
            // Attention.
            let dout = l.o.backward_x_new(&dh1, n, s.drops[3].as_ref());
            l.o.lora_grads(&s.o, &dh1, n, s.drops[3].as_ref(), &mut grads)?;
            let (mut dq, mut dk, dv) = attention_backward(&s.q, &s.k, &s.v, &s.p, &dout, &dm.attn);
            dm.rope(&mut dq, heads, true);
            dm.rope(&mut dk, kv_heads, true);
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
            rms_norm_backward(isa, &dxn, &s.x, &s.inv1, l.n1, &mut dh1, true);
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
    use crate::models::loss::causal_lm_loss_sum;
    use crate::models::CausalLm;
    use crate::ops::testing::values as val;
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
    /// different summation orders), with the kernels on every target the CPU runs.
    fn check(model: &Llama) {
        check_on(model, &ids(), &labels());
    }

    fn check_on(model: &Llama, ids: &Tensor, labels: &Tensor) -> f64 {
        // Both passes draw the same dropout masks (same stream position, same order).
        let (seed, pos) = model.vb.rng().state();
        let logits = model.forward_t(ids, true).unwrap();
        let (sum, count) = causal_lm_loss_sum(&logits, labels).unwrap();
        let want = sum.to_scalar::<f32>().unwrap() as f64;
        let g = sum.backward().unwrap();
        let vars = model.trainable_vars();
        let mut loss = 0.0;
        for isa in Isa::supported() {
            model.vb.rng().restore(seed, pos);
            let fused = crate::kernels::with_isa(isa, || {
                model.fused_step(ids, labels, FusedOptions::default())
            })
            .unwrap()
            .unwrap();
            assert_eq!(fused.count, count);
            assert!(
                (fused.loss_sum - want).abs() <= 1e-5 * want.abs(),
                "{isa}: {} vs {want}",
                fused.loss_sum
            );
            assert_eq!(fused.grads.len(), vars.len());
            for (v, got) in &fused.grads {
                let want = g.get(v.as_tensor()).unwrap();
                let (diff, scale) = crate::ops::testing::diff_and_scale(got, want);
                assert!(scale > 0.0);
                assert!(
                    diff <= 1e-5 * scale,
                    "{isa}: gradient differs by {diff} (scale {scale})"
                );
            }
            loss = fused.loss_sum;
        }
        loss
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
        let t = 2 * 64 + 5; // many query blocks (`kernels::attention::QBLOCK`)
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
    /// rank 11 across two rank groups, with and without a kept `xa`), within f32 rounding, on
    /// every target.
    #[test]
    fn skinny_lora_grads_match_the_gemm_path() {
        for isa in Isa::supported() {
            skinny_lora_grads_case(isa);
        }
    }

    fn skinny_lora_grads_case(isa: Isa) {
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
            isa,
        };
        let (x, dy, xa) = (val(n * inp, 3), val(n * o, 4), val(n * r, 5));
        for saved in [None, Some(&xa[..])] {
            let (da, db) = skinny_lora_grads(&x, &dy, saved, &ad, (n, inp, o));
            let (wa, wb) = gemm_lora_grads(&x, &dy, saved, &ad, (n, inp, o));
            for (got, want) in [(&da, &wa), (&db, &wb)] {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{isa}: {g} vs {w}");
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
