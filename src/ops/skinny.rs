//! AVX-512 kernels for the LoRA backward's skinny products (one side of size `r`, the rank).
//!
//! Why: with `r` = 8 the `gemm` crate runs these at ~27 GFLOPS on one thread (measured, rows
//! 256 × 768 × 8): it packs the tall operand on every call and fills half of each 16-lane
//! vector. A profile of the seed-shape LoRA layer step put 5.4 % of it in that kernel. The
//! products only need one pass over the tall operand while `r` rows of the small one sit in L1:
//!
//! - [`dots`]: `out[i, j] = scale · Σ_p v[i, p] · w[j, p]` — `x·Aᵀ` and `dy·B` (with `Bᵀ`);
//!   two rows of `v` at a time against up to 8 rows of `w`, 16 lanes per step.
//! - [`rank_update`]: `acc[j, c] += scale · Σ_i u[i, j] · v[i, c]` — `gᵀ·x` and `xaᵀ·dy`;
//!   up to 8 rows × 48 columns of `acc` in registers while the rows of `v` stream by.
//! - [`plus_low_rank`]: `dst[o, c] = w0[o, c] + s · Σ_j b[o, j] · a[j, c]` — the merged weight
//!   `W0 + s·B·A` in one pass over `W0` (the copy plus a `k = r` GEMM read and wrote it twice).
//!
//! Both need AVX-512 ([`available`]) and operands whose columns are contiguous; elsewhere
//! callers use the general GEMM. Sums run in a different order than the
//! GEMM's, so results differ by rounding only (tested against an f64 reference).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU runs these kernels (checked once).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Lanes of a vector.
const L: usize = 16;
/// Rows of the small operand handled per pass.
const RG: usize = 8;

/// `out[i·r + j] = scale · Σ_{p<k} v[i·v_rs + p] · w[j·w_rs + p]` for `i < m`, `j < r`
/// (`out` row-major `m × r`). Panics without AVX-512 or if an operand is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dots(
    (m, r, k): (usize, usize, usize),
    v: &[f32],
    v_rs: usize,
    w: &[f32],
    w_rs: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(available(), "dots: the CPU has no AVX-512");
    if m == 0 || r == 0 {
        return;
    }
    assert!(out.len() >= m * r, "dots: out too short");
    assert!(k == 0 || v.len() >= (m - 1) * v_rs + k, "dots: v too short");
    assert!(k == 0 || w.len() >= (r - 1) * w_rs + k, "dots: w too short");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available; the extents of `v`, `w` and `out` are checked above.
    unsafe {
        dots_avx512((m, r, k), v, v_rs, w, w_rs, scale, out)
    };
}

/// `acc[j·acc_rs + c] += scale · Σ_{i<m} u[i·u_rs + j] · v[i·v_rs + c]` for `j < r`,
/// `c < cols`. Panics without AVX-512 or if an operand is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rank_update(
    (m, r, cols): (usize, usize, usize),
    u: &[f32],
    u_rs: usize,
    v: &[f32],
    v_rs: usize,
    scale: f32,
    acc: &mut [f32],
    acc_rs: usize,
) {
    assert!(available(), "rank_update: the CPU has no AVX-512");
    if m == 0 || r == 0 || cols == 0 {
        return;
    }
    assert!(
        acc.len() >= (r - 1) * acc_rs + cols,
        "rank_update: acc too short"
    );
    assert!(u.len() >= (m - 1) * u_rs + r, "rank_update: u too short");
    assert!(v.len() >= (m - 1) * v_rs + cols, "rank_update: v too short");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available; the extents of `u`, `v` and `acc` are checked above.
    unsafe {
        rank_update_avx512((m, r, cols), u, u_rs, v, v_rs, scale, acc, acc_rs)
    };
}

