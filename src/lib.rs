//! # lora
//!
//! LoRA (low-rank adaptation) for [candle](https://github.com/huggingface/candle), numerically
//! identical to Hugging Face PEFT: the layers, the `adapter_config.json` +
//! `adapter_model.safetensors` format, checkpoint merging, and training.
#![warn(missing_docs)]

pub mod adapter;
pub mod algebra;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod app;
pub mod builder;
pub mod config;
pub mod convert;
mod engine;
pub mod error;
pub mod kernels;
pub mod keys;
pub mod layers;
pub mod merge;
pub mod model_weights;
pub mod models;
mod ops;
pub mod serve;
pub mod target;
pub mod tensor_file;
pub mod train;

pub use adapter::{Adapter, ModuleAdapter};
pub use builder::{LoraBuilder, MapSource, TensorSource};
pub use config::{Bias, InitLoraWeights, LoraConfig, ModuleKind, TargetModules};
pub use error::{Error, Result};
pub use layers::{
    Conv2dGeometry, LoraConv2d, LoraEmbedding, LoraLinear, LoraRng, LoraSpec, LowRank, Mergeable,
    Param,
};
pub use model_weights::Checkpoint;

#[cfg(test)]
pub(crate) mod testutil;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
