//! Fused LoRA linear op with its own backward (CPU, f32).
//!
//! Two forward paths, the same result up to rounding. With `N` rows, `x` `[N, in]`,
//! `W0` `[out, in]`, `A` `[r, in]`, `B` `[out, r]`, scale `s` and dropout mask `m`:
//!
//! ```text
//! merged-weight path (no dropout mask and N·(in+out) ≥ in·out, see merged_weight_pays):
//! forward   W' = W0 + s·B·A              [out, in]  (built per call; W0 itself is untouched)
//!           y  = x·W'ᵀ + b               [N, out]   one GEMM accumulating into the bias
//! backward  xa = s·x·Aᵀ                  [N, r]
//!           g  = dy·B                    [N, r]
//!           dB = dyᵀ·xa                  [out, r]
//!           dA = s·gᵀ·x                  [r, in]
//!           dX = dy·W'                   [N, in]    W' rebuilt; only when x needs a gradient
//!
//! low-rank path (dropout, or few rows):
//! forward   xa = s·(x⊙m)·Aᵀ              [N, r]     saved for backward (m = mask or 1)
//!           y  = x·W0ᵀ + b + xa·Bᵀ       [N, out]   bias written first, both GEMMs accumulate
//! backward  g  = dy·B,  dB = dyᵀ·xa (xa as saved),  dA = s·gᵀ·(x⊙m)
//!           dX = dy·W0 + s·(g·A)⊙m       [N, in]    only when x needs a gradient
//! ```
//!
//! Both paths pay an extra cost proportional to r beyond the `N·in·out` GEMM: building `W'`
//! touches `in·out` elements (`r·in·out` multiply-adds), the low-rank branch touches
//! `N·(in+out)` (`r·N·(in+out)` multiply-adds, two skinny memory-bound GEMMs re-reading `x` and
//! `y`); hence the threshold. The merged-weight forward is one GEMM, as fast as a merged layer.
//!
//! The backward's four skinny products (`xa` when not saved, `g`, `dB`, `dA`) run in one pass
//! over the rows: each thread takes its share of the rows in blocks, and all four read the
//! block's rows of `x⊙m` and `dy` while they are in cache, instead of four passes over `x` and
//! `dy` from memory; with `dy`'s columns contiguous they are `kernels::skinny`'s
//! kernels (the gemm crate ran them at ~27 GFLOPS for r = 8), else the gemm crate. `dX` is one
//! full-size GEMM. Large outputs are written by their GEMM without a zero fill first.
//!
//! candle's generic backward would also compute `dW0 = dyᵀ·x` (an `N×out×in` GEMM, as large as
//! the forward) for the frozen weight; this op computes only what is needed, every GEMM straight
//! through the `gemm` crate with strides (a broadcast or transposed `dy` is read in place). The
//! gradients are fresh tensors that carry no graph. Tested against the plain tensor path.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::gemm::{gemm_f32, gemm_f32_bias_new, gemm_f32_new, gemm_f32_serial};
use crate::kernels::{skinny, Isa};

/// Rows of `x⊙m` made at a time when dropout is on.
const MASK_CHUNK: usize = 256;

/// Rows per block of the backward's low-rank pass: a block's rows of `x` (or `x⊙m`) and `dy`
/// stay in cache across the four skinny products that read them.
const BWD_BLOCK: usize = 128;

/// An inverted-dropout mask over the LoRA branch input `[N, in]`: which elements are kept
/// (1) or dropped (0), and the factor `1/(1−p)` the kept ones are scaled by.
pub(crate) struct DropMask {
    /// One byte per input element.
    pub keep: Vec<u8>,
    /// `1/(1−p)`.
    pub scale: f32,
}

/// The fused LoRA op; build one per forward call.
pub(crate) struct LoraLinearOp {
    /// Frozen `[out, in]`, contiguous f32 on the CPU.
    pub w0: Tensor,
    /// Frozen `[out]`.
    pub bias: Option<Tensor>,
    /// The LoRA scale s.
    pub scale: f32,
    /// Inverted-dropout mask `[N, in]`, if training with dropout.
    pub mask: Option<DropMask>,
    /// `s·(x⊙m)·Aᵀ`, saved by the low-rank forward for the backward.
    pub saved_xa: Mutex<Option<Vec<f32>>>,
}

