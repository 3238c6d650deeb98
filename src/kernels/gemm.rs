//! The GEMM entry points of the fused kernels: the `gemm` crate (AVX-512 kernels with the
//! `x86-v4` feature) on row-major f32 buffers with explicit strides. Threaded products split
//! the output between candle's threads themselves, one serial product each ([`gemm_f32`],
//! [`gemm_f32_new`] into a fresh buffer, [`gemm_f32_rs`] for a padded output); [`gemm_f32_serial`]
//! stays on the calling thread. The operands' extents are checked before the raw-pointer call.
//!
//! Splitting: by columns when the output is wide enough (each thread then packs only its part
//! of the right operand, where a split by rows packs all of it on every thread: 0.80–1.0× the
//! time of a split by rows at the Llama benchmark's shapes, median 0.93, measured in turn in
//! one process), else by rows; both beat the crate's own threading at these sizes.

use rayon::prelude::*;

/// Fewest output columns per thread for a split by columns.
const SPLIT_COLS: usize = 64;
/// Fewest output rows per thread for a split by rows.
const SPLIT_ROWS: usize = 64;

/// `dst (m×n, row-major) = read·dst + beta·lhs·rhs` with explicit (row, column) strides of
/// `lhs` (m×k) and `rhs` (k×n), any of which may be 0, on candle's threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    read_dst: bool,
    lhs: &[f32],
    lhs_st: (usize, usize),
    rhs: &[f32],
    rhs_st: (usize, usize),
    beta: f32,
) {
    let t = threads();
    gemm_f32_rs(
        (m, n, k),
        dst,
        n,
        read_dst,
        lhs,
        lhs_st,
        rhs,
        rhs_st,
        beta,
        t,
    );
}

/// [`gemm_f32`] on the calling thread only, for callers that split the work across threads
/// themselves.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    read_dst: bool,
    lhs: &[f32],
    lhs_st: (usize, usize),
    rhs: &[f32],
    rhs_st: (usize, usize),
    beta: f32,
) {
    gemm_f32_rs(
        (m, n, k),
        dst,
        n,
        read_dst,
        lhs,
        lhs_st,
        rhs,
        rhs_st,
        beta,
        1,
    );
}

/// `dst[i·dst_rs + j] = read·dst[…] + beta·(lhs·rhs)[i, j]` for an output whose rows are
/// `dst_rs ≥ n` apart, on up to `threads` threads. With `k = 0` the product is zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_rs(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    read_dst: bool,
    lhs: &[f32],
    lhs_st: (usize, usize),
    rhs: &[f32],
    rhs_st: (usize, usize),
    beta: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n && dst.len() > (m - 1) * dst_rs + n - 1,
        "gemm: dst too short"
    );
    if k == 0 {
        if !read_dst {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    check_extents(m, n, k, lhs, lhs_st, rhs, rhs_st);
    let out = Out {
        ptr: dst.as_mut_ptr(),
        rs: dst_rs,
    };
    // SAFETY: `dst` is initialised and holds the m×n outputs at stride `dst_rs`; the operands'
    // extents are checked above.
    unsafe {
        gemm_split(
            threads,
            (m, n, k),
            out,
            read_dst,
            lhs,
            lhs_st,
            rhs,
            rhs_st,
            beta,
            None,
        )
    }
}

/// `beta·lhs·rhs` into a new `m×n` row-major buffer on candle's threads. The product writes
/// every element itself: the buffer is not zero-filled first (for a large output that fill is
/// a full extra pass over memory).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_st: (usize, usize),
    rhs: &[f32],
    rhs_st: (usize, usize),
    beta: f32,
) -> Vec<f32> {
    new_product((m, n, k), lhs, lhs_st, rhs, rhs_st, beta, None)
}

/// `bias + beta·lhs·rhs` (the `n` bias values added to every row) into a new `m×n` row-major
/// buffer on candle's threads: each thread writes the bias into its own block just before its
/// product accumulates onto it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32_bias_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_st: (usize, usize),
    rhs: &[f32],
    rhs_st: (usize, usize),
    beta: f32,
    bias: &[f32],
) -> Vec<f32> {
    assert!(bias.len() >= n, "gemm: bias too short");
    new_product((m, n, k), lhs, lhs_st, rhs, rhs_st, beta, Some(&bias[..n]))
}

