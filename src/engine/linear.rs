//! One linear of a block, with or without a LoRA adapter, on f32 slices: forward, the input
//! gradient and the adapter's gradients.
//!
//! ```text
//! y  = x·W'ᵀ + b,   W' = W0 + s·B·A           (adapted, no dropout: one GEMM, W' formed per step)
//! y  = x·W0ᵀ + b + s·((x⊙m)·Aᵀ)·Bᵀ            (adapted with dropout mask m)
//! dx = dy·W'   (+ s·((dy·B)·A)⊙m with dropout)
//! dA = s·(dy·B)ᵀ·x_in,  dB = s·dyᵀ·(x_in·Aᵀ)   (x_in = x, or x⊙m with dropout)
//! ```
//!
//! Shapes: `x: [n, in]`, `W0: [out, in]`, `A: [r, in]`, `B: [out, r]`, `y, dy: [n, out]`.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use super::{Grads, Tape};
use crate::error::Result;
use crate::kernels::{gemm, skinny, Isa, CHUNK};
use crate::layers::{LoraLinear, Mergeable};

/// `dst[i·dst_rs + j] (+)= beta · Σ_k lhs[i·lrs + k·lcs] · rhs[k·rrs + j·rcs]` for `m×n` outputs,
/// on candle's threads when `parallel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
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
pub(crate) struct Adapter {
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
pub(crate) struct Dropped {
    mask: Vec<f32>,
    xa: Vec<f32>,
}

/// One linear of a block: frozen `W0: [out, in]`, bias, optional adapter.
pub(crate) struct Lin<'a> {
    w0: &'a [f32],
    bias: Option<&'a [f32]>,
    pub(crate) out: usize,
    pub(crate) inp: usize,
    adapter: Option<Adapter>,
    /// The weight's and the bias's variables when they train themselves (full fine-tuning).
    base: Option<(Var, Option<Var>)>,
}

/// Whether the engine can run `lin`: f32 on the CPU (weight, bias and factors), not merged,
/// and no DoRA (its magnitude vector is not in the blocks; autograd trains it).
pub(crate) fn engine_runs(lin: &LoraLinear) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    !lin.is_merged()
        && f32_cpu(lin.weight())
        && lin.bias().is_none_or(f32_cpu)
        && lin.lora().is_none_or(|l| {
            f32_cpu(l.a.as_tensor()) && f32_cpu(l.b.as_tensor()) && l.magnitude.is_none()
        })
}

impl<'a> Lin<'a> {
    /// The linear of `lin` with its frozen weight `w0: [out, in]` and bias borrowed for the
    /// step; the adapter's factors are copied and, without dropout, `W'` is formed here.
    pub(crate) fn new(
        lin: &LoraLinear,
        w0: &'a [f32],
        bias: Option<&'a [f32]>,
        rng: &crate::layers::LoraRng,
        isa: Isa,
    ) -> Result<Self> {
        let (out, inp) = lin.weight().dims2()?;
        let vars = if lin.lora().is_none() {
            lin.trainable_vars()
        } else {
            Vec::new()
        };
        let var_of = |t: &Tensor| vars.iter().find(|v| v.as_tensor().id() == t.id()).cloned();
        let base = var_of(lin.weight()).map(|w| (w, lin.bias().and_then(var_of)));
        Ok(Lin {
            w0,
            bias,
            out,
            inp,
            adapter: adapter(lin, w0, out, inp, rng, isa)?,
            base,
        })
    }

    /// Whether the backward computes gradients for this linear (an adapter's factors, or the
    /// weight and bias themselves under full fine-tuning).
    pub(crate) fn trains(&self) -> bool {
        self.adapter.is_some() || self.base.is_some()
    }

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
    pub(crate) fn forward(
        &self,
        x: &[f32],
        n: usize,
        tape: &mut Tape,
    ) -> Result<(Vec<f32>, Option<Dropped>)> {
        let y = self.forward_base(x, n);
        Ok(match &self.adapter {
            Some(ad) if ad.dropout > 0.0 => {
                let (mut y, r) = (y, ad.r);
                let mask = tape.mask(|| ad.rng.keep_mask(n * self.inp, ad.dropout))?;
                let xd: Vec<f32>;
                let xin = match &mask {
                    Some(m) => {
                        xd = x[..n * self.inp]
                            .iter()
                            .zip(m)
                            .map(|(x, m)| x * m)
                            .collect();
                        &xd[..]
                    }
                    // Inference: no dropout.
                    None => &x[..n * self.inp],
                };
                let mut xa = vec![0f32; n * r];
                mm(
                    (n, r, self.inp),
                    &mut xa,
                    r,
                    false,
                    (xin, self.inp, 1),
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
                (y, mask.map(|mask| Dropped { mask, xa }))
            }
            _ => (y, None),
        })
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
    pub(crate) fn backward_x(
        &self,
        dy: &[f32],
        n: usize,
        dx: &mut [f32],
        acc: bool,
        drop: Option<&Dropped>,
    ) {
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
    pub(crate) fn backward_x_new(&self, dy: &[f32], n: usize, drop: Option<&Dropped>) -> Vec<f32> {
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

    /// The gradients of what trains in this linear for input `x: [n, in]` and output
    /// gradient `dy: [n, out]`: the adapter's `dA`, `dB`, and under full fine-tuning
    /// `dW = dyᵀ·x` and `db = Σ_rows dy`.
    pub(crate) fn param_grads(
        &self,
        x: &[f32],
        dy: &[f32],
        n: usize,
        drop: Option<&Dropped>,
        out: &mut Grads,
    ) -> Result<()> {
        let dev = candle_core::Device::Cpu;
        if let Some((w, b)) = &self.base {
            let (o, inp) = (self.out, self.inp);
            let dw = mm_new((o, inp, n), (dy, 1, o), (x, inp, 1), 1.0);
            out.push((w.clone(), Tensor::from_vec(dw, (o, inp), &dev)?));
            if let Some(b) = b {
                let mut db = vec![0f32; o];
                for row in dy[..n * o].chunks_exact(o) {
                    db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                }
                out.push((b.clone(), Tensor::from_vec(db, o, &dev)?));
            }
        }
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
        out.push((ad.a_var.clone(), Tensor::from_vec(da, (r, inp), &dev)?));
        out.push((ad.b_var.clone(), Tensor::from_vec(db, (o, r), &dev)?));
        Ok(())
    }
}

/// `(dA, dB)` of an adapter, `dA = s·(dy·B)ᵀ·x` `[r, in]`, `dB = s·dyᵀ·xa` `[out, r]` with
/// `xa = x·Aᵀ` (given, or made here), by the skinny kernels: the rows are split across
/// threads, each pass reads its rows of `x` and `dy` once per product from cache, and the
/// threads' partial sums are added at the end.
pub(crate) fn skinny_lora_grads(
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
pub(crate) fn gemm_lora_grads(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values as val;
    use candle_core::DType;

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
}
