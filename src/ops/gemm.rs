//! The GEMM entry points of the fused kernels: the `gemm` crate (AVX-512 kernels with the
//! `x86-v4` feature) on row-major f32 buffers with explicit strides, threaded like candle
//! ([`gemm_f32`], [`gemm_f32_new`] into a fresh buffer) or on the calling thread
//! ([`gemm_f32_serial`]). The operands' extents are checked before the raw-pointer call.

/// `dst (m×n, row-major) = read·dst + beta·lhs·rhs` with explicit (row, column) strides of
/// `lhs` (m×k) and `rhs` (k×n), any of which may be 0 (gemm crate).
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
    gemm_f32_with(
        parallelism(),
        m,
        n,
        k,
        dst,
        read_dst,
        lhs,
        lhs_st,
        rhs,
        rhs_st,
        beta,
    );
}

/// [`gemm_f32`] on the calling thread only, for callers that split the work across threads
/// themselves (one serial product per thread on its own rows).
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
    let par = gemm::Parallelism::None;
    gemm_f32_with(par, m, n, k, dst, read_dst, lhs, lhs_st, rhs, rhs_st, beta);
}

/// `beta·lhs·rhs` into a new `m×n` row-major buffer, threaded like [`gemm_f32`]. The product
/// writes every element itself: the buffer is not zero-filled first (for a large output that
/// fill is a full extra pass over memory).
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
    if k == 0 {
        return vec![0f32; m * n];
    }
    let mut dst = Vec::with_capacity(m * n);
    let par = parallelism();
    check_extents(m, n, k, lhs, lhs_st, rhs, rhs_st);
    // SAFETY: the extents are checked above; `dst` has capacity for the m×n row-major output,
    // and with `read_dst` false (and k > 0) the gemm crate writes every element of it without
    // reading any, so all m·n elements are initialised when `set_len` runs.
    unsafe {
        gemm_raw(
            par,
            (m, n, k),
            dst.as_mut_ptr(),
            false,
            lhs,
            lhs_st,
            rhs,
            rhs_st,
            beta,
        );
        dst.set_len(m * n);
    }
    dst
}

/// The gemm crate's threading for a product on candle's thread count.
fn parallelism() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
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

#[allow(clippy::too_many_arguments)]
fn gemm_f32_with(
    par: gemm::Parallelism,
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
    assert!(dst.len() >= m * n, "gemm: dst too short");
    check_extents(m, n, k, lhs, lhs_st, rhs, rhs_st);
    // SAFETY: the extents of all three operands are checked above.
    unsafe {
        gemm_raw(
            par,
            (m, n, k),
            dst.as_mut_ptr(),
            read_dst,
            lhs,
            lhs_st,
            rhs,
            rhs_st,
            beta,
        )
    }
}

/// `dst (m×n, row-major) = read·dst + beta·lhs·rhs`.
///
/// # Safety
/// `dst` must be valid for writes of `m·n` elements (and for reads when `read_dst`), and every
/// element the strides address must lie inside `lhs` and `rhs` ([`check_extents`]).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    par: gemm::Parallelism,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    read_dst: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    // SAFETY: the caller's contract above; strides may be 0 (a broadcast operand).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
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