#[allow(clippy::too_many_arguments)]
fn new_product(
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    lhs_st: (usize, usize),
    rhs: &[f32],
    rhs_st: (usize, usize),
    beta: f32,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return match bias {
            Some(b) => b.repeat(m),
            None => vec![0f32; m * n],
        };
    }
    check_extents(m, n, k, lhs, lhs_st, rhs, rhs_st);
    let mut dst = Vec::with_capacity(m * n);
    let out = Out {
        ptr: dst.as_mut_ptr(),
        rs: n,
    };
    // SAFETY: the extents are checked above; `dst` has capacity for the m×n row-major output.
    // Every block of it is written before it is read: without a bias the product (k > 0,
    // `read_dst` false) writes each element of its block without reading any; with one the
    // block's rows are set to the bias first. The blocks cover the output, so all m·n
    // elements are initialised when `set_len` runs.
    unsafe {
        gemm_split(
            threads(),
            (m, n, k),
            out,
            false,
            lhs,
            lhs_st,
            rhs,
            rhs_st,
            beta,
            bias,
        );
        dst.set_len(m * n);
    }
    dst
}

/// candle's thread count.
fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// A row-major output: its first element and row stride. It crosses to rayon's threads, each
/// of which writes its own block of it (here in `gemm_split`, and in the training engine's
/// attention, one head's columns per task).
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub(crate) ptr: *mut f32,
    pub(crate) rs: usize,
}
// SAFETY: every user hands each thread a disjoint block of the output.
unsafe impl Send for Out {}
// SAFETY: as above; the pointer is only copied, never dereferenced through a shared borrow.
unsafe impl Sync for Out {}

impl Out {
    /// The block starting at row `i`, column `j`.
    ///
    /// # Safety
    /// `(i, j)` must lie inside the output.
    pub(crate) unsafe fn at(self, i: usize, j: usize) -> Out {
        Out {
            // SAFETY: the caller's contract.
            ptr: unsafe { self.ptr.add(i * self.rs + j) },
            rs: self.rs,
        }
    }
}

/// Panics unless every element that the strides address for an `m×k` lhs and a `k×n` rhs lies
/// inside the slices (what makes the raw-pointer product sound).
#[allow(clippy::too_many_arguments)]
fn check_extents(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        lhs.len() > last(m, k, lhs_rs, lhs_cs),
        "gemm: lhs too short"
    );
    assert!(
        rhs.len() > last(k, n, rhs_rs, rhs_cs),
        "gemm: rhs too short"
    );
}

/// The product split across up to `threads` threads (by columns, else by rows, else serial).
///
/// # Safety
/// `out` must be valid for writes of rows `0..m` × columns `0..n` (and reads when
/// `read_dst`) with nothing else accessing them during the call; the operands' extents must
/// hold ([`check_extents`]); `k > 0`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_split(
    threads: usize,
    (m, n, k): (usize, usize, usize),
    out: Out,
    read_dst: bool,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    beta: f32,
    bias: Option<&[f32]>,
) {
    let by_cols = threads.min(n / SPLIT_COLS);
    let by_rows = threads.min(m / SPLIT_ROWS);
    if by_cols > 1 {
        // Column blocks in whole 16-float vectors; the last takes the rest.
        let w = n.div_ceil(by_cols).next_multiple_of(16);
        (0..n)
            .step_by(w)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|j0| {
                let nj = w.min(n - j0);
                // SAFETY: columns j0..j0 + nj of rows 0..m are this task's alone (the tasks'
                // column ranges are disjoint) and lie inside the caller's block; the rhs columns
                // from j0 lie inside `rhs` by the checked extents.
                unsafe {
                    gemm_raw(
                        (m, nj, k),
                        out.at(0, j0),
                        read_dst,
                        (lhs, lrs, lcs),
                        (&rhs[j0 * rcs..], rrs, rcs),
                        beta,
                        bias.map(|b| &b[j0..j0 + nj]),
                    )
                }
            });
    } else if by_rows > 1 {
        let h = m.div_ceil(by_rows);
        (0..m)
            .step_by(h)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|i0| {
                let mi = h.min(m - i0);
                // SAFETY: rows i0..i0 + mi are this task's alone and inside the caller's block;
                // the lhs rows from i0 lie inside `lhs` by the checked extents.
                unsafe {
                    gemm_raw(
                        (mi, n, k),
                        out.at(i0, 0),
                        read_dst,
                        (&lhs[i0 * lrs..], lrs, lcs),
                        (rhs, rrs, rcs),
                        beta,
                        bias,
                    )
                }
            });
    } else {
        // SAFETY: the caller's contract.
        unsafe {
            gemm_raw(
                (m, n, k),
                out,
                read_dst,
                (lhs, lrs, lcs),
                (rhs, rrs, rcs),
                beta,
                bias,
            )
        }
    }
}

