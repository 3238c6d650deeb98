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

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
