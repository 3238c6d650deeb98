//! [`Classifier`]: a sequence classifier of either family (`BertForSequenceClassification`, or
//! `LlamaForSequenceClassification` / Mistral / Qwen2), opened from a model folder by its
//! `config.json`, with one entry point for logits `[b, num_labels]` and transformers' loss.
//!
//! ```text
//! loss = −(1/N) Σᵢ log softmax(logits[i])[labels[i]]     over rows with labels[i] ≠ −100
//! ```
//! (`CrossEntropyLoss` with mean reduction, the `single_label_classification` problem type; the
//! log-softmax is composed of differentiable ops, its max detached.)

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};

use super::bert::{Bert, BertConfig};
use super::llama::{Llama, LoraInit};
use crate::builder::LoraBuilder;
use crate::error::{Error, Result};

/// A training batch's loss and the gradient of every trainable variable.
pub type LossAndGrads = (f64, Vec<(Var, Tensor)>);

/// A batch of classifier inputs, right-padded.
#[derive(Debug, Clone)]
pub struct ClassifierInputs {
    /// Token ids `[b, t]` (u32), padding with the model's pad id.
    pub input_ids: Tensor,
    /// 1 for tokens, 0 for padding `[b, t]` (BERT's attention mask; Llama-family models pool by
    /// the pad id, as transformers does, and attend causally).
    pub attention_mask: Option<Tensor>,
    /// BERT's segment ids `[b, t]` (zeros when `None`).
    pub token_type_ids: Option<Tensor>,
}

/// A sequence classifier of either family (see the module doc).
#[derive(Debug, Clone)]
pub enum Classifier {
    /// `BertForSequenceClassification`.
    Bert(Bert),
    /// `LlamaForSequenceClassification`, `MistralForSequenceClassification`,
    /// `Qwen2ForSequenceClassification`.
    Llama(Llama),
}

impl Classifier {
    /// Opens a `*ForSequenceClassification` model folder (the family from `config.json`'s
    /// `model_type` / `architectures`), weights as `dtype` on `device`, LoRA as `lora` says.
    pub fn open(dir: &Path, lora: Option<LoraInit>, dtype: DType, device: &Device) -> Result<Self> {
        let vb = LoraBuilder::new(
            crate::model_weights::Checkpoint::open(dir)?,
            dtype,
            device.clone(),
        );
        let vb = match lora {
            None => vb,
            Some(LoraInit::New(c)) => vb.with_config(c)?,
            Some(LoraInit::Adapter(a)) => vb.with_adapter(a)?,
        };
        Self::from_builder(dir, &vb)
    }