/// One serial product `out (m×n) = read·out + beta·lhs·rhs` (the gemm crate); with `bias`
/// (`n` values) every row of the block is first set to it and the product added.
///
/// # Safety
/// As [`gemm_split`], for this block; `bias`, when given, holds `n` values.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    out: Out,
    read_dst: bool,
    (lhs, lrs, lcs): (&[f32], usize, usize),
    (rhs, rrs, rcs): (&[f32], usize, usize),
    beta: f32,
    bias: Option<&[f32]>,
) {
    let read_dst = match bias {
        Some(b) => {
            for i in 0..m {
                // SAFETY: row i's n elements are this block's (the caller's contract).
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out.at(i, 0).ptr, n) };
            }
            true
        }
        None => read_dst,
    };
    // SAFETY: the caller's contract; strides may be 0 (a broadcast operand).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.ptr,
            1,
            out.rs as isize,
            read_dst,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lhs·rhs` by the definition, for `lhs` m×k and `rhs` k×n with strides.
    fn naive(
        (m, n, k): (usize, usize, usize),
        lhs: &[f32],
        (lrs, lcs): (usize, usize),
        rhs: &[f32],
        (rrs, rcs): (usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| lhs[i * lrs + p * lcs] * rhs[p * rrs + j * rcs])
                    .sum();
            }
        }
        out
    }

    /// A new buffer written by the product alone matches the definition for row-major,
    /// transposed and broadcast (stride 0) operands, serial or threaded; k = 0 gives zeros.
    #[test]
    fn new_buffer_products_match_the_definition() {
        let (m, n, k) = (37, 11, 23);
        let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let one = [0.5f32];
        for (l, ls) in [(&lhs[..], (k, 1)), (&lhs[..], (1, m)), (&one[..], (0, 0))] {
            for (r, rst) in [(&rhs[..], (n, 1)), (&rhs[..], (1, k))] {
                let want: Vec<f32> = naive((m, n, k), l, ls, r, rst)
                    .iter()
                    .map(|v| 2.0 * v)
                    .collect();
                assert_eq!(gemm_f32_new(m, n, k, l, ls, r, rst, 2.0), want);
                let mut d = vec![f32::NAN; m * n];
                gemm_f32_serial(m, n, k, &mut d, false, l, ls, r, rst, 2.0);
                assert_eq!(d, want);
            }
        }
        assert_eq!(
            gemm_f32_new(3, 4, 0, &[], (0, 1), &[], (4, 1), 1.0),
            vec![0.0; 12]
        );
    }

    /// Products split by columns (wide output) and by rows (tall, narrow output) across two
    /// threads, into a padded output with accumulation, match the definition; the padding is
    /// untouched.
    #[test]
    fn split_products_match_the_definition() {
        for &(m, n, k) in &[(130, 200, 33), (300, 40, 17), (5, 7, 3)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let rs = n + 3;
            let d0: Vec<f32> = (0..m * rs).map(|i| (i % 9) as f32).collect();
            let mut d = d0.clone();
            gemm_f32_rs(
                (m, n, k),
                &mut d,
                rs,
                true,
                &lhs,
                (k, 1),
                &rhs,
                (1, k),
                0.5,
                2,
            );
            let p = naive((m, n, k), &lhs, (k, 1), &rhs, (1, k));
            for i in 0..m {
                for j in 0..rs {
                    let want = if j < n {
                        d0[i * rs + j] + 0.5 * p[i * n + j]
                    } else {
                        d0[i * rs + j]
                    };
                    assert_eq!(d[i * rs + j], want, "m{m} n{n} ({i},{j})");
                }
            }
        }
    }

    /// A new buffer with a bias, split by columns, by rows and not at all, equals bias plus
    /// the product (integers: exact).
    #[test]
    fn bias_products_match_the_definition() {
        for &(m, n, k) in &[(130, 200, 33), (300, 40, 17), (5, 7, 3), (4, 6, 0)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 - 3.0).collect();
            let got = gemm_f32_bias_new(m, n, k, &lhs, (k, 1), &rhs, (n, 1), 2.0, &bias);
            let p = if k == 0 {
                vec![0.0; m * n]
            } else {
                naive((m, n, k), &lhs, (k, 1), &rhs, (n, 1))
            };
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(
                        got[i * n + j],
                        bias[j] + 2.0 * p[i * n + j],
                        "m{m} n{n} ({i},{j})"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "lhs too short")]
    fn short_operands_are_refused() {
        let mut d = vec![0f32; 4];
        gemm_f32(
            2,
            2,
            2,
            &mut d,
            false,
            &[1.0; 3],
            (2, 1),
            &[1.0; 4],
            (2, 1),
            1.0,
        );
    }
}
