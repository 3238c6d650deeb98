//! [`LlamaConfig`]: a transformers `config.json` for the Llama family (Llama 1–3, Mistral,
//! Qwen2), read with the checkpoint's own field names and transformers' defaults.
//!
//! Both config layouts are read: the 4.x one (`rope_theta`, `rope_scaling`) and the 5.x one
//! (`rope_parameters: {"rope_type", "rope_theta", ...}`). [`LlamaConfig::rope`] resolves either
//! into a [`RopeConfig`]; a RoPE scaling other than Llama 3's is refused rather than run wrongly.
//!
//! ```
//! use lora::models::{Arch, LlamaConfig};
//! let cfg: LlamaConfig = serde_json::from_str(r#"{
//!     "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
//!     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
//!     "num_key_value_heads": 2
//! }"#).unwrap();
//! assert_eq!(cfg.arch().unwrap(), Arch::Llama);
//! assert_eq!(cfg.head_dim(), 16);
//! assert_eq!(cfg.rope().unwrap().theta, 10000.0);
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The file transformers writes beside the weights.
pub const CONFIG_JSON: &str = "config.json";

/// The architectures [`crate::models::Llama`] implements, by their transformers class name.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForSequenceClassification",
    "MistralForSequenceClassification",
    "Qwen2ForSequenceClassification",
];

/// Which member of the family a config describes; it decides the projection biases and the
/// attention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`: biases on q/k/v/o when `attention_bias`, on the MLP when `mlp_bias`.
    Llama,
    /// `MistralForCausalLM`: no biases; `sliding_window` limits how far back a token attends.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on q/k/v (never on o_proj or the MLP).
    Qwen2,
}

/// One token id or several (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// A Llama-family `config.json` (transformers' field names; defaults as `LlamaConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size V (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Model width H.
    pub hidden_size: usize,
    /// MLP width (`gate_proj`/`up_proj` outputs).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm ε.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base θ (4.x layout; 5.x puts it in `rope_parameters`). Default 10000.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (4.x layout): `{"rope_type": "llama3", "factor", ...}` or `{"type": ...}`.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE parameters (5.x layout): `{"rope_type", "rope_theta", ...scaling fields}`.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// The context length the model was trained for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares `embed_tokens`'s weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: biases on q/k/v/o. (Qwen2 always has q/k/v biases; Mistral never.)
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: biases on gate/up/down.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The MLP activation; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// `llama`, `mistral` or `qwen2`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// The transformers class names; the first one decides the [`Arch`].
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Mistral (and Qwen2 when `use_sliding_window`): how many positions back a token attends.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used (refused when true: not implemented).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s): generation stops on any of them.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// The padding id: a sequence classifier pools the last token that is not this one.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Classifier outputs (`*ForSequenceClassification`); defaults to `id2label`'s size, else 2.
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Classifier label names by index, as transformers writes them.
    #[serde(default)]
    pub id2label: Option<serde_json::Map<String, Value>>,
}

/// transformers' `num_labels`: the explicit field, else `id2label`'s size, else 2.
pub fn num_labels(
    explicit: Option<usize>,
    id2label: Option<&serde_json::Map<String, Value>>,
) -> usize {
    explicit
        .or_else(|| id2label.map(|m| m.len()))
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// Llama 3's frequency-dependent RoPE scaling (transformers `_compute_llama3_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// Divides the low frequencies.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length before scaling.
    pub original_max_position_embeddings: usize,
}

/// The resolved rotary embedding: base θ and optional Llama 3 scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Base θ of `inv_freq[i] = θ^(−2i/d)`.
    pub theta: f64,
    /// Llama 3 scaling, when the config asks for it.
    pub llama3: Option<Llama3Scaling>,
}

#[derive(Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