    /// Builds the classifier of the folder `dir` (its `config.json`) from `vb`, a builder over
    /// its weights (with LoRA, full fine-tuning, ...).
    pub fn from_builder(dir: &Path, vb: &LoraBuilder) -> Result<Self> {
        let file = dir.join(super::config::CONFIG_JSON);
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadJson {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        let m = if BertConfig::describes(&raw) {
            Classifier::Bert(Bert::load(&BertConfig::from_dir(dir)?, vb)?)
        } else {
            let cfg = super::config::LlamaConfig::from_dir(dir)?;
            Classifier::Llama(Llama::load(&cfg, vb)?)
        };
        if !m.is_classifier() {
            return Err(Error::Unsupported {
                path: file,
                reason: "not a *ForSequenceClassification checkpoint (no classifier head)".into(),
            });
        }
        Ok(m)
    }

    fn is_classifier(&self) -> bool {
        match self {
            Classifier::Bert(m) => m.is_classifier(),
            Classifier::Llama(m) => m.is_classifier(),
        }
    }

    /// Logits `[b, num_labels]` (f32); `train` enables the adapters' dropout.
    pub fn logits(&self, x: &ClassifierInputs, train: bool) -> Result<Tensor> {
        match self {
            Classifier::Bert(m) => m.classify(
                &x.input_ids,
                x.token_type_ids.as_ref(),
                x.attention_mask.as_ref(),
                train,
            ),
            Classifier::Llama(m) => m.classify(&x.input_ids, train),
        }
    }

    /// One training batch by the training engine: the mean classification loss of `x`
    /// against `labels: [b]` and the gradient of every trainable variable, the adapters'
    /// dropout on; `None` where the engine does not apply (then use [`Classifier::logits`],
    /// [`classification_loss`] and autograd, which give the same values).
    pub fn fused_step(
        &self,
        x: &ClassifierInputs,
        labels: &Tensor,
    ) -> Result<Option<LossAndGrads>> {
        match self {
            Classifier::Bert(m) => m.fused_classify_step(
                &x.input_ids,
                x.token_type_ids.as_ref(),
                x.attention_mask.as_ref(),
                labels,
            ),
            Classifier::Llama(m) => m.fused_classify_step(&x.input_ids, labels),
        }
    }

    /// Inference logits `[b, num_labels]` (no dropout) by the training engine's blocks,
    /// keeping no activation; `None` where the engine does not apply (then use
    /// [`Classifier::logits`], which gives the same values).
    pub fn fused_logits(&self, x: &ClassifierInputs) -> Result<Option<Tensor>> {
        match self {
            Classifier::Bert(m) => m.fused_classify_logits(
                &x.input_ids,
                x.token_type_ids.as_ref(),
                x.attention_mask.as_ref(),
            ),
            Classifier::Llama(m) => m.fused_classify_logits(&x.input_ids),
        }
    }

    /// The number of labels.
    pub fn num_labels(&self) -> usize {
        match self {
            Classifier::Bert(m) => m.config().num_labels(),
            Classifier::Llama(m) => m.config().num_labels(),
        }
    }

    /// The id that pads a batch (BERT: `pad_token_id`, default 0; Llama family: the config's
    /// `pad_token_id`, needed to batch).
    pub fn pad_id(&self) -> Option<u32> {
        match self {
            Classifier::Bert(m) => Some(m.config().pad_token_id.unwrap_or(0)),
            Classifier::Llama(m) => m.config().pad_token_id,
        }
    }

    /// The longest input the model takes, if bounded (BERT's position table).
    pub fn max_len(&self) -> Option<usize> {
        match self {
            Classifier::Bert(m) => Some(m.config().max_position_embeddings),
            Classifier::Llama(_) => None,
        }
    }

    /// The builder the model was made with.
    pub fn builder(&self) -> &LoraBuilder {
        match self {
            Classifier::Bert(m) => m.builder(),
            Classifier::Llama(m) => m.builder(),
        }
    }

    /// Every trainable variable.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.builder().trainable_vars()
    }

    /// Folds every adapter into its weight.
    pub fn merge_adapters(&mut self) -> Result<()> {
        match self {
            Classifier::Bert(m) => m.merge_adapters(),
            Classifier::Llama(m) => m.merge_adapters(),
        }
    }
}

/// transformers' classification loss (see the module doc): `logits: [b, n]`, `labels: [b]`
/// (integers; −100 skipped) → the mean cross-entropy, a scalar. No counted row gives 0.
pub fn classification_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, n) = logits.dims2()?;
    let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if labels.len() != b {
        return Err(Error::ShapeMismatch {
            key: "labels".into(),
            got: vec![labels.len()],
            what: format!("logits of shape [{b}, {n}]"),
        });
    }
    let mut rows = vec![];
    let mut targets = vec![];
    for (i, &l) in labels.iter().enumerate() {
        if l == crate::train::loss::IGNORE_INDEX {
            continue;
        }
        if l < 0 || l as usize >= n {
            return Err(Error::State(format!(
                "label {l} is out of range for a classifier with {n} labels"
            )));
        }
        rows.push(i as u32);
        targets.push(l as u32);
    }
    let dev = logits.device();
    if rows.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, dev)?);
    }
    let k = rows.len();
    let x = logits
        .to_dtype(DType::F32)?
        .index_select(&Tensor::from_vec(rows, k, dev)?, 0)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&Tensor::from_vec(targets, (k, 1), dev)?, 1)?;
    Ok((picked.sum_all()? * (-1.0 / k as f64))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_mean_negative_log_softmax_of_the_label_skipping_ignored_rows() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0f32, 0.0], [(3f32).ln(), 0.0], [5.0, 1.0]], &dev).unwrap();
        let labels = Tensor::new(&[0i64, 0, -100], &dev).unwrap();
        let l = classification_loss(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // (−ln ½ − ln ¾) / 2
        let want = -((0.5f32).ln() + (0.75f32).ln()) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        let bad = Tensor::new(&[2i64, 0, 0], &dev).unwrap();
        assert!(classification_loss(&logits, &bad).is_err());
    }
}
