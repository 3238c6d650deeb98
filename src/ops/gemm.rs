//! The one GEMM entry point of the fused kernels: the `gemm` crate (AVX-512 kernels with the
//! `x86-v4` feature) on row-major f32 buffers with explicit strides, threaded like candle.

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
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    debug_assert!(dst.len() >= m * n);
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every pointer is valid for the extents given by (m, n, k) and the strides, which
    // the callers derive from row-major buffers of exactly those shapes or from the layout of
    // the tensor whose data the slice holds (strides may be 0: a broadcast).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
