//! Kernels for the LoRA backward's skinny products (one side of size `r`, the rank), one body
//! each, generic over [`pulp::Simd`] and run on the chosen [`Isa`] (AVX-512, AVX2+FMA or the
//! portable path; see [`super::isa`]).
//!
//! Why: with `r` = 8 the `gemm` crate runs these at ~27 GFLOPS on one thread (measured on
//! AVX-512, rows 256 × 768 × 8): it packs the tall operand on every call and fills half of each
//! 16-lane vector. A profile of the seed-shape LoRA layer step put 5.4 % of it in that kernel.
//! The products only need one pass over the tall operand while `r` rows of the small one sit in
//! L1:
//!
//! - [`dots`]: `out[i, j] = scale · Σ_p v[i, p] · w[j, p]` — `x·Aᵀ` and `dy·B` (with `Bᵀ`);
//!   two rows of `v` at a time against a group of rows of `w` (8 with 32 vector registers, 6
//!   with 16), one vector of lanes per step.
//! - [`rank_update`]: `acc[j, c] += scale · Σ_i u[i, j] · v[i, c]` — `gᵀ·x` and `xaᵀ·dy`;
//!   a group of rows (8, or 4 with 16 registers) × 3 vectors of `acc` in registers while the
//!   rows of `v` stream by.
//! - [`plus_low_rank`]: `dst[o, c] = w0[o, c] + s · Σ_j b[o, j] · a[j, c]` — the merged weight
//!   `W0 + s·B·A` in one pass over `W0` (the copy plus a `k = r` GEMM read and wrote it twice).
//!
//! Operands' columns must be contiguous (rows may be padded). Sums run in a different order
//! than the GEMM's, so results differ by rounding only (tested against an f64 reference on
//! every target the CPU runs).

use pulp::{Simd, WithSimd};

use super::isa::{dispatch, Isa};

/// Most rows of the small operand handled per pass.
const RG: usize = 8;

/// `a·b + c`: one FMA on the x86 targets; a product and a sum on the portable one, whose
/// token (`pulp::Scalar128b`, the only 4-lane token [`dispatch`] uses) implements `mul_add` as
/// a per-lane `fmaf` call, a libm call without hardware FMA (10× slower, measured).
#[inline(always)]
pub(super) fn madd<S: Simd>(simd: S, a: S::f32s, b: S::f32s, c: S::f32s) -> S::f32s {
    if S::F32_LANES == 4 {
        simd.add_f32s(simd.mul_f32s(a, b), c)
    } else {
        simd.mul_add_e_f32s(a, b, c)
    }
}

/// `n.min(lanes)` values at `p` as a vector, the rest 0.
///
/// # Safety
/// `p..p + n.min(S::F32_LANES)` must be readable.
#[inline(always)]
pub(super) unsafe fn load<S: Simd>(simd: S, p: *const f32, n: usize) -> S::f32s {
    // SAFETY: the caller's contract; a masked load touches only the enabled lanes.
    unsafe {
        if n >= S::F32_LANES {
            p.cast::<S::f32s>().read_unaligned()
        } else {
            simd.mask_load_ptr_f32s(simd.mask_between_m32s(0, n as u32), p)
        }
    }
}

/// Stores the first `n.min(lanes)` values of `x` at `p`.
///
/// # Safety
/// `p..p + n.min(S::F32_LANES)` must be writable.
#[inline(always)]
pub(super) unsafe fn store<S: Simd>(simd: S, p: *mut f32, n: usize, x: S::f32s) {
    // SAFETY: the caller's contract; a masked store touches only the enabled lanes.
    unsafe {
        if n >= S::F32_LANES {
            p.cast::<S::f32s>().write_unaligned(x)
        } else {
            simd.mask_store_ptr_f32s(simd.mask_between_m32s(0, n as u32), p, x)
        }
    }
}

