//! The CPU math of every op, once: slice-level forward and backward functions on row-major
//! f32 buffers, each run on the instruction set chosen at run time ([`Isa`]: AVX-512,
//! AVX2+FMA, or a portable path that compiles on any target).
//!
//! The candle `CustomOp`s of the autograd path (`ops`) and the training engine's blocks
//! (`engine`) both call these; no formula exists twice.
//!
//! | op | module | forward / backward |
//! |---|---|---|
//! | linear, LoRA-linear (merged `W0 + s·B·A` or low-rank) | [`gemm`], [`skinny`] | GEMM entry points; `x·Aᵀ`, `dy·B`, `gᵀ·x`, `xaᵀ·dy`, `W0 + s·B·A` |
//! | attention (causal / sliding window / bidirectional, GQA, key padding) | [`attention`] | `attention_forward` / `attention_backward` |
//! | attention's small products | [`tile_mm`] | register-tiled `c (+)= s·a·y`, `transpose` |
//! | RMSNorm, LayerNorm | [`norm`] | `rms_norm_*`, `layer_norm_*` |
//! | RoPE | [`rope`] | `rope_inplace` (forward or its transpose) |
//! | SwiGLU, GELU | [`activation`] | `swiglu_*`, `gelu_*` |
//! | softmax, cross-entropy | [`softmax`] | `softmax_inplace`, `softmax_backward`, `cross_entropy_*` |
//! | embedding | [`embedding`] | `embedding_forward` / `embedding_backward` |
//! | AdamW update | [`adamw`] | `first_moment`, `second_moment`, `update_param` (in place) |
//! | `exp`, reductions | [`vecmath`] | used inside the others |
//!
//! Each kernel is tested against a plain reference (an f64 loop or the candle tensor path)
//! with a stated tolerance, once for every target in [`Isa::supported`].
//!
//! These run on CPU memory; a GPU backend would provide the same functions on its buffers.

pub(crate) mod activation;
pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod embedding;
pub(crate) mod gemm;
mod isa;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod skinny;
pub(crate) mod softmax;
pub(crate) mod tile_mm;
pub(crate) mod vecmath;

pub(crate) use isa::vectorised;
pub use isa::{with_isa, Isa};

/// Rows per rayon task for row-wise kernels (about 16k elements each).
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Elements per rayon task of the element-wise kernels.
pub(crate) const CHUNK: usize = 16 * 1024;

/// `f(&mut a[i], b[i])` for every element of two equally long slices, in parallel chunks of
/// [`CHUNK`], on `isa` (e.g. `a += b`).
pub(crate) fn zip_update(isa: Isa, a: &mut [f32], b: &[f32], f: impl Fn(&mut f32, f32) + Sync) {
    use rayon::prelude::*;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            vectorised(
                isa,
                #[inline(always)]
                || a.iter_mut().zip(b).for_each(|(a, &b)| f(a, b)),
            )
        });
}

/// A `Vec` of `len` values each written by `fill` (given the spare capacity), without zeroing
/// it first.
///
/// # Safety
/// `fill` must write every one of the `len` values.
pub(crate) unsafe fn filled(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's contract.
    unsafe { v.set_len(len) };
    v
}
