//! Making the quickstart's base model from nothing: a character-level `tokenizer.json` and a
//! randomly initialised Llama checkpoint in transformers' layout, which `lora train --full` then
//! teaches task A. `lora quickstart --remake-base DIR` runs the whole recipe.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::Result;
use crate::layers::{normal, LoraRng};
use crate::tensor_file;

/// Special tokens, at ids 0, 1, 2 as in Llama tokenizers.
pub const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// The characters the quickstart's text uses.
pub fn alphabet() -> Vec<char> {
    let mut v: Vec<char> = vec![' ', '\n'];
    v.extend('a'..='z');
    v.extend('A'..='Z');
    v.extend('0'..='9');
    v.extend(":->.,!?'\"()".chars());
    v
}

/// A `tokenizer.json` (Hugging Face tokenizers format) that maps each character to one token,
/// adds `<s>` in front, and decodes by concatenation: a BPE model with no merges.
pub fn char_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (i, c) in alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), (i + SPECIALS.len()).into());
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let v = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// The quickstart base model's shape.
#[derive(Debug, Clone, Copy)]
pub struct BaseShape {
    /// Embedding width.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
}

impl Default for BaseShape {
    fn default() -> Self {
        BaseShape {
            hidden: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate: 384,
        }
    }
}

/// The vocabulary size: specials + alphabet, rounded up to a multiple of 8.
pub fn vocab_size() -> usize {
    (SPECIALS.len() + alphabet().len()).div_ceil(8) * 8
}

/// transformers' `config.json` for a LlamaForCausalLM of `shape`.
pub fn config_json(shape: BaseShape) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size(),
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden / shape.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    })
}

/// Writes `config.json`, `tokenizer.json` and a randomly initialised `model.safetensors`
/// (weights ~ N(0, 0.02²) as transformers' `_init_weights`, norms 1) into `dir`.
pub fn write_random_model(dir: &Path, shape: BaseShape, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let rng = LoraRng::new(seed);
    let dev = Device::Cpu;
    let (h, kv, v, m) = (
        shape.hidden,
        shape.kv_heads * (shape.hidden / shape.heads),
        vocab_size(),
        shape.intermediate,
    );
    let mut t: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut w = |name: String, dims: &[usize]| -> Result<()> {
        t.insert(name, normal(dims, 0.02, &rng, &dev)?);
        Ok(())
    };
    w("model.embed_tokens.weight".into(), &[v, h])?;
    w("lm_head.weight".into(), &[v, h])?;
    for i in 0..shape.layers {
        let p = format!("model.layers.{i}");
        w(format!("{p}.self_attn.q_proj.weight"), &[h, h])?;
        w(format!("{p}.self_attn.k_proj.weight"), &[kv, h])?;
        w(format!("{p}.self_attn.v_proj.weight"), &[kv, h])?;
        w(format!("{p}.self_attn.o_proj.weight"), &[h, h])?;
        w(format!("{p}.mlp.gate_proj.weight"), &[m, h])?;
        w(format!("{p}.mlp.up_proj.weight"), &[m, h])?;
        w(format!("{p}.mlp.down_proj.weight"), &[h, m])?;
    }
    for i in 0..shape.layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("model.layers.{i}.{n}.weight"),
                Tensor::ones(h, DType::F32, &dev)?,
            );
        }
    }
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, DType::F32, &dev)?,
    );
    tensor_file::save(
        &dir.join("model.safetensors"),
        &t,
        &tensor_file::pt_metadata(),
    )?;
    let cfg = serde_json::to_string_pretty(&config_json(shape)).unwrap_or_default();
    tensor_file::write_text_atomic(&dir.join("config.json"), &cfg)?;
    tensor_file::write_text_atomic(&dir.join("tokenizer.json"), &char_tokenizer_json())
}