/// A frozen linear layer `y = x·W0ᵀ + b` whose backward gives only `dX = dy·W0`.
pub(crate) struct FrozenLinearOp {
    /// Frozen `[out, in]`, contiguous f32 on the CPU.
    pub w0: Tensor,
    /// Frozen `[out]`.
    pub bias: Option<Tensor>,
}

/// Whether the forward builds the merged weight `W0 + s·B·A` for `n` rows rather than running
/// the low-rank branch: when `n·(in+out) ≥ in·out`, where the rank-r update of the weight costs
/// no more than the rank-r branch over the rows (see the module doc).
pub(crate) fn merged_weight_pays(n: usize, inp: usize, out: usize) -> bool {
    n.saturating_mul(inp.saturating_add(out)) >= inp.saturating_mul(out)
}

pub(super) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lora op: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("lora op: {what} must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(super) fn with_data<T>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cpu) => f(f32_slice(cpu, l, what)?),
        _ => candle_core::bail!("lora op: {what} must be on the CPU"),
    }
}

/// Runs `f` on the f32 data of a 2-D CPU tensor of shape `dims`, in place whatever its layout:
/// the data from the tensor's start offset and its (row, column) strides, which may be 0 (a
/// broadcast) or transposed. Every element the strides address lies in the slice. A `dy` whose
/// rows are all the same (row stride 0) but whose columns are not contiguous (a single value
/// broadcast, as the gradient of `sum` arrives) is handed over as one contiguous row with row
/// stride 0, which the rank-r kernels read in place.
fn with_strided<T>(
    t: &Tensor,
    dims: (usize, usize),
    what: &str,
    f: impl FnOnce(&[f32], (usize, usize)) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        candle_core::bail!("lora op: {what} must be f32 on the CPU");
    };
    if l.dims() != [dims.0, dims.1] {
        candle_core::bail!("lora op: {what} has shape {:?}, want {dims:?}", l.dims());
    }
    let &[rs, cs] = l.stride() else {
        candle_core::bail!("lora op: {what} must be 2-D");
    };
    let data = v.get(l.start_offset()..).unwrap_or(&[]);
    if rs == 0 && cs != 1 && dims.0 > 0 && dims.1 > 0 {
        // Every row the same (a broadcast, e.g. the gradient of `sum`): one contiguous row,
        // read by every row of the products, instead of a column stride the fast kernels lack.
        let row: Vec<f32> = (0..dims.1).map(|j| data[j * cs]).collect();
        return f(&row, (0, 1));
    }
    f(data, (rs, cs))
}

/// `y = x·Wᵀ + b` into a new `[n, out]` buffer, `w` `[out, in]` row-major.
fn linear_forward(
    x: &[f32],
    n: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    bias: Option<&Tensor>,
) -> candle_core::Result<Vec<f32>> {
    // rhs = Wᵀ: element (k, j) = w[j·in + k]
    let Some(bias) = bias else {
        return Ok(gemm_f32_new(n, out, inp, x, (inp, 1), w, (1, inp), 1.0));
    };
    with_data(bias, "bias", |b| {
        Ok(gemm_f32_bias_new(
            n,
            out,
            inp,
            x,
            (inp, 1),
            w,
            (1, inp),
            1.0,
            b,
        ))
    })
}

/// `W' = W0 + s·B·A` `[out, in]`, a new buffer; `a` `[r, in]`, `b` `[out, r]`.
fn merged_weight(w0: &Tensor, a: &[f32], b: &[f32], s: f32) -> candle_core::Result<Vec<f32>> {
    let (out, inp) = w0.dims2()?;
    let isa = Isa::current();
    with_data(w0, "W0", |w| {
        Ok(merged_weight_of(isa, w, a, b, s, out, inp))
    })
}