/// `out[i·r + j] = scale · Σ_{p<k} v[i·v_rs + p] · w[j·w_rs + p]` for `i < m`, `j < r`
/// (`out` row-major `m × r`), on `isa`. Panics if an operand is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dots(
    isa: Isa,
    (m, r, k): (usize, usize, usize),
    v: &[f32],
    v_rs: usize,
    w: &[f32],
    w_rs: usize,
    scale: f32,
    out: &mut [f32],
) {
    if m == 0 || r == 0 {
        return;
    }
    assert!(out.len() >= m * r, "dots: out too short");
    assert!(k == 0 || v.len() >= (m - 1) * v_rs + k, "dots: v too short");
    assert!(k == 0 || w.len() >= (r - 1) * w_rs + k, "dots: w too short");
    struct Op<'a> {
        mrk: (usize, usize, usize),
        v: &'a [f32],
        v_rs: usize,
        w: &'a [f32],
        w_rs: usize,
        scale: f32,
        out: &'a mut [f32],
    }
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let Op {
                mrk: (m, r, k),
                v,
                v_rs,
                w,
                w_rs,
                scale,
                out,
            } = self;
            let group = if S::REGISTER_COUNT >= 32 { 8 } else { 6 };
            for j0 in (0..r).step_by(group) {
                let rj = group.min(r - j0);
                let wj = &w[j0 * w_rs..];
                let mut i = 0;
                while i < m {
                    let two = i + 1 < m;
                    // SAFETY: rows i (and i + 1 when `two`) of `v`, rows j0..j0 + rj of `w`
                    // and their first k values lie inside the slices (checked by `dots`).
                    let (o0, o1) = unsafe {
                        match rj {
                            8 => dots_rows::<S, 8>(simd, k, v, i, two, v_rs, wj, w_rs),
                            7 => dots_rows::<S, 7>(simd, k, v, i, two, v_rs, wj, w_rs),
                            6 => dots_rows::<S, 6>(simd, k, v, i, two, v_rs, wj, w_rs),
                            5 => dots_rows::<S, 5>(simd, k, v, i, two, v_rs, wj, w_rs),
                            4 => dots_rows::<S, 4>(simd, k, v, i, two, v_rs, wj, w_rs),
                            3 => dots_rows::<S, 3>(simd, k, v, i, two, v_rs, wj, w_rs),
                            2 => dots_rows::<S, 2>(simd, k, v, i, two, v_rs, wj, w_rs),
                            _ => dots_rows::<S, 1>(simd, k, v, i, two, v_rs, wj, w_rs),
                        }
                    };
                    for j in 0..rj {
                        out[i * r + j0 + j] = scale * o0[j];
                        if two {
                            out[(i + 1) * r + j0 + j] = scale * o1[j];
                        }
                    }
                    i += 2;
                }
            }
        }
    }
    let mrk = (m, r, k);
    dispatch(
        isa,
        Op {
            mrk,
            v,
            v_rs,
            w,
            w_rs,
            scale,
            out,
        },
    );
}

/// Dot products of rows `i` and (when `two`) `i + 1` of `v` with the first `R` rows of `w`.
///
/// # Safety
/// Those rows' first `k` values must lie inside `v` and `w`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn dots_rows<S: Simd, const R: usize>(
    simd: S,
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
        let zero = simd.splat_f32s(0.0);
        let mut a0 = [zero; R];
        let mut a1 = [zero; R];
        let mut p = 0;
        while p < k {
            let n = k - p;
            let x0 = load(simd, v0.add(p), n);
            let x1 = load(simd, v1.add(p), n);
            for j in 0..R {
                let wv = load(simd, wp.add(j * w_rs + p), n);
                a0[j] = madd(simd, x0, wv, a0[j]);
                a1[j] = madd(simd, x1, wv, a1[j]);
            }
            p += S::F32_LANES;
        }
        let (mut o0, mut o1) = ([0f32; RG], [0f32; RG]);
        for j in 0..R {
            o0[j] = simd.reduce_sum_f32s(a0[j]);
            o1[j] = simd.reduce_sum_f32s(a1[j]);
        }
        (o0, o1)
    }
}

/// `acc[j·acc_rs + c] += scale · Σ_{i<m} u[i·u_rs + j] · v[i·v_rs + c]` for `j < r`,
/// `c < cols`, on `isa`. Panics if an operand is too short.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rank_update(
    isa: Isa,
    (m, r, cols): (usize, usize, usize),
    u: &[f32],
    u_rs: usize,
    v: &[f32],
    v_rs: usize,
    scale: f32,
    acc: &mut [f32],
    acc_rs: usize,
) {
    if m == 0 || r == 0 || cols == 0 {
        return;
    }
    assert!(
        acc.len() >= (r - 1) * acc_rs + cols,
        "rank_update: acc too short"
    );
    assert!(u.len() >= (m - 1) * u_rs + r, "rank_update: u too short");
    assert!(v.len() >= (m - 1) * v_rs + cols, "rank_update: v too short");
    struct Op<'a> {
        mrc: (usize, usize, usize),
        u: &'a [f32],
        u_rs: usize,
        v: &'a [f32],
        v_rs: usize,
        scale: f32,
        acc: &'a mut [f32],
        acc_rs: usize,
    }
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let Op {
                mrc: (m, r, cols),
                u,
                u_rs,
                v,
                v_rs,
                scale,
                acc,
                acc_rs,
            } = self;
            let group = if S::REGISTER_COUNT >= 32 { 8 } else { 4 };
            let cb = 3 * S::F32_LANES;
            for j0 in (0..r).step_by(group) {
                let rj = group.min(r - j0);
                for c0 in (0..cols).step_by(cb) {
                    let w = cb.min(cols - c0);
                    // SAFETY: rows j0..j0 + rj of `acc` and columns c0..c0 + w (masked) lie
                    // inside `acc`; rows 0..m of `u` (columns j0..j0 + rj) and `v` (columns
                    // c0..c0 + w) inside theirs (checked by `rank_update`).
                    unsafe {
                        let (u, a) = (&u[j0..], acc.as_mut_ptr().add(j0 * acc_rs + c0));
                        let v = &v[c0..];
                        let b = Block {
                            m,
                            u,
                            u_rs,
                            v,
                            v_rs,
                            w,
                            scale,
                            acc: a,
                            acc_rs,
                        };
                        match rj {
                            8 => update_block::<S, 8>(simd, &b),
                            7 => update_block::<S, 7>(simd, &b),
                            6 => update_block::<S, 6>(simd, &b),
                            5 => update_block::<S, 5>(simd, &b),
                            4 => update_block::<S, 4>(simd, &b),
                            3 => update_block::<S, 3>(simd, &b),
                            2 => update_block::<S, 2>(simd, &b),
                            _ => update_block::<S, 1>(simd, &b),
                        }
                    }
                }
            }
        }
    }
    let mrc = (m, r, cols);
    dispatch(
        isa,
        Op {
            mrc,
            u,
            u_rs,
            v,
            v_rs,
            scale,
            acc,
            acc_rs,
        },
    );
}