/// `dst[o·inp + c] = w0[o·inp + c] + s · Σ_{j<r} b[o·r + j] · a[j·inp + c]` for `rows` rows:
/// writes every element of `dst` (which may be uninitialised). Panics without AVX-512 or if a
/// slice is too short.
pub(crate) fn plus_low_rank(
    w0: &[f32],
    b: &[f32],
    a: &[f32],
    s: f32,
    (rows, inp, r): (usize, usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(available(), "plus_low_rank: the CPU has no AVX-512");
    assert!(
        w0.len() >= rows * inp && dst.len() >= rows * inp,
        "plus_low_rank: w0 or dst too short"
    );
    assert!(
        b.len() >= rows * r && a.len() >= r * inp,
        "plus_low_rank: a or b too short"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available; the extents are checked above.
    unsafe {
        plus_low_rank_avx512(w0, b, a, s, (rows, inp, r), dst.as_mut_ptr().cast::<f32>())
    };
}

/// # Safety
/// AVX-512F; `w0` and `dst` hold `rows·inp` values, `b` `rows·r`, `a` `r·inp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plus_low_rank_avx512(
    w0: &[f32],
    b: &[f32],
    a: &[f32],
    s: f32,
    (rows, inp, r): (usize, usize, usize),
    dst: *mut f32,
) {
    // SAFETY: every access is at a row start plus c < inp (masked past inp) inside the extents
    // of the contract; `dst` elements are written before they are read (group 0 reads `w0`).
    unsafe {
        for j0 in (0..r.max(1)).step_by(RG) {
            let rj = RG.min(r.saturating_sub(j0));
            for o in 0..rows {
                let mut coef = [_mm512_setzero_ps(); RG];
                for (j, c) in coef.iter_mut().enumerate().take(rj) {
                    *c = _mm512_set1_ps(s * b[o * r + j0 + j]);
                }
                let src = if j0 == 0 {
                    w0.as_ptr().add(o * inp)
                } else {
                    dst.add(o * inp).cast_const()
                };
                let d = dst.add(o * inp);
                let mut c = 0;
                while c < inp {
                    let mk = lanes(inp - c);
                    let mut acc = _mm512_maskz_loadu_ps(mk, src.add(c));
                    for (j, &cj) in coef.iter().enumerate().take(rj) {
                        let av = _mm512_maskz_loadu_ps(mk, a.as_ptr().add((j0 + j) * inp + c));
                        acc = _mm512_fmadd_ps(cj, av, acc);
                    }
                    _mm512_mask_storeu_ps(d.add(c), mk, acc);
                    c += L;
                }
            }
        }
    }
}

/// The mask of the first `n` (≤ 16) lanes.
#[inline(always)]
fn lanes(n: usize) -> u16 {
    if n >= L {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as u16
    }
}

#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(
    (m, r, k): (usize, usize, usize),
    v: &[f32],
    v_rs: usize,
    w: &[f32],
    w_rs: usize,
    scale: f32,
    out: &mut [f32],
) {
    for j0 in (0..r).step_by(RG) {
        let rj = RG.min(r - j0);
        let wj = &w[j0 * w_rs..];
        let mut i = 0;
        while i < m {
            let two = i + 1 < m;
            // SAFETY: rows i (and i + 1 when `two`) of `v`, rows j0.. j0 + rj of `w` and their
            // first k values lie inside the slices (checked by `dots`); out rows likewise.
            unsafe {
                let (o0, o1) = match rj {
                    8 => dots_rows::<8>(k, v, i, two, v_rs, wj, w_rs),
                    7 => dots_rows::<7>(k, v, i, two, v_rs, wj, w_rs),
                    6 => dots_rows::<6>(k, v, i, two, v_rs, wj, w_rs),
                    5 => dots_rows::<5>(k, v, i, two, v_rs, wj, w_rs),
                    4 => dots_rows::<4>(k, v, i, two, v_rs, wj, w_rs),
                    3 => dots_rows::<3>(k, v, i, two, v_rs, wj, w_rs),
                    2 => dots_rows::<2>(k, v, i, two, v_rs, wj, w_rs),
                    _ => dots_rows::<1>(k, v, i, two, v_rs, wj, w_rs),
                };
                for j in 0..rj {
                    out[i * r + j0 + j] = scale * o0[j];
                    if two {
                        out[(i + 1) * r + j0 + j] = scale * o1[j];
                    }
                }
            }
            i += 2;
        }
    }
}