/// `W0 + s·B·A` (`[out, in]`, row-major) for `W0: [out, in]`, `A: [r, in]`, `B: [out, r]`: each
/// thread builds its own rows (the gemm crate's threading cost 3× more than the work here, 352
/// vs 107 µs at 512 × 768, r 8), in one pass over `W0` (`skinny::plus_low_rank` on `isa`).
pub(crate) fn merged_weight_of(
    isa: Isa,
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    out: usize,
    inp: usize,
) -> Vec<f32> {
    let r = a.len() / inp.max(1);
    if out == 0 || inp == 0 || r == 0 {
        return w0[..out * inp].to_vec();
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    let rows = out.div_ceil(threads);
    // One pass over W0 per thread, into a buffer nothing has written yet.
    let mut w = Vec::with_capacity(out * inp);
    w.spare_capacity_mut()[..out * inp]
        .par_chunks_mut(rows * inp)
        .zip(w0[..out * inp].par_chunks(rows * inp))
        .zip(b[..out * r].par_chunks(rows * r))
        .for_each(|((d, w0), b)| {
            skinny::plus_low_rank(isa, w0, b, a, s, (d.len() / inp, inp, r), d);
        });
    // SAFETY: the chunks cover all out·inp elements and plus_low_rank writes every element of
    // its chunk.
    unsafe { w.set_len(out * inp) };
    w
}

/// [`merged_weight_of`] by the GEMM (the reference it is tested against): each thread copies
/// its `rows` rows of `W0`, then a serial `k = r` product adds their update.
#[cfg(test)]
fn merged_weight_by_gemm(
    w0: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    (out, inp, r): (usize, usize, usize),
    rows: usize,
) -> Vec<f32> {
    let mut w = vec![0f32; out * inp];
    w.par_chunks_mut(rows * inp)
        .zip(w0[..out * inp].par_chunks(rows * inp))
        .zip(b[..out * r].par_chunks(rows * r))
        .for_each(|((w, w0), b)| {
            w.copy_from_slice(w0);
            gemm_f32_serial(w.len() / inp, inp, r, w, true, b, (r, 1), a, (inp, 1), s);
        });
    w
}

/// A new `[rows, cols]` CPU tensor.
fn tensor(v: Vec<f32>, rows: usize, cols: usize) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
}

impl LoraLinearOp {
    /// `x⊙m` for rows `row0..row0 + rows` of `x: [n, in]` (a chunk: the whole `x⊙m` is never
    /// built, so dropout costs one byte per input element, not a second copy of `x`).
    fn masked_rows(&self, x: &[f32], row0: usize, rows: usize, inp: usize) -> Vec<f32> {
        let mut buf = Vec::new();
        self.masked_rows_into(x, row0, rows, inp, &mut buf);
        buf
    }

    /// [`Self::masked_rows`] into a reused buffer.
    fn masked_rows_into(
        &self,
        x: &[f32],
        row0: usize,
        rows: usize,
        inp: usize,
        buf: &mut Vec<f32>,
    ) {
        let range = row0 * inp..(row0 + rows) * inp;
        buf.clear();
        match &self.mask {
            Some(m) => buf.extend(x[range.clone()].iter().zip(&m.keep[range]).map(|(x, &k)| {
                if k != 0 {
                    x * m.scale
                } else {
                    0.0
                }
            })),
            None => buf.extend_from_slice(&x[range]),
        }
    }

    /// `xa = s·(x⊙m)·Aᵀ` `[n, r]`, the masked rows made [`MASK_CHUNK`] at a time.
    fn xa(&self, x: &[f32], a: &[f32], n: usize, inp: usize, r: usize) -> Vec<f32> {
        let mut xa = vec![0f32; n * r];
        // rhs = Aᵀ: element (k, j) = a[j·in + k]
        if self.mask.is_none() {
            gemm_f32(
                n,
                r,
                inp,
                &mut xa,
                false,
                x,
                (inp, 1),
                a,
                (1, inp),
                self.scale,
            );
            return xa;
        }
        for row0 in (0..n).step_by(MASK_CHUNK) {
            let rows = MASK_CHUNK.min(n - row0);
            let xd = self.masked_rows(x, row0, rows, inp);
            let dst = &mut xa[row0 * r..(row0 + rows) * r];
            gemm_f32(
                rows,
                r,
                inp,
                dst,
                false,
                &xd,
                (inp, 1),
                a,
                (1, inp),
                self.scale,
            );
        }
        xa
    }