/// One register block of [`rank_update`]: `R` rows × the first `w` (≤ 3 vectors) columns.
struct Block<'a> {
    m: usize,
    u: &'a [f32],
    u_rs: usize,
    v: &'a [f32],
    v_rs: usize,
    w: usize,
    scale: f32,
    acc: *mut f32,
    acc_rs: usize,
}

/// `R` rows × up to 3 vectors of columns of `acc` updated over all `m` rows of `u` (its first
/// `R` columns) and `v` (its first `w` columns).
///
/// # Safety
/// `u[i·u_rs + j]` for `i < m`, `j < R`, `v[i·v_rs + c]` and `acc[j·acc_rs + c]` for `c < w`,
/// `j < R` must be in bounds.
#[inline(always)]
unsafe fn update_block<S: Simd, const R: usize>(simd: S, b: &Block) {
    let l = S::F32_LANES;
    let n = [b.w, b.w.saturating_sub(l), b.w.saturating_sub(2 * l)];
    // SAFETY: forwarded from the contract above; loads and stores are masked to `w` columns.
    unsafe {
        let (up, vp) = (b.u.as_ptr(), b.v.as_ptr());
        let zero = simd.splat_f32s(0.0);
        let mut t = [[zero; 3]; R];
        for i in 0..b.m {
            let vr = vp.add(i * b.v_rs);
            let x0 = load(simd, vr, n[0]);
            let x1 = if n[1] > 0 {
                load(simd, vr.add(l), n[1])
            } else {
                zero
            };
            let x2 = if n[2] > 0 {
                load(simd, vr.add(2 * l), n[2])
            } else {
                zero
            };
            for (j, tj) in t.iter_mut().enumerate() {
                let uj = simd.splat_f32s(*up.add(i * b.u_rs + j));
                tj[0] = madd(simd, uj, x0, tj[0]);
                tj[1] = madd(simd, uj, x1, tj[1]);
                tj[2] = madd(simd, uj, x2, tj[2]);
            }
        }
        let s = simd.splat_f32s(b.scale);
        for (j, tj) in t.iter().enumerate() {
            for (q, &tq) in tj.iter().enumerate() {
                if n[q] == 0 {
                    continue;
                }
                let d = b.acc.add(j * b.acc_rs + q * l);
                let old = load(simd, d, n[q]);
                store(simd, d, n[q], madd(simd, tq, s, old));
            }
        }
    }
}

