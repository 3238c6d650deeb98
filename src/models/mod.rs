//! Transformer models built through [`crate::LoraBuilder`], so that LoRA lands exactly where the
//! config targets, by module name.

use candle_core::Tensor;

use crate::error::Result;

pub mod bert;
pub mod classifier;
pub mod config;
pub mod generate;
pub mod llama;
pub mod loss;
pub mod sentence;

pub use bert::{Bert, BertConfig};
pub use classifier::{classification_loss, Classifier, ClassifierInputs};
pub use config::{Arch, LlamaConfig, RopeConfig, SUPPORTED_ARCHITECTURES};
pub use generate::{generate, Sampler, Sampling};
pub use llama::{
    BatchSeq, Cache, FusedGrads, FusedOptions, Llama, LoraInit, RmsNorm, ServeAdapter,
};
pub use sentence::{Pooling, SentenceEncoder};

/// A causal language model: token ids in, next-token logits out.
pub trait CausalLm {
    /// `ids: [batch, seq]` (u32) → logits `[batch, seq, vocab]` (f32). `train` enables dropout.
    fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor>;

    /// The summed causal-LM loss of `ids` against `labels` and its gradient for every
    /// trainable variable, by a hand-written backward, or `None` when the model has none for
    /// its current setup (the default): then use `forward_t`, the loss and autograd. `opts`
    /// chooses, e.g., activation checkpointing.
    fn fused_loss_and_grads(
        &self,
        _ids: &Tensor,
        _labels: &Tensor,
        _opts: FusedOptions,
    ) -> Result<Option<FusedGrads>> {
        Ok(None)
    }
}
