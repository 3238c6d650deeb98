//! A register-tiled kernel for the small products inside attention, one body generic over
//! [`pulp::Simd`], run on the chosen [`Isa`] (see [`super::isa`]).
//!
//! Why: the training engine's attention runs, per head and query block, small products
//! (`Q·Kᵀ`, `P·V`, and in the backward `dO·Vᵀ`, `Pᵀ·dO`, `dS·K`, `dSᵀ·Q`; 64 × 64 × 64 to
//! 64 × 128 × 64 with the 64-row blocks it used). Through the `gemm` crate each call packs its
//! operands and dispatches for a product of a few hundred thousand FLOPs: the attention of the
//! benchmark Llama took ~10 % of its training step at ~80 GFLOPS, against ~270 for the step's
//! large GEMMs.
//!
//! [`tile_mm_to`]: `c[i, j] (+)= scale · Σ_p a[i·a_rs + p·a_cs] · y[p·y_rs + j]`. The output's
//! columns run along the vectors, `a` is read one broadcast value at a time through any
//! strides (so `Pᵀ` and `dSᵀ` need no transposed copy), and a tile of `c` stays in registers
//! while `p` runs over the whole depth: 6 rows × 4 vectors (24 of AVX-512's 32 registers, 64
//! columns) or, with 16 registers (AVX2, portable), 4 rows × 3 vectors; column tails are
//! masked. A product `X·Yᵀ` is `tile_mm_to` with `y = Yᵀ` ([`transpose`]; a transposed copy
//! of a 64-wide head is cheap next to the product).
//!
//! Saved (AVX-512): attention forward + backward of one benchmark layer (batch 8 × 128 tokens,
//! 8 heads of 64, 2 threads) takes 0.86× the time it takes through the gemm crate with the
//! rest of the code the same (about 4.7 → 4.0 ms; median of 8 alternating rounds of 60), part
//! of it from the thinner query blocks the tiles afford (`attention::QBLOCK`). In
//! a profile of the whole step the kernel is ~5 %.
//!
//! Sums run over `p` in order, one product at a time, so results differ from the GEMM's by
//! rounding only (tested against an f64 reference on every target the CPU runs).

use pulp::{Simd, WithSimd};

use super::isa::{dispatch, vectorised, Isa};
use super::skinny::{load, madd, store};

/// Most vectors of `c` per register tile.
const CV: usize = 4;

/// `c[i·c_rs + j] = (acc ? c[i·c_rs + j] : 0) + scale · Σ_{p<k} a[i·a_rs + p·a_cs] · y[p·y_rs + j]`
/// for `i < m`, `j < n`, on `isa`, into an output given by its first element and row stride
/// (callers' threads write disjoint blocks of one buffer). Panics if `a` or `y` is too short.
///
/// # Safety
/// `c` must be valid for writes (and, when `acc`, reads of initialised values) of rows
/// `0..m` × columns `0..n` at row stride `c_rs ≥ n`, with nothing else accessing them during
/// the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_mm_to(
    isa: Isa,
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
        m,
        n,
    };
    dispatch(isa, ops);
}

/// The operands of one [`tile_mm_to`] call as raw pointers.
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
    m: usize,
    n: usize,
}

impl WithSimd for Ops {
    type Output = ();

    /// The `m × n` output tile by tile (the extents were checked by [`tile_mm_to`], `c` is
    /// its caller's).
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let o = &self;
        let wide = S::REGISTER_COUNT >= 32;
        let (rb, cv) = if wide { (6, 4) } else { (4, 3) };
        let l = S::F32_LANES;
        for j0 in (0..o.n).step_by(l * cv) {
            let nj = (o.n - j0).min(l * cv);
            let mut widths = [0usize; CV];
            for (v, w) in widths.iter_mut().enumerate() {
                *w = nj.saturating_sub(l * v).min(l);
            }
            let nv = nj.div_ceil(l);
            for i0 in (0..o.m).step_by(rb) {
                let rows = (o.m - i0).min(rb);
                // SAFETY: rows i0..i0 + rows < m and columns j0..j0 + nj ≤ n (lanes past nj
                // masked) lie inside the checked extents.
                unsafe {
                    macro_rules! dispatch {
                        ($v:literal, $($r:literal),*) => {
                            match rows {
                                $($r => tile::<S, $r, $v>(simd, o, i0, j0, &widths),)*
                                _ => unreachable!("rows per tile are 1..=6"),
                            }
                        };
                    }
                    if wide {
                        match nv {
                            1 => dispatch!(1, 1, 2, 3, 4, 5, 6),
                            2 => dispatch!(2, 1, 2, 3, 4, 5, 6),
                            3 => dispatch!(3, 1, 2, 3, 4, 5, 6),
                            _ => dispatch!(4, 1, 2, 3, 4, 5, 6),
                        }
                    } else {
                        match nv {
                            1 => dispatch!(1, 1, 2, 3, 4),
                            2 => dispatch!(2, 1, 2, 3, 4),
                            _ => dispatch!(3, 1, 2, 3, 4),
                        }
                    }
                }
            }
        }
    }
}

