//! An AVX-512 kernel for the small products inside attention.
//!
//! Why: the fused Llama step's attention runs, per head and query block, small products
//! (`Q·Kᵀ`, `P·V`, and in the backward `dO·Vᵀ`, `Pᵀ·dO`, `dS·K`, `dSᵀ·Q`; 64 × 64 × 64 to
//! 64 × 128 × 64 with the 64-row blocks it used). Through the `gemm` crate each call packs its
//! operands and dispatches for a product of a few hundred thousand FLOPs: the attention of the
//! benchmark Llama took ~10 % of its training step at ~80 GFLOPS, against ~270 for the step's
//! large GEMMs.
//!
//! [`tile_mm_to`]: `c[i, j] (+)= scale · Σ_p a[i·a_rs + p·a_cs] · y[p·y_rs + j]`. The output's
//! columns run along the 16-lane vectors, `a` is read one broadcast value at a time through
//! any strides (so `Pᵀ` and `dSᵀ` need no transposed copy), and a tile of up to 6 rows × 64
//! columns of `c` stays in 24 registers while `p` runs over the whole depth; column tails are
//! masked. A product `X·Yᵀ` is `tile_mm_to` with `y = Yᵀ` (a transposed copy of a 64-wide head
//! is cheap next to the product).
//!
//! Saved: attention forward + backward of one benchmark layer (batch 8 × 128 tokens, 8 heads of
//! 64, 2 threads) takes 0.86× the time it takes through the gemm crate with the rest of the code
//! the same (about 4.7 → 4.0 ms; median of 8 alternating rounds of 60), part of it from the
//! thinner query blocks the tiles afford (`QBLOCK_TILES` in the fused step). In a profile of the
//! whole step the kernel is ~5 %.
//!
//! Needs AVX-512 ([`super::skinny::available`]); callers use the general GEMM elsewhere. Sums
//! run over `p` in order, one product at a time, so results differ from the GEMM's by rounding
//! only (tested against an f64 reference).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `c` per register tile.
const RB: usize = 6;
/// 16-lane vectors of `c` per register tile (64 columns).
const CV: usize = 4;

/// `c[i·c_rs + j] = (acc ? c[i·c_rs + j] : 0) + scale · Σ_{p<k} a[i·a_rs + p·a_cs] · y[p·y_rs + j]`
/// for `i < m`, `j < n`, into an output given by its first element and row stride (callers'
/// threads write disjoint blocks of one buffer). Panics without AVX-512 or if `a` or `y` is
/// too short.
///
/// # Safety
/// `c` must be valid for writes (and, when `acc`, reads of initialised values) of rows
/// `0..m` × columns `0..n` at row stride `c_rs ≥ n`, with nothing else accessing them during
/// the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_mm_to(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    y: &[f32],
    y_rs: usize,
    scale: f32,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
) {
    assert!(
        super::skinny::available(),
        "tile_mm: the CPU has no AVX-512"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                // SAFETY: row i's n elements are the caller's block.
                unsafe { std::ptr::write_bytes(c.add(i * c_rs), 0, n) };
            }
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "tile_mm: a too short"
    );
    assert!(y.len() >= (k - 1) * y_rs + n, "tile_mm: y too short");
    #[cfg(target_arch = "x86_64")]
    {
        let ops = Ops {
            k,
            a: a.as_ptr(),
            a_rs,
            a_cs,
            y: y.as_ptr(),
            y_rs,
            c,
            c_rs,
            scale,
            acc,
        };
        // SAFETY: AVX-512F is available; `a` and `y` are checked above, `c` is the caller's.
        unsafe { tile_mm_avx512(&ops, m, n) };
    }
}

