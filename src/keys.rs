//! PEFT's tensor-key grammar, parsed and formatted in one place (PEFT.md §1.3):
//!
//! ```text
//! base_model.model.<module>.lora_A.weight       linear / conv A
//! base_model.model.<module>.lora_B.weight       linear / conv B
//! base_model.model.<module>.lora_embedding_A    embedding A (no `.weight`)
//! base_model.model.<module>.lora_embedding_B    embedding B
//! base_model.model.<module>.base_layer.weight    copy of an embedding layer's base weight
//! base_model.model.<module>.lora_magnitude_vector  DoRA's magnitude m (no `.weight`)
//! ```
//!
//! On load the `base_model.model.` prefix is optional (the transformers/diffusers form) and an
//! in-memory adapter name (`lora_A.default.weight`) is accepted.

use crate::error::{Error, Result};

/// The prefix PEFT puts before every module path.
pub const PREFIX: &str = "base_model.model.";

/// Which factor a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Factor {
    /// `lora_A.weight`.
    A,
    /// `lora_B.weight`.
    B,
    /// `lora_embedding_A`.
    EmbeddingA,
    /// `lora_embedding_B`.
    EmbeddingB,
    /// `base_layer.weight`: a copy of an embedding layer's base weight (the input embedding or
    /// the output head), which PEFT saves with `save_embedding_layers` (by default when the
    /// config targets `embed_tokens` or `lm_head`) and loads into the model's base weight.
    BaseWeight,
    /// `lora_magnitude_vector` (DoRA).
    Magnitude,
}

impl Factor {
    /// The key suffix PEFT writes.
    pub fn suffix(self) -> &'static str {
        match self {
            Factor::A => "lora_A.weight",
            Factor::B => "lora_B.weight",
            Factor::EmbeddingA => "lora_embedding_A",
            Factor::EmbeddingB => "lora_embedding_B",
            Factor::BaseWeight => "base_layer.weight",
            Factor::Magnitude => "lora_magnitude_vector",
        }
    }
}

/// PEFT's saved key for `module`'s `factor`.
pub fn format(module: &str, factor: Factor) -> String {
    format!("{PREFIX}{module}.{}", factor.suffix())
}

/// Key suffixes PEFT writes for features this library does not implement, with the feature.
const UNSUPPORTED_SUFFIXES: &[(&str, &str)] = &[
    (".lora_B.bias", "lora_bias"),
    (".base_layer.bias", "bias"),
    (".trainable_tokens_delta", "trainable_token_indices"),
];

/// Splits a saved key into `(module, factor)`. Keys of unsupported PEFT features are an
/// [`Error::UnsupportedFeature`]; any other key is an [`Error::UnusedTensor`].
pub fn parse(key: &str, file: &std::path::Path) -> Result<(String, Factor)> {
    let path = key.strip_prefix(PREFIX).unwrap_or(key);
    for f in [
        Factor::A,
        Factor::B,
        Factor::EmbeddingA,
        Factor::EmbeddingB,
        Factor::BaseWeight,
        Factor::Magnitude,
    ] {
        let (stem, leaf) = match f {
            Factor::A => ("lora_A", ".weight"),
            Factor::B => ("lora_B", ".weight"),
            Factor::EmbeddingA => ("lora_embedding_A", ""),
            Factor::EmbeddingB => ("lora_embedding_B", ""),
            Factor::BaseWeight => ("base_layer", ".weight"),
            Factor::Magnitude => ("lora_magnitude_vector", ""),
        };
        let Some(rest) = path.strip_suffix(leaf) else {
            continue;
        };
        // `<module>.lora_A` or `<module>.lora_A.<adapter name>`
        let module = rest
            .strip_suffix(&format!(".{stem}"))
            .map(str::to_string)
            .or_else(|| {
                let (head, adapter) = rest.rsplit_once('.')?;
                (!adapter.is_empty() && !adapter.contains("lora"))
                    .then(|| head.strip_suffix(&format!(".{stem}")).map(str::to_string))
                    .flatten()
            });
        if let Some(m) = module.filter(|m| !m.is_empty()) {
            return Ok((m, f));
        }
    }
    for (suffix, feature) in UNSUPPORTED_SUFFIXES {
        if key.ends_with(suffix) {
            return Err(Error::UnsupportedFeature {
                feature: feature.to_string(),
                detail: format!("tensor `{key}` in {}", file.display()),
            });
        }
    }
    Err(Error::UnusedTensor {
        key: key.to_string(),
        file: file.to_path_buf(),
        hint: "not a LoRA factor: expected `<module>.lora_A.weight`, `.lora_B.weight`, `.lora_embedding_A` or `.lora_embedding_B`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parse_and_format_round_trip() {
        let f = Path::new("a.safetensors");
        for (module, factor) in [
            ("model.layers.0.self_attn.q_proj", Factor::A),
            ("blocks.1.v", Factor::B),
            ("model.embed_tokens", Factor::EmbeddingA),
            ("emb", Factor::EmbeddingB),
            ("lm_head", Factor::BaseWeight),
            ("model.embed_tokens", Factor::BaseWeight),
            ("model.layers.0.mlp.down_proj", Factor::Magnitude),
        ] {
            let key = format(module, factor);
            assert_eq!(parse(&key, f).unwrap(), (module.to_string(), factor));
        }
        assert_eq!(
            format("lin1", Factor::A),
            "base_model.model.lin1.lora_A.weight"
        );
        assert_eq!(
            format("emb", Factor::EmbeddingB),
            "base_model.model.emb.lora_embedding_B"
        );
    }

    #[test]
    fn prefix_and_adapter_name_are_optional() {
        let f = Path::new("a.safetensors");
        assert_eq!(
            parse("lin1.lora_B.weight", f).unwrap(),
            ("lin1".into(), Factor::B)
        );
        assert_eq!(
            parse(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                f
            )
            .unwrap(),
            ("model.layers.0.self_attn.q_proj".into(), Factor::A)
        );
    }

    #[test]
    fn unsupported_and_unknown_keys_are_named() {
        let f = Path::new("adapter_model.safetensors");
        let e = parse("base_model.model.lin1.lora_B.bias", f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora_bias"), "{e}");
        let e = parse("base_model.model.head.weight", f)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("head.weight") && e.contains("adapter_model.safetensors"),
            "{e}"
        );
        assert!(parse("lora_A.weight", f).is_err());
    }
}
