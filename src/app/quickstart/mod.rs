//! `lora quickstart`: the whole LoRA workflow on a small shipped model, with no download.
//!
//! A small Llama-architecture base model (shipped in `assets/quickstart/base`) was taught task A
//! by full fine-tuning; the quickstart trains a LoRA adapter for task B, validates it unmerged
//! during training, merges it for deployment, and compares it with full fine-tuning.

pub mod base;
pub mod run;
pub mod tasks;
