//! Transformer models built through [`crate::LoraBuilder`], so that LoRA lands exactly where the
//! config targets, by module name.

use candle_core::Tensor;

use crate::error::Result;

/// A causal language model: token ids in, next-token logits out.
pub trait CausalLm {
    /// `ids: [batch, seq]` (u32) → logits `[batch, seq, vocab]` (f32). `train` enables dropout.
    fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor>;
}
