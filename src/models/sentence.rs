//! Sentence embeddings as sentence-transformers computes them for a BERT folder in its layout
//! (`modules.json`, `1_Pooling/config.json`, optional `2_Normalize`, `sentence_bert_config.json`),
//! such as all-MiniLM-L6-v2:
//!
//! ```text
//! h = Bert.encode(ids, mask)                                       [b, t, H]
//! cls  = h[:, 0]
//! max  = max_t (h masked to −1e9 on padding)
//! mean = Σ_t mask·h / max(Σ_t mask, 1e-9)
//! sqrt = Σ_t mask·h / √(Σ_t mask)
//! e = concat of the enabled modes, in that order                  [b, k·H]
//! e = e / max(‖e‖₂, 1e-12)        when modules.json has Normalize
//! ```
//!
//! Texts are tokenised with the folder's `tokenizer.json` (special tokens added), truncated to
//! `max_seq_length` from `sentence_bert_config.json` (else the position table's size).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use super::bert::Bert;
use super::llama::LoraInit;
use crate::error::{Error, Result};

/// The pooling of a sentence-transformers folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooling {
    /// `pooling_mode_cls_token`.
    pub cls: bool,
    /// `pooling_mode_max_tokens`.
    pub max: bool,
    /// `pooling_mode_mean_tokens`.
    pub mean: bool,
    /// `pooling_mode_mean_sqrt_len_tokens`.
    pub mean_sqrt_len: bool,
    /// L2 normalisation (a `Normalize` module in `modules.json`).
    pub normalize: bool,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadJson {
        path: path.into(),
        reason: e.to_string(),
    })
}

impl Pooling {
    /// Reads `modules.json` and its Pooling module's `config.json`; a folder without
    /// `modules.json` gets mean pooling without normalisation (sentence-transformers' default
    /// for a plain transformers model).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let modules_file = dir.join("modules.json");
        if !modules_file.is_file() {
            return Ok(Pooling {
                cls: false,
                max: false,
                mean: true,
                mean_sqrt_len: false,
                normalize: false,
            });
        }
        let modules: Vec<ModuleEntry> = read_json(&modules_file)?;
        let mut pooling = None;
        let mut normalize = false;
        for m in &modules {
            match m.kind.rsplit('.').next().unwrap_or("") {
                "Transformer" => {}
                "Pooling" => {
                    let file = dir.join(&m.path).join("config.json");
                    let p: PoolingFile = read_json(&file)?;
                    if p.pooling_mode_weightedmean_tokens || p.pooling_mode_lasttoken {
                        return Err(Error::Unsupported {
                            path: file,
                            reason: "weighted-mean and last-token pooling are not supported".into(),
                        });
                    }
                    pooling = Some(Pooling {
                        cls: p.pooling_mode_cls_token,
                        max: p.pooling_mode_max_tokens,
                        mean: p.pooling_mode_mean_tokens,
                        mean_sqrt_len: p.pooling_mode_mean_sqrt_len_tokens,
                        normalize: false,
                    });
                }
                "Normalize" => normalize = true,
                other => {
                    return Err(Error::Unsupported {
                        path: modules_file.clone(),
                        reason: format!("sentence-transformers module `{other}` is not supported"),
                    })
                }
            }
        }
        let mut p = pooling.ok_or_else(|| Error::Unsupported {
            path: modules_file.clone(),
            reason: "no Pooling module".into(),
        })?;
        if !(p.cls || p.max || p.mean || p.mean_sqrt_len) {
            return Err(Error::Unsupported {
                path: modules_file,
                reason: "the Pooling module enables no pooling mode".into(),
            });
        }
        p.normalize = normalize;
        Ok(p)
    }

    /// Pools `hidden: [b, t, H]` with `mask: [b, t]` (1 token, 0 padding) → `[b, k·H]`.
    pub fn apply(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = hidden.to_dtype(DType::F32)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, t, 1]
        let mut parts = vec![];
        if self.cls {
            parts.push(hidden.narrow(1, 0, 1)?.squeeze(1)?);
        }
        if self.max {
            let neg = ((1.0 - &m)? * -1e9)?;
            parts.push(hidden.broadcast_mul(&m)?.broadcast_add(&neg)?.max(1)?);
        }
        if self.mean || self.mean_sqrt_len {
            let sum = hidden.broadcast_mul(&m)?.sum(1)?; // [b, H]
            let n = m.sum(1)?; // [b, 1]
            if self.mean {
                parts.push(sum.broadcast_div(&n.clamp(1e-9, f64::MAX)?)?);
            }
            if self.mean_sqrt_len {
                parts.push(sum.broadcast_div(&n.sqrt()?)?);
            }
        }
        let e = Tensor::cat(&parts, 1)?;
        if !self.normalize {
            return Ok(e);
        }
        let norm = e
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(e.broadcast_div(&norm)?)
    }
}