/// The `m × n` output of `ops` tile by tile.
///
/// # Safety
/// AVX-512F; the extents checked by [`tile_mm_to`] and its contract on `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_mm_avx512(ops: &Ops, m: usize, n: usize) {
    for j0 in (0..n).step_by(16 * CV) {
        let nj = (n - j0).min(16 * CV);
        let mut masks = [0u16; CV];
        for (v, mk) in masks.iter_mut().enumerate() {
            let lanes = nj.saturating_sub(16 * v).min(16);
            *mk = ((1u32 << lanes) - 1) as u16;
        }
        let nv = nj.div_ceil(16);
        for i0 in (0..m).step_by(RB) {
            let rows = (m - i0).min(RB);
            // SAFETY: rows i0..i0 + rows < m and columns j0..j0 + nj ≤ n (lanes past nj
            // masked) lie inside the checked extents.
            unsafe {
                macro_rules! dispatch {
                    ($($r:literal),*) => {
                        match (rows, nv) {
                            $(
                                ($r, 1) => tile::<$r, 1>(ops, i0, j0, &masks),
                                ($r, 2) => tile::<$r, 2>(ops, i0, j0, &masks),
                                ($r, 3) => tile::<$r, 3>(ops, i0, j0, &masks),
                                ($r, _) => tile::<$r, 4>(ops, i0, j0, &masks),
                            )*
                            _ => unreachable!("rows per tile are 1..=6"),
                        }
                    };
                }
                dispatch!(1, 2, 3, 4, 5, 6);
            }
        }
    }
}

/// `out[c·rows + j] = x[j·x_rs + c]` for `j < rows`, `c < cols`: a `rows × cols` block of
/// row-major `x` transposed into `out` (`cols × rows`), the right operand `Yᵀ` of a product
/// `X·Yᵀ` for [`tile_mm_to`]. Reads 16 rows at a time with one gather per column (a scalar
/// loop stores to a new cache line per element). Panics without AVX-512 or if `x` or `out`
/// is too short.
pub(crate) fn transpose(x: &[f32], x_rs: usize, (rows, cols): (usize, usize), out: &mut [f32]) {
    assert!(
        super::skinny::available(),
        "transpose: the CPU has no AVX-512"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(out.len() >= rows * cols, "transpose: out too short");
    assert!(
        x.len() >= (rows - 1) * x_rs + cols,
        "transpose: x too short"
    );
    assert!(
        i32::try_from(15 * x_rs).is_ok(),
        "transpose: row stride too large"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is available; the extents are checked above.
    unsafe {
        transpose_avx512(x, x_rs, (rows, cols), out)
    };
}

/// # Safety
/// AVX-512F; the extents checked by [`transpose`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(x: &[f32], x_rs: usize, (rows, cols): (usize, usize), out: &mut [f32]) {
    let rs = x_rs as i32;
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(rs),
    );
    for j0 in (0..rows).step_by(16) {
        let lanes = (rows - j0).min(16);
        let mask = ((1u32 << lanes) - 1) as u16;
        for c in 0..cols {
            // SAFETY: lanes j0..j0 + lanes < rows read x[j·x_rs + c] and write out[c·rows + j],
            // inside the checked extents; masked lanes touch no memory.
            unsafe {
                let base = x.as_ptr().add(j0 * x_rs + c);
                let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, base);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(c * rows + j0), mask, v);
            }
        }
    }
}

/// The operands of one [`tile_mm_to`] call as raw pointers.
#[cfg(target_arch = "x86_64")]
struct Ops {
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    y: *const f32,
    y_rs: usize,
    c: *mut f32,
    c_rs: usize,
    scale: f32,
    acc: bool,
}