/// Dot products of rows `i` and (when `two`) `i + 1` of `v` with the first `R` rows of `w`.
///
/// # Safety
/// AVX-512F; those rows' first `k` values must lie inside `v` and `w`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots_rows<const R: usize>(
    k: usize,
    v: &[f32],
    i: usize,
    two: bool,
    v_rs: usize,
    w: &[f32],
    w_rs: usize,
) -> ([f32; RG], [f32; RG]) {
    // SAFETY: every access below is at a row start plus p < k (masked past k).
    unsafe {
        let v0 = v.as_ptr().add(i * v_rs);
        // With one row left, the second "row" re-reads the first (its sums are discarded).
        let v1 = if two { v0.add(v_rs) } else { v0 };
        let wp = w.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); R];
        let mut a1 = [_mm512_setzero_ps(); R];
        let mut p = 0;
        while p < k {
            let mk = lanes(k - p);
            let x0 = _mm512_maskz_loadu_ps(mk, v0.add(p));
            let x1 = _mm512_maskz_loadu_ps(mk, v1.add(p));
            for j in 0..R {
                let wv = _mm512_maskz_loadu_ps(mk, wp.add(j * w_rs + p));
                a0[j] = _mm512_fmadd_ps(x0, wv, a0[j]);
                a1[j] = _mm512_fmadd_ps(x1, wv, a1[j]);
            }
            p += L;
        }
        let (mut o0, mut o1) = ([0f32; RG], [0f32; RG]);
        for j in 0..R {
            o0[j] = _mm512_reduce_add_ps(a0[j]);
            o1[j] = _mm512_reduce_add_ps(a1[j]);
        }
        (o0, o1)
    }
}

/// Columns of `acc` per register block (three vectors).
const CB: usize = 3 * L;

#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rank_update_avx512(
    (m, r, cols): (usize, usize, usize),
    u: &[f32],
    u_rs: usize,
    v: &[f32],
    v_rs: usize,
    scale: f32,
    acc: &mut [f32],
    acc_rs: usize,
) {
    for j0 in (0..r).step_by(RG) {
        let rj = RG.min(r - j0);
        for c0 in (0..cols).step_by(CB) {
            let w = CB.min(cols - c0);
            let masks = [
                lanes(w),
                lanes(w.saturating_sub(L)),
                lanes(w.saturating_sub(2 * L)),
            ];
            // SAFETY: rows j0..j0 + rj of `acc` and columns c0..c0 + w (masked) lie inside
            // `acc`; rows 0..m of `u` (columns j0..j0 + rj) and `v` (columns c0..c0 + w) inside
            // theirs (checked by `rank_update`).
            unsafe {
                let (u, a) = (&u[j0..], acc.as_mut_ptr().add(j0 * acc_rs + c0));
                let v = &v[c0..];
                match rj {
                    8 => update_block::<8>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    7 => update_block::<7>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    6 => update_block::<6>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    5 => update_block::<5>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    4 => update_block::<4>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    3 => update_block::<3>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    2 => update_block::<2>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                    _ => update_block::<1>(m, u, u_rs, v, v_rs, masks, scale, a, acc_rs),
                }
            }
        }
    }
}