/// A BERT sentence encoder: model, tokenizer, pooling and length limit (see the module doc).
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    pooling: Pooling,
    max_len: usize,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("pooling", &self.pooling)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl SentenceEncoder {
    /// Opens a sentence-transformers (or plain BERT) folder, with an adapter if given.
    pub fn open(dir: &Path, lora: Option<LoraInit>, device: &Device) -> Result<Self> {
        let bert = Bert::open(dir, lora, DType::F32, device)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            crate::train::data::load_tokenizer(&tok_path, bert.config().vocab_size)?;
        let pooling = Pooling::from_dir(dir)?;
        #[derive(Deserialize)]
        struct St {
            max_seq_length: Option<usize>,
        }
        let st = dir.join("sentence_bert_config.json");
        let max_len = if st.is_file() {
            read_json::<St>(&st)?.max_seq_length
        } else {
            None
        }
        .unwrap_or(bert.config().max_position_embeddings)
        .min(bert.config().max_position_embeddings);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| Error::State(format!("{}: {e}", tok_path.display())))?;
        tokenizer.with_padding(None);
        Ok(SentenceEncoder {
            bert,
            tokenizer,
            pooling,
            max_len,
        })
    }

    /// The pooling in use.
    pub fn pooling(&self) -> &Pooling {
        &self.pooling
    }

    /// Token ids of `text` as the model sees them: special tokens added, truncated to the
    /// length limit by the tokenizer's own truncation (room kept for the special tokens).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::State(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Embeddings `[n, k·H]` of `texts`, in batches of `batch` (padded, masked).
    pub fn embed(&self, texts: &[String], batch: usize) -> Result<Tensor> {
        let dev = Device::Cpu;
        let pad = self.bert.config().pad_token_id.unwrap_or(0);
        let mut out = vec![];
        for chunk in texts.chunks(batch.max(1)) {
            let rows = chunk
                .iter()
                .map(|t| self.tokenize(t))
                .collect::<Result<Vec<_>>>()?;
            let t = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let mut ids = Vec::with_capacity(rows.len() * t);
            let mut mask = Vec::with_capacity(rows.len() * t);
            for r in &rows {
                ids.extend(
                    r.iter()
                        .copied()
                        .chain(std::iter::repeat_n(pad, t - r.len())),
                );
                mask.extend((0..t).map(|j| u32::from(j < r.len())));
            }
            let ids = Tensor::from_vec(ids, (rows.len(), t), &dev)?;
            let mask = Tensor::from_vec(mask, (rows.len(), t), &dev)?;
            let h = self.bert.encode(&ids, None, Some(&mask), false)?;
            out.push(self.pooling.apply(&h, &mask)?);
        }
        if out.is_empty() {
            return Err(Error::State("no text to embed".into()));
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_skips_padding_and_normalises() {
        let dev = Device::Cpu;
        let h = Tensor::new(&[[[3f32, 0.0], [1.0, 4.0], [100.0, 100.0]]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 0]], &dev).unwrap();
        let mut p = Pooling {
            cls: false,
            max: false,
            mean: true,
            mean_sqrt_len: false,
            normalize: false,
        };
        assert_eq!(
            p.apply(&h, &mask).unwrap().to_vec2::<f32>().unwrap(),
            [[2.0, 2.0]]
        );
        p.normalize = true;
        let s = 0.5f32.sqrt();
        let got = p.apply(&h, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert!((got[0][0] - s).abs() < 1e-6 && (got[0][1] - s).abs() < 1e-6);
        p.normalize = false;
        p.cls = true;
        p.max = true;
        p.mean = false;
        let got = p.apply(&h, &mask).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, [[3.0, 0.0, 3.0, 4.0]]);
    }
}