    /// `g = dy·B` `[n, r]`, and `dA = s·gᵀ·(x⊙m)` `[r, in]` and `dB = dyᵀ·xa` `[out, r]` when
    /// asked for (else empty), in one pass over the rows: each thread takes its share of the
    /// rows in blocks of [`BWD_BLOCK`], and every product of a block reads the block's `x⊙m`
    /// and `dy` rows from cache; the threads' partial `dA`, `dB` are summed at the end. `xa` is
    /// the forward's when saved, else made per block.
    #[allow(clippy::too_many_arguments)]
    fn low_rank_grads(
        &self,
        x: &[f32],
        dy: &[f32],
        (rs, cs): (usize, usize),
        a: &[f32],
        b: &[f32],
        saved_xa: Option<&[f32]>,
        (n, inp, out, r): (usize, usize, usize, usize),
        (need_da, need_db): (bool, bool),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.scale;
        let mut g = vec![0f32; n * r];
        let da_len = if need_da { r * inp } else { 0 };
        let db_len = if need_db { out * r } else { 0 };
        let (mut da, mut db) = (vec![0f32; da_len], vec![0f32; db_len]);
        if n == 0 || r == 0 {
            return (g, da, db);
        }
        let threads = candle_core::utils::get_num_threads().max(1);
        let rows_per = n.div_ceil(threads.min(n.div_ceil(BWD_BLOCK)));
        // The skinny-product kernels need dy's columns contiguous; they keep dB transposed
        // (`[r, out]`) and read `Bᵀ` (`[r, out]`).
        let fast = cs == 1;
        let isa = Isa::current();
        let bt: Vec<f32> = if fast {
            (0..r * out).map(|q| b[(q % out) * r + q / out]).collect()
        } else {
            Vec::new()
        };
        let partials: Vec<(Vec<f32>, Vec<f32>)> = g
            .par_chunks_mut(rows_per * r)
            .enumerate()
            .map(|(part, g_part)| {
                let (mut da, mut db) = (vec![0f32; da_len], vec![0f32; db_len]);
                let (mut xd_buf, mut xa_buf) = (Vec::new(), vec![0f32; BWD_BLOCK * r]);
                let part_rows = g_part.len() / r;
                for b0 in (0..part_rows).step_by(BWD_BLOCK) {
                    let m = BWD_BLOCK.min(part_rows - b0);
                    let row0 = part * rows_per + b0;
                    // dy rows from row0: element (i, j) = dy_b[i·rs + j·cs]
                    let dy_b = &dy[row0 * rs..];
                    let g_b = &mut g_part[b0 * r..(b0 + m) * r];
                    if fast {
                        skinny::dots(isa, (m, r, out), dy_b, rs, &bt, out, 1.0, g_b);
                    } else {
                        gemm_f32_serial(m, r, out, g_b, false, dy_b, (rs, cs), b, (r, 1), 1.0);
                    }
                    let xd: &[f32] = if self.mask.is_some() {
                        self.masked_rows_into(x, row0, m, inp, &mut xd_buf);
                        &xd_buf
                    } else {
                        &x[row0 * inp..(row0 + m) * inp]
                    };
                    if need_db {
                        let xa: &[f32] = match saved_xa {
                            Some(xa) => &xa[row0 * r..(row0 + m) * r],
                            None => {
                                // xa = s·xd·Aᵀ: rhs element (k, j) = a[j·in + k]
                                let xa = &mut xa_buf[..m * r];
                                if fast {
                                    skinny::dots(isa, (m, r, inp), xd, inp, a, inp, s, xa);
                                } else {
                                    gemm_f32_serial(
                                        m,
                                        r,
                                        inp,
                                        xa,
                                        false,
                                        xd,
                                        (inp, 1),
                                        a,
                                        (1, inp),
                                        s,
                                    );
                                }
                                xa
                            }
                        };
                        if fast {
                            // dBᵀ += xaᵀ·dy
                            skinny::rank_update(
                                isa,
                                (m, r, out),
                                xa,
                                r,
                                dy_b,
                                rs,
                                1.0,
                                &mut db,
                                out,
                            );
                        } else {
                            // dB += dyᵀ·xa: lhs element (o, k) = dy_b[k·rs + o·cs]
                            gemm_f32_serial(
                                out,
                                r,
                                m,
                                &mut db,
                                true,
                                dy_b,
                                (cs, rs),
                                xa,
                                (r, 1),
                                1.0,
                            );
                        }
                    }
                    if need_da {
                        // dA += s·gᵀ·xd: lhs element (j, k) = g_b[k·r + j]
                        if fast {
                            skinny::rank_update(isa, (m, r, inp), g_b, r, xd, inp, s, &mut da, inp);
                        } else {
                            gemm_f32_serial(r, inp, m, &mut da, true, g_b, (1, r), xd, (inp, 1), s);
                        }
                    }
                }
                (da, db)
            })
            .collect();
        for (pa, pb) in partials {
            da.iter_mut().zip(&pa).for_each(|(d, p)| *d += p);
            db.iter_mut().zip(&pb).for_each(|(d, p)| *d += p);
        }
        if fast && need_db {
            // dBᵀ [r, out] → dB [out, r]
            db = (0..out * r).map(|q| db[(q % r) * out + q / r]).collect();
        }
        (g, da, db)
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let a = f32_slice(s2, l2, "lora_A")?;
        let b = f32_slice(s3, l3, "lora_B")?;
        let (n, inp) = l1.shape().dims2()?;
        let r = l2.shape().dims2()?.0;
        let out = l3.shape().dims2()?.0;
        if self.mask.is_none() && merged_weight_pays(n, inp, out) {
            let w = merged_weight(&self.w0, a, b, self.scale)?;
            let y = linear_forward(x, n, inp, &w, out, self.bias.as_ref())?;
            return Ok((CpuStorage::F32(y), Shape::from((n, out))));
        }
        let xa = self.xa(x, a, n, inp, r);
        let mut y = with_data(&self.w0, "W0", |w| {
            linear_forward(x, n, inp, w, out, self.bias.as_ref())
        })?;
        // rhs = Bᵀ: element (k, j) = b[j·r + k]
        gemm_f32(n, out, r, &mut y, true, &xa, (r, 1), b, (1, r), 1.0);
        *self.saved_xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(xa);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The gradients below are fresh tensors built from buffers, so they carry no graph: a
        // gradient built from A, B (variables) or x (the whole forward graph) would keep every
        // activation alive for as long as the gradient, or optimizer state made from it, lives.
        let (n, inp) = x.dims2()?;
        let (r, out) = (a.dim(0)?, b.dim(0)?);
        let s = self.scale;
        let saved = self
            .saved_xa
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let merged = self.mask.is_none() && merged_weight_pays(n, inp, out);
        let x_tracks = x.track_op();
        let x = x.contiguous()?;
        with_data(&x, "x", |x| {
            with_data(a, "lora_A", |a_| {
                with_data(b, "lora_B", |b_| {
                    with_strided(dy, (n, out), "dy", |dy, (rs, cs)| {
                        let (need_da, need_db) = (a.track_op(), b.track_op());
                        let (g, da, db) = self.low_rank_grads(
                            x,
                            dy,
                            (rs, cs),
                            a_,
                            b_,
                            saved.as_deref(),
                            (n, inp, out, r),
                            (need_da, need_db),
                        );
                        let db = need_db.then(|| tensor(db, out, r)).transpose()?;
                        let da = need_da.then(|| tensor(da, r, inp)).transpose()?;
                        let dx = if x_tracks {
                            let dx_of = |w: &[f32]| {
                                gemm_f32_new(n, inp, out, dy, (rs, cs), w, (inp, 1), 1.0)
                            };
                            let dx = if merged {
                                // dX = dy·W'
                                dx_of(&merged_weight(&self.w0, a_, b_, s)?)
                            } else {
                                // dX = dy·W0 + s·(g·A)⊙m
                                let mut dx = with_data(&self.w0, "W0", |w| Ok(dx_of(w)))?;
                                match &self.mask {
                                    None => gemm_f32(
                                        n,
                                        inp,
                                        r,
                                        &mut dx,
                                        true,
                                        &g,
                                        (r, 1),
                                        a_,
                                        (inp, 1),
                                        s,
                                    ),
                                    Some(m) => {
                                        let low =
                                            gemm_f32_new(n, inp, r, &g, (r, 1), a_, (inp, 1), s);
                                        for ((d, l), &k) in dx.iter_mut().zip(&low).zip(&m.keep) {
                                            if k != 0 {
                                                *d += l * m.scale;
                                            }
                                        }
                                    }
                                }
                                dx
                            };
                            Some(tensor(dx, n, inp)?)
                        } else {
                            None
                        };
                        Ok((dx, da, db))
                    })
                })
            })
        })
    }
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "x")?;
        let (n, inp) = l.shape().dims2()?;
        let out = self.w0.dim(0)?;
        let y = with_data(&self.w0, "W0", |w| {
            linear_forward(x, n, inp, w, out, self.bias.as_ref())
        })?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, inp) = x.dims2()?;
        let out = self.w0.dim(0)?;
        // dX = dy·W0, dy read in place whatever its strides.
        let dx = with_data(&self.w0, "W0", |w| {
            with_strided(dy, (n, out), "dy", |dy, st| {
                Ok(gemm_f32_new(n, inp, out, dy, st, w, (inp, 1), 1.0))
            })
        })?;
        Ok(Some(tensor(dx, n, inp)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_tensor};
    use candle_core::Var;

    fn op(w0: &Tensor, bias: Option<&Tensor>) -> LoraLinearOp {
        LoraLinearOp {
            w0: w0.clone(),
            bias: bias.cloned(),
            scale: 0.5,
            mask: None,
            saved_xa: Default::default(),
        }
    }

    /// The gradients match the plain path and carry no graph: a gradient that tracked ops
    /// would keep the forward activations (and, through optimizer state built from it, every
    /// earlier step's) alive. Both forward paths (W0 [4, 5]: the merged weight from
    /// 4·5 / (4 + 5) ≈ 2.2 rows), with and without bias, and rows spanning several backward
    /// blocks and threads (301); tolerance 1e-5 relative.
    #[test]
    fn gradients_match_the_plain_path_and_are_detached() {
        for (rows, merged) in [(6, true), (3, true), (2, false), (301, true)] {
            assert_eq!(merged_weight_pays(rows, 5, 4), merged);
            for with_bias in [false, true] {
                let x = Var::from_tensor(&rand_tensor(&[rows, 5], 1)).unwrap();
                let w0 = rand_tensor(&[4, 5], 2);
                let a = Var::from_tensor(&rand_tensor(&[2, 5], 3)).unwrap();
                let b = Var::from_tensor(&rand_tensor(&[4, 2], 4)).unwrap();
                let bias = with_bias.then(|| rand_tensor(&[4], 6));
                let h = (x.as_tensor() * 2.0).unwrap(); // an op between the leaf and the layer
                let y = h
                    .apply_op3(a.as_tensor(), b.as_tensor(), op(&w0, bias.as_ref()))
                    .unwrap();
                let mut want = (h.matmul(&w0.t().unwrap()).unwrap()
                    + (h.matmul(&a.as_tensor().t().unwrap()).unwrap() * 0.5)
                        .unwrap()
                        .matmul(&b.as_tensor().t().unwrap())
                        .unwrap())
                .unwrap();
                if let Some(bias) = &bias {
                    want = want.broadcast_add(bias).unwrap();
                }
                assert_close(&y, &want, 1e-5);
                let up = rand_tensor(&[rows, 4], 5);
                let g1 = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &a, &b] {
                    let g = g1.get(v.as_tensor()).unwrap();
                    assert_close(g, g2.get(v.as_tensor()).unwrap(), 1e-5);
                    assert!(!g.track_op());
                }
            }
        }
    }

    /// The backward reads a broadcast (stride 0) or transposed `dy` in place, with the same
    /// result as the contiguous copy (1e-6 relative), on both paths and with a dropout mask.
    #[test]
    fn backward_reads_strided_dy_in_place() {
        let (inp, out) = (12, 10); // the merged weight from 120 / 22 ≈ 5.5 rows
        for (rows, masked) in [
            (3, false),
            (40, false),
            (40, true),
            (301, false),
            (301, true),
        ] {
            let x = Var::from_tensor(&rand_tensor(&[rows, inp], 1)).unwrap();
            let w0 = rand_tensor(&[out, inp], 2);
            let a = Var::from_tensor(&rand_tensor(&[2, inp], 3)).unwrap();
            let b = Var::from_tensor(&rand_tensor(&[out, 2], 4)).unwrap();
            let mut lop = op(&w0, None);
            if masked {
                let m = rand_tensor(&[rows, inp], 7).ge(0.0).unwrap();
                let keep = m.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                lop.mask = Some(DropMask { keep, scale: 2.0 });
            }
            let y = x
                .as_tensor()
                .apply_op3(a.as_tensor(), b.as_tensor(), op(&w0, None))
                .unwrap();
            let scalar = Tensor::new(0.7f32, &Device::Cpu).unwrap();
            let row = rand_tensor(&[1, out], 8);
            let col = rand_tensor(&[rows, 1], 9);
            let dys = [
                scalar.broadcast_as((rows, out)).unwrap(),
                row.broadcast_as((rows, out)).unwrap(),
                col.broadcast_as((rows, out)).unwrap(),
                rand_tensor(&[out, rows], 10).t().unwrap(),
            ];
            for dy in dys {
                assert!(!dy.is_contiguous());
                let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
                let got = lop.bwd(xt, at, bt, &y, &dy).unwrap();
                let want = lop.bwd(xt, at, bt, &y, &dy.contiguous().unwrap()).unwrap();
                for (g, w) in [(got.0, want.0), (got.1, want.1), (got.2, want.2)] {
                    assert_close(&g.unwrap(), &w.unwrap(), 1e-6);
                }
            }
        }
    }

    /// `W0 + s·B·A` row by row (odd row count across threads), by the kernel and by the GEMM
    /// fallback, equals the definition.
    #[test]
    fn merged_weight_is_w0_plus_scaled_ba() {
        let (out, inp, r) = (7, 5, 3);
        let f = |len: usize, k: f32| (0..len).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
        let (w0, a, b) = (f(out * inp, 0.7), f(r * inp, 1.3), f(out * r, 2.1));
        for isa in Isa::supported() {
            let w = merged_weight_of(isa, &w0, &a, &b, 0.5, out, inp);
            let by_gemm = merged_weight_by_gemm(&w0, &a, &b, 0.5, (out, inp, r), 4);
            for o in 0..out {
                for c in 0..inp {
                    let want = w0[o * inp + c]
                        + 0.5 * (0..r).map(|j| b[o * r + j] * a[j * inp + c]).sum::<f32>();
                    assert!((w[o * inp + c] - want).abs() < 1e-6, "({o},{c})");
                    assert!(
                        (by_gemm[o * inp + c] - want).abs() < 1e-6,
                        "gemm path ({o},{c})"
                    );
                }
            }
        }
    }

    #[test]
    fn merged_weight_threshold() {
        // The layer benchmark's shape: 768 → 512, threshold 768·512 / 1280 = 307.2 rows.
        assert!(!merged_weight_pays(307, 768, 512));
        assert!(merged_weight_pays(308, 768, 512));
        assert!(merged_weight_pays(4096, 768, 512));
        assert!(!merged_weight_pays(0, 768, 512));
        assert!(merged_weight_pays(usize::MAX, usize::MAX, 2));
    }
}
