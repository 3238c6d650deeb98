//! # lora
//!
//! LoRA (low-rank adaptation) for [candle](https://github.com/huggingface/candle), numerically
//! identical to Hugging Face PEFT: the layers, the `adapter_config.json` +
//! `adapter_model.safetensors` format, checkpoint merging, and training.
#![warn(missing_docs)]

pub mod adapter;
pub mod alloc;
pub mod bench;
pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod error;
pub mod keys;
pub mod layers;
pub mod merge;
pub mod models;
mod ops;
pub mod quickstart;
pub mod serve;
pub mod st;
pub mod target;
pub mod train;

pub use adapter::{Adapter, ModuleAdapter};
pub use builder::{LoraBuilder, MapSource, TensorSource};
pub use checkpoint::Checkpoint;
pub use config::{Bias, InitLoraWeights, LoraConfig, ModuleKind, TargetModules};
pub use error::{Error, Result};
pub use layers::{
    Conv2dGeometry, LoraConv2d, LoraEmbedding, LoraLinear, LoraRng, LoraSpec, LowRank, Mergeable,
    Param,
};

#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::Tensor;

    /// max |a − b| over all elements (f32).
    pub(crate) fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all());
        d.and_then(|d| d.max(0))
            .and_then(|m| m.to_scalar::<f32>())
            .expect("comparable tensors")
    }
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