/// One `R`-row × `V`-vector tile of `c` at `(i0, j0)`: `R·V` accumulators in registers over
/// the whole depth, then scaled (and added to `c`) in one masked store per vector; `widths`
/// are the columns of each vector.
///
/// # Safety
/// The tile's rows and (masked) columns lie inside the operands' extents.
#[inline(always)]
unsafe fn tile<S: Simd, const R: usize, const V: usize>(
    simd: S,
    o: &Ops,
    i0: usize,
    j0: usize,
    widths: &[usize; CV],
) {
    let l = S::F32_LANES;
    // SAFETY: the caller's contract; every load and store below is masked to the tile.
    unsafe {
        let zero = simd.splat_f32s(0.0);
        let mut accs = [[zero; V]; R];
        let a0 = o.a.add(i0 * o.a_rs);
        let y0 = o.y.add(j0);
        // The column masks once per tile, not once per load.
        let full: [bool; V] = std::array::from_fn(|v| widths[v] >= l);
        let masks: [pulp::MemMask<S::m32s>; V] =
            std::array::from_fn(|v| simd.mask_between_m32s(0, widths[v].min(l) as u32));
        for p in 0..o.k {
            let yrow = y0.add(p * o.y_rs);
            let mut yv = [zero; V];
            for (v, yv) in yv.iter_mut().enumerate() {
                let at = yrow.add(l * v);
                *yv = if full[v] {
                    at.cast::<S::f32s>().read_unaligned()
                } else {
                    simd.mask_load_ptr_f32s(masks[v], at)
                };
            }
            let ap = a0.add(p * o.a_cs);
            for (r, acc) in accs.iter_mut().enumerate() {
                let av = simd.splat_f32s(*ap.add(r * o.a_rs));
                for v in 0..V {
                    acc[v] = madd(simd, av, yv[v], acc[v]);
                }
            }
        }
        let s = simd.splat_f32s(o.scale);
        for (r, acc) in accs.iter().enumerate() {
            let crow = o.c.add((i0 + r) * o.c_rs + j0);
            for v in 0..V {
                let dst = crow.add(l * v);
                let out = if o.acc {
                    madd(simd, acc[v], s, load(simd, dst, widths[v]))
                } else {
                    simd.mul_f32s(acc[v], s)
                };
                store(simd, dst, widths[v], out);
            }
        }
    }
}

/// `out[c·rows + j] = x[j·x_rs + c]` for `j < rows`, `c < cols`: a `rows × cols` block of
/// row-major `x` transposed into `out` (`cols × rows`), the right operand `Yᵀ` of a product
/// `X·Yᵀ` for [`tile_mm_to`]. Runs over 16 rows at a time, so each column's 16 values are
/// stored together (a plain loop stores to a new cache line per element). Panics if `x` or
/// `out` is too short.
pub(crate) fn transpose(
    isa: Isa,
    x: &[f32],
    x_rs: usize,
    (rows, cols): (usize, usize),
    out: &mut [f32],
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(out.len() >= rows * cols, "transpose: out too short");
    assert!(
        x.len() >= (rows - 1) * x_rs + cols,
        "transpose: x too short"
    );
    vectorised(
        isa,
        #[inline(always)]
        || {
            for j0 in (0..rows).step_by(16) {
                let nr = (rows - j0).min(16);
                for c in 0..cols {
                    let dst = &mut out[c * rows + j0..][..nr];
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = x[(j0 + j) * x_rs + c];
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;
    use crate::ops::testing::values;

    /// Row counts with and without a 16-row tail, a padded row stride: exact.
    #[test]
    fn transpose_matches_the_definition() {
        for isa in Isa::supported() {
            transpose_case(isa);
        }
    }

    fn transpose_case(isa: Isa) {
        for &(rows, cols, x_rs) in &[(128, 64, 512), (77, 32, 40), (1, 5, 5), (16, 16, 16)] {
            let x = values((rows - 1) * x_rs + cols, 4);
            let mut out = vec![f32::NAN; rows * cols + 3];
            transpose(isa, &x, x_rs, (rows, cols), &mut out);
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

    /// Every tile shape (row counts 1–6 and a rest, 1–4 vectors, lane tails, on every target), transposed and
    /// padded strides for `a`, padded rows of `y` and `c`, overwrite and accumulate, `k` of 1
    /// and 0: within f32 rounding of an f64 reference, and `c` untouched outside its block.
    #[test]
    fn tile_mm_matches_the_definition() {
        for isa in Isa::supported() {
            tile_mm_case(isa);
        }
    }

    fn tile_mm_case(isa: Isa) {
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
                            isa,
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
                                "{isa} {m}x{n}x{k} transposed={transposed} acc={acc} at {i},{j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
