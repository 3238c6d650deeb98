//! Fused ops with their own backward, used where a profile showed candle's generic autograd to
//! be the bottleneck: candle `CustomOp` wrappers around the slice-level kernels of
//! [`crate::kernels`] (which hold the math). Each is tested against the plain tensor path
//! (values and gradients). All run on CPU/f32 data; callers fall back to the composed tensor
//! path elsewhere.

mod cross_entropy;
mod lora_linear;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub(crate) use cross_entropy::CrossEntropyOp;
#[cfg(test)]
pub(crate) use lora_linear::merged_weight_pays;
pub(crate) use lora_linear::{merged_weight_of, DropMask, FrozenLinearOp, LoraLinearOp};
pub(crate) use rms_norm::RmsNormOp;
pub(crate) use rope::RopeOp;
pub(crate) use softmax::ScaledMaskedSoftmaxOp;
pub(crate) use swiglu::SwiGluOp;

/// Whether the fused CPU/f32 kernels apply to `t`.
pub(crate) fn fusable(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// `len` deterministic values in `[−1, 1)` (a different sequence per `seed`), for kernel
    /// tests on plain slices.
    pub fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    /// A normal(0, 1) tensor from a seed.
    pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        crate::layers::normal(shape, 1.0, &crate::layers::LoraRng::new(seed), &Device::Cpu).unwrap()
    }

    pub use crate::testutil::{assert_close, diff_and_scale};
}
