//! Scaled dot-product attention, forward and backward, on token-major projections: causal
//! (optionally with a sliding window) or bidirectional, grouped-query (GQA) heads, and key
//! padding per sequence.
//!
//! Shapes: `q: [b·t, H·d]`, `k, v: [b·t, KV·d]` row-major (the projections' outputs as they
//! are; heads are read in place through strides), `H` a multiple of `KV` (query head `h` uses
//! kv head `h / (H/KV)`), probabilities `P: [b, H, t, t]`, output `o: [b·t, H·d]`.
//!
//! ```text
//! S = q_h·k_hᵀ/√d,  P = softmax over the keys row i sees,  o_h = P·v_h
//! dP = do_h·v_hᵀ,   dS = P ⊙ (dP − Σ_row dP⊙P)/√d
//! dq_h = dS·k_h,    dk_h += dSᵀ·q_h,    dv_h += Pᵀ·do_h    (summed over a kv head's queries)
//! ```
//!
//! Row `i` of sequence `s` sees keys `lo..hi` with `len = lens[s]` (all `t` without padding):
//! causal `lo = i + 1 − window` (0 without one), `hi = min(i + 1, len)`; bidirectional
//! `lo = 0`, `hi = len`. `P` is 0 outside; a row that sees no key gets `P = 0` and output 0.
//! Queries run in blocks of [`QBLOCK`] rows whose products cover only the keys the block's rows
//! see (the masked upper triangle is skipped); the per-head products are
//! [`tile_mm_to`](super::tile_mm::tile_mm_to)'s register tiles, each (sequence, head) a rayon
//! task. RoPE is the caller's (applied to `q`, `k` before, and to `dq`, `dk` after).

use rayon::prelude::*;

use super::gemm::Out;
use super::softmax::{softmax_backward, softmax_inplace};
use super::tile_mm::{tile_mm_to, transpose};
use super::{vectorised, Isa};

/// Query rows per block: thin blocks skip more of the causal triangle (at 128 tokens 55 % of
/// the full products against 75 % with 64-row blocks); attention fwd + bwd of one benchmark
/// layer took 0.89× the time of 64-row blocks (AVX-512, 2 threads, median of 6 rounds).
pub(crate) const QBLOCK: usize = 12;

/// Which keys a query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mask {
    /// Keys up to the query's position; with a window, only the last `window` of them.
    Causal {
        /// Sliding window (Mistral, Qwen2), if any.
        window: Option<usize>,
    },
    /// Every (unpadded) key (encoders: BERT).
    Bidirectional,
}

/// The shape and masking of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attention<'a> {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `KV` (divides `H`).
    pub kv_heads: usize,
    /// Head width `d`.
    pub d: usize,
    /// Causal or bidirectional.
    pub mask: Mask,
    /// Valid (unpadded) keys of each sequence, the first `lens[s]` (`None`: all `t`).
    pub lens: Option<&'a [usize]>,
    /// The target the kernels run on.
    pub isa: Isa,
}

impl Attention<'_> {
    /// Keys `lo..hi` that row `i` of sequence `s` sees.
    fn range(&self, s: usize, i: usize) -> (usize, usize) {
        let len = self.lens.map_or(self.t, |l| l[s].min(self.t));
        let (lo, hi) = match self.mask {
            Mask::Causal { window } => (
                window.map_or(0, |w| (i + 1).saturating_sub(w)),
                (i + 1).min(len),
            ),
            Mask::Bidirectional => (0, len),
        };
        (lo.min(hi), hi)
    }

    /// The query blocks of sequence `s`: `(first row, rows, first key, keys)`, the keys
    /// spanning what the block's rows see (`lo` and `hi` never decrease along the rows).
    fn blocks(&self, s: usize) -> Vec<(usize, usize, usize, usize)> {
        (0..self.t)
            .step_by(QBLOCK)
            .map(|r0| {
                let rows = QBLOCK.min(self.t - r0);
                let k0 = self.range(s, r0).0;
                let k1 = self.range(s, r0 + rows - 1).1;
                (r0, rows, k0, k1.saturating_sub(k0))
            })
            .collect()
    }
}

/// `c (+)= beta·a·y` through [`tile_mm_to`] (see there).
///
/// # Safety
/// `c` must be valid for writes (and reads of initialised values when `acc`) of the block,
/// with nothing else accessing it during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn small_mm(
    isa: Isa,
    dims: (usize, usize, usize),
    (c, c_rs): (*mut f32, usize),
    acc: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (y, y_rs): (&[f32], usize),
    beta: f32,
) {
    // SAFETY: the caller's contract on `c`; the kernel checks the operands' extents.
    unsafe { tile_mm_to(isa, dims, a, (a_rs, a_cs), y, y_rs, beta, c, c_rs, acc) }
}