/// One `R`-row × `V`-vector tile of `c` at `(i0, j0)`: `R·V` accumulators in registers over
/// the whole depth, then scaled (and added to `c`) in one masked store per vector.
///
/// # Safety
/// AVX-512F; the tile's rows and (masked) columns lie inside the operands' extents.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const V: usize>(o: &Ops, i0: usize, j0: usize, masks: &[u16; CV]) {
    // SAFETY: the caller's contract; every load and store below is masked to the tile.
    unsafe {
        let mut accs = [[_mm512_setzero_ps(); V]; R];
        let a0 = o.a.add(i0 * o.a_rs);
        let y0 = o.y.add(j0);
        for p in 0..o.k {
            let yrow = y0.add(p * o.y_rs);
            let mut yv = [_mm512_setzero_ps(); V];
            for (v, yv) in yv.iter_mut().enumerate() {
                *yv = _mm512_maskz_loadu_ps(masks[v], yrow.add(16 * v));
            }
            let ap = a0.add(p * o.a_cs);
            for (r, acc) in accs.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r * o.a_rs));
                for v in 0..V {
                    acc[v] = _mm512_fmadd_ps(av, yv[v], acc[v]);
                }
            }
        }
        let s = _mm512_set1_ps(o.scale);
        for (r, acc) in accs.iter().enumerate() {
            let crow = o.c.add((i0 + r) * o.c_rs + j0);
            for v in 0..V {
                let dst = crow.add(16 * v);
                let out = if o.acc {
                    _mm512_fmadd_ps(acc[v], s, _mm512_maskz_loadu_ps(masks[v], dst))
                } else {
                    _mm512_mul_ps(acc[v], s)
                };
                _mm512_mask_storeu_ps(dst, masks[v], out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    /// Row counts with and without a 16-row tail, a padded row stride: exact.
    #[test]
    fn transpose_matches_the_definition() {
        if !super::super::skinny::available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(rows, cols, x_rs) in &[(128, 64, 512), (77, 32, 40), (1, 5, 5), (16, 16, 16)] {
            let x = values((rows - 1) * x_rs + cols, 4);
            let mut out = vec![f32::NAN; rows * cols + 3];
            transpose(&x, x_rs, (rows, cols), &mut out);
            for j in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + j], x[j * x_rs + c], "at {j},{c}");
                }
            }
            assert!(
                out[rows * cols..].iter().all(|v| v.is_nan()),
                "wrote past the block"
            );
        }
    }

    /// Every tile shape (row counts 1–6 and a rest, 1–4 vectors, lane tails), transposed and
    /// padded strides for `a`, padded rows of `y` and `c`, overwrite and accumulate, `k` of 1
    /// and 0: within f32 rounding of an f64 reference, and `c` untouched outside its block.
    #[test]
    fn tile_mm_matches_the_definition() {
        if !super::super::skinny::available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (64, 64, 64),
            (64, 128, 64),
            (13, 37, 29),
            (7, 16, 1),
            (1, 1, 5),
            (6, 200, 3),
            (5, 64, 0),
        ] {
            for transposed in [false, true] {
                for acc in [false, true] {
                    let (a_rs, a_cs) = if transposed { (1, m + 3) } else { (k + 2, 1) };
                    let (y_rs, c_rs) = (n + 5, n + 7);
                    let a = values(m * (k + 3) + k * (m + 3) + 1, 1);
                    let y = values(k.max(1) * y_rs, 2);
                    let c0 = values(m * c_rs, 3);
                    let mut c = c0.clone();
                    let scale = 0.37;
                    // SAFETY: `c` holds the m×n block at row stride `c_rs` and is borrowed
                    // mutably for the call.
                    unsafe {
                        tile_mm_to(
                            (m, n, k),
                            &a,
                            (a_rs, a_cs),
                            &y,
                            y_rs,
                            scale,
                            c.as_mut_ptr(),
                            c_rs,
                            acc,
                        )
                    };
                    for i in 0..m {
                        for j in 0..c_rs {
                            let got = c[i * c_rs + j];
                            if j >= n {
                                assert_eq!(got, c0[i * c_rs + j], "outside the block at {i},{j}");
                                continue;
                            }
                            let dot: f64 = (0..k)
                                .map(|p| a[i * a_rs + p * a_cs] as f64 * y[p * y_rs + j] as f64)
                                .sum();
                            let base = if acc { c0[i * c_rs + j] as f64 } else { 0.0 };
                            let want = base + scale as f64 * dot;
                            let tol = 1e-6 * (k.max(1) as f64).sqrt() * (1.0 + want.abs());
                            assert!(
                                (got as f64 - want).abs() <= tol,
                                "{m}x{n}x{k} transposed={transposed} acc={acc} at {i},{j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