impl LlamaConfig {
    /// Reads `<dir>/config.json` (or the file itself when `path` is a file) and checks that the
    /// model is one [`crate::models::Llama`] implements.
    pub fn from_dir(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(CONFIG_JSON)
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(Error::Unsupported {
                path: file,
                reason: "not found (a model folder needs the config.json that transformers writes)"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| Error::BadJson {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|reason| Error::Unsupported { path: file, reason })?;
        Ok(cfg)
    }

    /// Checks the architecture, the activation, the head layout and the RoPE settings; the
    /// message says what is wrong (the caller adds the file).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let arch = self.arch_or_reason()?;
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        if arch == Arch::Qwen2 && self.use_sliding_window {
            return Err("Qwen2 with use_sliding_window=true is not supported".into());
        }
        let (h, kv) = (self.num_attention_heads, self.num_kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(format!(
                "num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {h}",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        self.rope_or_reason().map(|_| ())
    }

    /// The architecture, from `architectures[0]` (or `model_type` when that is absent).
    pub fn arch(&self) -> Result<Arch> {
        self.arch_or_reason().map_err(unsupported)
    }

    fn arch_or_reason(&self) -> std::result::Result<Arch, String> {
        let supported = SUPPORTED_ARCHITECTURES.join(", ");
        if let Some(a) = self.architectures.first() {
            return match a.as_str() {
                "LlamaForCausalLM" | "LlamaForSequenceClassification" => Ok(Arch::Llama),
                "MistralForCausalLM" | "MistralForSequenceClassification" => Ok(Arch::Mistral),
                "Qwen2ForCausalLM" | "Qwen2ForSequenceClassification" => Ok(Arch::Qwen2),
                other => Err(format!(
                    "architecture `{other}` is not supported (supported: {supported})"
                )),
            };
        }
        match self.model_type.as_deref() {
            Some("llama") => Ok(Arch::Llama),
            Some("mistral") => Ok(Arch::Mistral),
            Some("qwen2") => Ok(Arch::Qwen2),
            Some(other) => Err(format!(
                "model_type `{other}` is not supported (supported: {supported})"
            )),
            None => Err(format!(
                "no `architectures` or `model_type` (supported: {supported})"
            )),
        }
    }

    /// Whether the checkpoint is a `*ForSequenceClassification` (a `score` head over the last
    /// non-pad token instead of `lm_head`).
    pub fn is_classifier(&self) -> bool {
        self.architectures
            .first()
            .is_some_and(|a| a.ends_with("ForSequenceClassification"))
    }

    /// The classifier's number of labels (see [`num_labels`]).
    pub fn num_labels(&self) -> usize {
        num_labels(self.num_labels, self.id2label.as_ref())
    }

    /// Key/value heads (defaults to the query heads).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width d.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v (first) and o_proj (second) have biases.
    pub fn attention_biases(&self) -> (bool, bool) {
        match self.arch() {
            Ok(Arch::Qwen2) => (true, false),
            Ok(Arch::Mistral) => (false, false),
            _ => (self.attention_bias, self.attention_bias),
        }
    }

    /// Whether the MLP projections have biases (Llama's `mlp_bias`).
    pub fn mlp_biases(&self) -> bool {
        matches!(self.arch(), Ok(Arch::Llama)) && self.mlp_bias
    }

    /// The attention window: Mistral's `sliding_window`, `None` for full causal attention.
    pub fn attention_window(&self) -> Option<usize> {
        match self.arch() {
            Ok(Arch::Mistral) => self.sliding_window,
            _ => None,
        }
    }

    /// End-of-sequence ids from the config (may be empty).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The rotary embedding settings, from `rope_parameters` (5.x) or `rope_theta` and
    /// `rope_scaling` (4.x).
    pub fn rope(&self) -> Result<RopeConfig> {
        self.rope_or_reason().map_err(unsupported)
    }

    fn rope_or_reason(&self) -> std::result::Result<RopeConfig, String> {
        let parse =
            |field: &str, v: &Value| RawRope::deserialize(v).map_err(|e| format!("`{field}`: {e}"));
        let params = match &self.rope_parameters {
            Some(v) if !v.is_null() => Some(parse("rope_parameters", v)?),
            _ => None,
        };
        let theta = params
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let scaling = params
            .as_ref()
            .filter(|p| p.rope_type.is_some() || p.kind.is_some())
            .map(|p| ("rope_parameters", p));
        let old = match &self.rope_scaling {
            Some(v) if !v.is_null() => Some(parse("rope_scaling", v)?),
            _ => None,
        };
        let (field, raw) = match (scaling, &old) {
            (Some(s), _) => s,
            (None, Some(o)) => ("rope_scaling", o),
            (None, None) => {
                return Ok(RopeConfig {
                    theta,
                    llama3: None,
                })
            }
        };
        let kind = raw.rope_type.as_deref().or(raw.kind.as_deref());
        let llama3 = match kind {
            None | Some("default") => None,
            Some("llama3") => Some(llama3_from(raw, field)?),
            Some(other) => {
                return Err(format!(
                    "`{field}` type `{other}` is not supported (supported: default, llama3)"
                ))
            }
        };
        Ok(RopeConfig { theta, llama3 })
    }
}

/// An [`Error::Unsupported`] naming `config.json` (the caller's path is not known here).
pub(crate) fn unsupported(reason: String) -> Error {
    Error::Unsupported {
        path: CONFIG_JSON.into(),
        reason,
    }
}

fn llama3_from(raw: &RawRope, field: &str) -> std::result::Result<Llama3Scaling, String> {
    let need = |v: Option<f64>, name: &str| v.ok_or_else(|| format!("`{field}` lacks `{name}`"));
    let s = Llama3Scaling {
        factor: need(raw.factor, "factor")?,
        low_freq_factor: need(raw.low_freq_factor, "low_freq_factor")?,
        high_freq_factor: need(raw.high_freq_factor, "high_freq_factor")?,
        original_max_position_embeddings: raw
            .original_max_position_embeddings
            .ok_or_else(|| format!("`{field}` lacks `original_max_position_embeddings`"))?,
    };
    if s.factor <= 0.0 || s.high_freq_factor <= s.low_freq_factor {
        return Err(format!(
            "`{field}`: llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor"
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> LlamaConfig {
        serde_json::from_str(&format!(
            r#"{{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2 {extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = cfg(r#", "model_type": "llama""#);
        assert_eq!(c.num_kv_heads(), 2);
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
        assert_eq!(
            c.rope().unwrap(),
            RopeConfig {
                theta: 10000.0,
                llama3: None
            }
        );
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn rope_is_read_from_both_layouts() {
        let old = cfg(
            r#", "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {"type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        );
        let new = cfg(
            r#", "model_type": "llama", "rope_parameters": {"rope_type": "llama3",
            "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let want = RopeConfig {
            theta: 500000.0,
            llama3: Some(Llama3Scaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
        };
        assert_eq!(old.rope().unwrap(), want);
        assert_eq!(new.rope().unwrap(), want);
        let plain = cfg(r#", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}"#);
        assert_eq!(plain.rope().unwrap().theta, 1e6);
        assert_eq!(plain.rope().unwrap().llama3, None);
    }

    #[test]
    fn unsupported_rope_and_architecture_are_named() {
        let yarn =
            cfg(r#", "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#);
        let e = yarn.validate().unwrap_err();
        assert!(e.contains("`yarn`") && e.contains("llama3"), "{e}");
        let gpt = cfg(r#", "architectures": ["GPT2LMHeadModel"]"#);
        let e = gpt.validate().unwrap_err();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen2ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn biases_and_window_depend_on_the_architecture() {
        let q = cfg(r#", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4"#);
        assert_eq!(q.attention_biases(), (true, false));
        assert_eq!(q.attention_window(), None);
        let m = cfg(r#", "model_type": "mistral", "sliding_window": 4, "attention_bias": true"#);
        assert_eq!(m.attention_biases(), (false, false));
        assert_eq!(m.attention_window(), Some(4));
        let l = cfg(r#", "model_type": "llama", "attention_bias": true, "mlp_bias": true"#);
        assert_eq!(l.attention_biases(), (true, true));
        assert!(l.mlp_biases());
    }

    #[test]
    fn eos_may_be_one_id_or_a_list() {
        assert_eq!(cfg(r#", "eos_token_id": 2"#).eos_token_ids(), vec![2]);
        assert_eq!(
            cfg(r#", "eos_token_id": [2, 7]"#).eos_token_ids(),
            vec![2, 7]
        );
    }
}