/// One head of a token-major `x` (`t` rows `x_rs` apart, `d` columns from the slice's start)
/// transposed to `[d, t]`: the right operand of a product with `xᵀ`.
fn transposed_head(isa: Isa, x: &[f32], x_rs: usize, t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; d * t];
    transpose(isa, x, x_rs, (t, d), &mut out);
    out
}

/// Attention forward (see the module doc): returns `(P: [b, H, t, t], o: [b·t, H·d])`.
pub(crate) fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    at: &Attention,
) -> (Vec<f32>, Vec<f32>) {
    let (t, d, h, kvh, isa) = (at.t, at.d, at.heads, at.kv_heads, at.isa);
    let rep = h / kvh;
    let (hd, kvd) = (h * d, kvh * d);
    let scale = 1.0 / (d as f32).sqrt();
    let n = at.b * t;
    let mut p = vec![0f32; at.b * h * t * t];
    let mut o: Vec<f32> = Vec::with_capacity(n * hd);
    // Each task writes its head's columns of `o` (below).
    let out = Out {
        ptr: o.as_mut_ptr(),
        rs: hd,
    };
    p.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / h, bh % h);
        let qh = &q[bi * t * hd + hi * d..];
        let kv = bi * t * kvd + (hi / rep) * d;
        let (kt, vh) = (transposed_head(isa, &k[kv..], kvd, t, d), &v[kv..]);
        for (r0, rows, k0, keys) in at.blocks(bi) {
            let qb = (&qh[r0 * hd..], hd, 1);
            // SAFETY: the block of `p` lies inside this task's chunk, borrowed mutably.
            unsafe {
                let pb = (p[r0 * t + k0..].as_mut_ptr(), t);
                small_mm(isa, (rows, keys, d), pb, false, qb, (&kt[k0..], t), scale);
            }
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for i in r0..r0 + rows {
                        let row = &mut p[i * t..][..t];
                        let (lo, hi) = at.range(bi, i);
                        row[..lo].fill(0.0);
                        row[hi..].fill(0.0);
                        if hi > lo {
                            softmax_inplace(&mut row[lo..hi]);
                        }
                    }
                },
            );
            let pb = (&p[r0 * t + k0..], t, 1);
            // SAFETY: rows bi·t + r0.. (rows of them) × columns hi·d..(hi + 1)·d of `o` are
            // this task's alone (one task per sequence and head) and inside its capacity.
            unsafe {
                let ob = (out.at(bi * t + r0, hi * d).ptr, hd);
                small_mm(
                    isa,
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
    // product above wrote its whole block (`acc` false; zeros when it has no keys): all
    // n·H·d values are initialised.
    unsafe { o.set_len(n * hd) };
    (p, o)
}

/// Attention backward for the output gradient `do_tok: [b·t, H·d]`, given the forward's
/// inputs and `P`: returns token-major `(dq, dk, dv)`.
pub(crate) fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    do_tok: &[f32],
    at: &Attention,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, h, kvh, isa) = (at.t, at.d, at.heads, at.kv_heads, at.isa);
    let rep = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
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
    (0..at.b * kvh).into_par_iter().for_each(|g| {
        let (bi, kvi) = (g / kvh, g % kvh);
        let kv = bi * t * kvd + kvi * d;
        let (kh, vt) = (&k[kv..], transposed_head(isa, &v[kv..], kvd, t, d));
        let blocks = at.blocks(bi);
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
        let mut ds = vec![0f32; QBLOCK * t];
        for r in 0..rep {
            let hi = kvi * rep + r;
            let bh = bi * h + hi;
            let head = (bi * t) * hd + hi * d;
            let (qh, ph) = (&q[head..], &p[bh * t * t..][..t * t]);
            let doh = &do_tok[head..];
            for &(r0, rows, k0, keys) in &blocks {
                let (dob, pb) = (&doh[r0 * hd..], &ph[r0 * t + k0..]);
                // SAFETY: `ds` is this task's; the `dv` block is this task's (above).
                unsafe {
                    // dP = dO·Vᵀ and dV += Pᵀ·dO over the block's keys.
                    let vb = (&vt[k0..], t);
                    let dsb = (ds.as_mut_ptr(), keys);
                    small_mm(isa, (rows, keys, d), dsb, false, (dob, hd, 1), vb, 1.0);
                    let dvk = (dvb.add(k0 * kvd), kvd);
                    small_mm(isa, (keys, d, rows), dvk, true, (pb, 1, t), (dob, hd), 1.0);
                }
                // dS = P ⊙ (dP − Σ dP⊙P) / √d (0 where P is).
                if keys > 0 {
                    vectorised(
                        isa,
                        #[inline(always)]
                        || {
                            for (i, dsr) in ds.chunks_exact_mut(keys).take(rows).enumerate() {
                                softmax_backward(&pb[i * t..][..keys], dsr, scale);
                            }
                        },
                    );
                }
                // SAFETY: as above.
                unsafe {
                    let dqb = (dqs.at(bi * t + r0, hi * d).ptr, hd);
                    let kb = (&kh[k0 * kvd..], kvd);
                    small_mm(isa, (rows, d, keys), dqb, false, (&ds, keys, 1), kb, 1.0);
                    let dkk = (dkb.add(k0 * kvd), kvd);
                    let qb = (&qh[r0 * hd..], hd);
                    small_mm(isa, (keys, d, rows), dkk, true, (&ds, 1, keys), qb, 1.0);
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
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    /// Plain f64 attention and its gradients (every key scored, masked ones excluded).
    #[allow(clippy::type_complexity)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        at: &Attention,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (t, d, h, kvh) = (at.t, at.d, at.heads, at.kv_heads);
        let (hd, kvd, rep) = (h * d, kvh * d, h / kvh);
        let c = 1.0 / (d as f64).sqrt();
        let mut o = vec![0f64; q.len()];
        let (mut dq, mut dk, mut dv) = (
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; v.len()],
        );
        for s in 0..at.b {
            for hh in 0..h {
                let kh = hh / rep;
                let qi = |i: usize, j: usize| q[(s * t + i) * hd + hh * d + j] as f64;
                let ki = |i: usize, j: usize| k[(s * t + i) * kvd + kh * d + j] as f64;
                let vi = |i: usize, j: usize| v[(s * t + i) * kvd + kh * d + j] as f64;
                for i in 0..t {
                    let (lo, hi) = at.range(s, i);
                    if hi <= lo {
                        continue;
                    }
                    let sc: Vec<f64> = (lo..hi)
                        .map(|kk| (0..d).map(|j| qi(i, j) * ki(kk, j)).sum::<f64>() * c)
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let pr: Vec<f64> = e.iter().map(|x| x / z).collect();
                    let dor = |j: usize| dout[(s * t + i) * hd + hh * d + j] as f64;
                    let dp: Vec<f64> = (lo..hi)
                        .map(|kk| (0..d).map(|j| dor(j) * vi(kk, j)).sum())
                        .collect();
                    let sdp: f64 = dp.iter().zip(&pr).map(|(a, b)| a * b).sum();
                    for (x, kk) in (lo..hi).enumerate() {
                        let dsx = pr[x] * (dp[x] - sdp) * c;
                        for j in 0..d {
                            o[(s * t + i) * hd + hh * d + j] += pr[x] * vi(kk, j);
                            dv[(s * t + kk) * kvd + kh * d + j] += pr[x] * dor(j);
                            dq[(s * t + i) * hd + hh * d + j] += dsx * ki(kk, j);
                            dk[(s * t + kk) * kvd + kh * d + j] += dsx * qi(i, j);
                        }
                    }
                }
            }
        }
        (o, dq, dk, dv)
    }

    /// Causal, causal with a window, bidirectional, each with and without key padding
    /// (including an empty sequence), grouped heads, 29 tokens over three query blocks:
    /// output and the three gradients within 1e-5 (relative to max(1, |value|)) of f64, on
    /// every target.
    #[test]
    fn matches_f64_for_every_mask() {
        let (b, t, heads, kv_heads, d) = (3, 29, 4, 2, 16);
        let (q, k, v) = (
            values(b * t * heads * d, 1),
            values(b * t * kv_heads * d, 2),
            values(b * t * kv_heads * d, 3),
        );
        let dout = values(b * t * heads * d, 4);
        let lens = [29usize, 17, 0];
        for isa in Isa::supported() {
            for mask in [
                Mask::Causal { window: None },
                Mask::Causal { window: Some(5) },
                Mask::Bidirectional,
            ] {
                for padded in [false, true] {
                    let at = Attention {
                        b,
                        t,
                        heads,
                        kv_heads,
                        d,
                        mask,
                        lens: padded.then_some(&lens[..]),
                        isa,
                    };
                    let (p, o) = attention_forward(&q, &k, &v, &at);
                    let (dq, dk, dv) = attention_backward(&q, &k, &v, &p, &dout, &at);
                    let (wo, wdq, wdk, wdv) = reference(&q, &k, &v, &dout, &at);
                    for (name, got, want) in [
                        ("o", &o, &wo),
                        ("dq", &dq, &wdq),
                        ("dk", &dk, &wdk),
                        ("dv", &dv, &wdv),
                    ] {
                        assert_eq!(got.len(), want.len());
                        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                                "{isa} {mask:?} padded={padded} {name}[{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