/// `dst[o·inp + c] = w0[o·inp + c] + s · Σ_{j<r} b[o·r + j] · a[j·inp + c]` for `rows` rows,
/// on `isa`: writes every element of `dst` (which may be uninitialised). Panics if a slice is
/// too short.
pub(crate) fn plus_low_rank(
    isa: Isa,
    w0: &[f32],
    b: &[f32],
    a: &[f32],
    s: f32,
    (rows, inp, r): (usize, usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(
        w0.len() >= rows * inp && dst.len() >= rows * inp,
        "plus_low_rank: w0 or dst too short"
    );
    assert!(
        b.len() >= rows * r && a.len() >= r * inp,
        "plus_low_rank: a or b too short"
    );
    struct Op<'a> {
        w0: &'a [f32],
        b: &'a [f32],
        a: &'a [f32],
        s: f32,
        dims: (usize, usize, usize),
        dst: *mut f32,
    }
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let Op {
                w0,
                b,
                a,
                s,
                dims: (rows, inp, r),
                dst,
            } = self;
            // SAFETY: every access is at a row start plus c < inp (masked past inp) inside the
            // extents checked by `plus_low_rank`; `dst` elements are written before they are
            // read (group 0 reads `w0`).
            unsafe {
                for j0 in (0..r.max(1)).step_by(RG) {
                    let rj = RG.min(r.saturating_sub(j0));
                    for o in 0..rows {
                        let mut coef = [simd.splat_f32s(0.0); RG];
                        for (j, c) in coef.iter_mut().enumerate().take(rj) {
                            *c = simd.splat_f32s(s * b[o * r + j0 + j]);
                        }
                        let src = if j0 == 0 {
                            w0.as_ptr().add(o * inp)
                        } else {
                            dst.add(o * inp).cast_const()
                        };
                        let d = dst.add(o * inp);
                        let mut c = 0;
                        while c < inp {
                            let n = inp - c;
                            let mut acc = load(simd, src.add(c), n);
                            for (j, &cj) in coef.iter().enumerate().take(rj) {
                                let av = load(simd, a.as_ptr().add((j0 + j) * inp + c), n);
                                acc = madd(simd, cj, av, acc);
                            }
                            store(simd, d.add(c), n, acc);
                            c += S::F32_LANES;
                        }
                    }
                }
            }
        }
    }
    let dims = (rows, inp, r);
    let dst = dst.as_mut_ptr().cast::<f32>();
    dispatch(
        isa,
        Op {
            w0,
            b,
            a,
            s,
            dims,
            dst,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;
    use crate::ops::testing::values;

    fn close(got: f32, want: f64, terms: usize) -> bool {
        (got as f64 - want).abs() <= 1e-6 * (terms as f64).sqrt() * (1.0 + want.abs())
    }

    /// Odd sizes cover every rank group (1–8 and 8 + rest), an odd row count, lane tails of
    /// `k` and padded row strides; within f32 rounding of an f64 reference.
    #[test]
    fn dots_match_the_definition() {
        for isa in Isa::supported() {
            dots_case(isa);
        }
    }

    fn dots_case(isa: Isa) {
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
            dots(isa, (m, r, k), &v, v_rs, &w, w_rs, 0.5, &mut out);
            for i in 0..m {
                for j in 0..r {
                    let want: f64 = (0..k)
                        .map(|p| v[i * v_rs + p] as f64 * w[j * w_rs + p] as f64)
                        .sum::<f64>()
                        * 0.5;
                    assert!(
                        close(out[i * r + j], want, k),
                        "{isa} ({i},{j}) m{m} r{r} k{k}"
                    );
                }
            }
        }
    }

    /// `W0 + s·B·A` row by row over two rank groups (r = 11), a lane tail (37 columns) and
    /// r = 0 (a copy), every element written, within f32 rounding of an f64 reference.
    #[test]
    fn plus_low_rank_matches_the_definition() {
        for isa in Isa::supported() {
            plus_low_rank_case(isa);
        }
    }

    fn plus_low_rank_case(isa: Isa) {
        for &(rows, inp, r) in &[(5, 37, 11), (3, 64, 8), (2, 20, 0)] {
            let (w0, b, a) = (
                values(rows * inp, 6),
                values(rows * r, 7),
                values(r * inp, 8),
            );
            let mut dst = vec![std::mem::MaybeUninit::new(f32::NAN); rows * inp];
            plus_low_rank(isa, &w0, &b, &a, 0.25, (rows, inp, r), &mut dst);
            for o in 0..rows {
                for c in 0..inp {
                    // SAFETY: initialised with NaN above, overwritten by the kernel.
                    let got = unsafe { dst[o * inp + c].assume_init() };
                    let want = w0[o * inp + c] as f64
                        + 0.25
                            * (0..r)
                                .map(|j| b[o * r + j] as f64 * a[j * inp + c] as f64)
                                .sum::<f64>();
                    assert!(
                        close(got, want, r + 1),
                        "{isa} ({o},{c}) r{r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Every rank group, column tails inside each of the three vectors, accumulation onto
    /// existing values with a padded stride (padding untouched).
    #[test]
    fn rank_update_matches_the_definition() {
        for isa in Isa::supported() {
            rank_update_case(isa);
        }
    }

    fn rank_update_case(isa: Isa) {
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
            rank_update(
                isa,
                (m, r, cols),
                &u,
                u_rs,
                &v,
                v_rs,
                -2.0,
                &mut acc,
                acc_rs,
            );
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
                    assert!(close(got, want, m), "{isa} ({j},{c}) m{m} r{r} cols{cols}");
                }
            }
        }
    }
}