/// `R` rows × up to 48 columns of `acc` (`masks` select the columns) updated over all `m`
/// rows of `u` (its first `R` columns) and `v` (its first 48 columns, masked).
///
/// # Safety
/// AVX-512F; `u[i·u_rs + j]` for `i < m`, `j < R`, `v[i·v_rs + c]` for the masked columns and
/// `acc[j·acc_rs + c]` for `j < R` and the masked columns must be in bounds.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn update_block<const R: usize>(
    m: usize,
    u: &[f32],
    u_rs: usize,
    v: &[f32],
    v_rs: usize,
    masks: [u16; 3],
    scale: f32,
    acc: *mut f32,
    acc_rs: usize,
) {
    // SAFETY: forwarded from the contract above.
    unsafe {
        let (up, vp) = (u.as_ptr(), v.as_ptr());
        let mut t = [[_mm512_setzero_ps(); 3]; R];
        for i in 0..m {
            let vr = vp.add(i * v_rs);
            let x0 = _mm512_maskz_loadu_ps(masks[0], vr);
            let x1 = _mm512_maskz_loadu_ps(masks[1], vr.add(L));
            let x2 = _mm512_maskz_loadu_ps(masks[2], vr.add(2 * L));
            for (j, tj) in t.iter_mut().enumerate() {
                let uj = _mm512_set1_ps(*up.add(i * u_rs + j));
                tj[0] = _mm512_fmadd_ps(uj, x0, tj[0]);
                tj[1] = _mm512_fmadd_ps(uj, x1, tj[1]);
                tj[2] = _mm512_fmadd_ps(uj, x2, tj[2]);
            }
        }
        let s = _mm512_set1_ps(scale);
        for (j, tj) in t.iter().enumerate() {
            for (q, &tq) in tj.iter().enumerate() {
                let d = acc.add(j * acc_rs + q * L);
                let old = _mm512_maskz_loadu_ps(masks[q], d);
                _mm512_mask_storeu_ps(d, masks[q], _mm512_fmadd_ps(tq, s, old));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    fn close(got: f32, want: f64, terms: usize) -> bool {
        (got as f64 - want).abs() <= 1e-6 * (terms as f64).sqrt() * (1.0 + want.abs())
    }

    /// Odd sizes cover every rank group (1–8 and 8 + rest), an odd row count, lane tails of
    /// `k` and padded row strides; within f32 rounding of an f64 reference.
    #[test]
    fn dots_match_the_definition() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(m, r, k) in &[
            (7, 8, 768),
            (5, 3, 37),
            (4, 13, 16),
            (1, 1, 1),
            (3, 16, 100),
        ] {
            let (v_rs, w_rs) = (k + 5, k + 2);
            let (v, w) = (values(m * v_rs, 1), values(r * w_rs, 2));
            let mut out = vec![f32::NAN; m * r];
            dots((m, r, k), &v, v_rs, &w, w_rs, 0.5, &mut out);
            for i in 0..m {
                for j in 0..r {
                    let want: f64 = (0..k)
                        .map(|p| v[i * v_rs + p] as f64 * w[j * w_rs + p] as f64)
                        .sum::<f64>()
                        * 0.5;
                    assert!(close(out[i * r + j], want, k), "({i},{j}) m{m} r{r} k{k}");
                }
            }
        }
    }

    /// `W0 + s·B·A` row by row over two rank groups (r = 11), a lane tail (37 columns) and
    /// r = 0 (a copy), every element written, within f32 rounding of an f64 reference.
    #[test]
    fn plus_low_rank_matches_the_definition() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(rows, inp, r) in &[(5, 37, 11), (3, 64, 8), (2, 20, 0)] {
            let (w0, b, a) = (
                values(rows * inp, 6),
                values(rows * r, 7),
                values(r * inp, 8),
            );
            let mut dst = vec![std::mem::MaybeUninit::new(f32::NAN); rows * inp];
            plus_low_rank(&w0, &b, &a, 0.25, (rows, inp, r), &mut dst);
            for o in 0..rows {
                for c in 0..inp {
                    // SAFETY: initialised with NaN above, overwritten by the kernel.
                    let got = unsafe { dst[o * inp + c].assume_init() };
                    let want = w0[o * inp + c] as f64
                        + 0.25
                            * (0..r)
                                .map(|j| b[o * r + j] as f64 * a[j * inp + c] as f64)
                                .sum::<f64>();
                    assert!(close(got, want, r + 1), "({o},{c}) r{r}: {got} vs {want}");
                }
            }
        }
    }

    /// Every rank group, column tails inside each of the three vectors, accumulation onto
    /// existing values with a padded stride (padding untouched).
    #[test]
    fn rank_update_matches_the_definition() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(m, r, cols) in &[
            (128, 8, 768),
            (9, 3, 37),
            (5, 11, 20),
            (1, 1, 1),
            (6, 16, 97),
        ] {
            let (u_rs, v_rs, acc_rs) = (r + 1, cols + 3, cols + 4);
            let (u, v) = (values(m * u_rs, 3), values(m * v_rs, 4));
            let acc0 = values(r * acc_rs, 5);
            let mut acc = acc0.clone();
            rank_update((m, r, cols), &u, u_rs, &v, v_rs, -2.0, &mut acc, acc_rs);
            for j in 0..r {
                for c in 0..acc_rs {
                    let got = acc[j * acc_rs + c];
                    if c >= cols {
                        assert_eq!(got, acc0[j * acc_rs + c], "padding written");
                        continue;
                    }
                    let want = acc0[j * acc_rs + c] as f64
                        - 2.0
                            * (0..m)
                                .map(|i| u[i * u_rs + j] as f64 * v[i * v_rs + c] as f64)
                                .sum::<f64>();
                    assert!(close(got, want, m), "({j},{c}) m{m} r{r} cols{cols}");
                }
            }
        }
    }
}
