//! Sequence-classification training: labelled JSONL, batches for a
//! [`Classifier`](crate::models::Classifier), the AdamW loop with cross-entropy, and accuracy.
//!
//! Each non-blank line is `{"text": "...", "label": 1}` (tokenised with the model's
//! `tokenizer.json`, special tokens added) or `{"input_ids": [...], "label": 1}`; `label` is an
//! integer in `0..num_labels`. Batches are right-padded with the model's pad id, with an
//! attention mask. The loss is transformers' mean cross-entropy
//! ([`classification_loss`](crate::models::classification_loss)); one optimizer step per batch:
//! `g = ∇loss`, global-norm clipping, AdamW with the schedule's learning rate.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use serde_json::Value;

use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::Schedule;
use crate::error::{Error, Result};
use crate::models::{classification_loss, Classifier, ClassifierInputs};

/// One labelled example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labeled {
    /// Token ids (special tokens included).
    pub input_ids: Vec<u32>,
    /// The class index.
    pub label: i64,
}

/// Reads labelled JSONL (see the module doc); `tokenizer` is needed for `"text"` lines,
/// `max_len` truncates on the right. A bad line is an error naming the file and line.
pub fn load_labeled(
    path: &Path,
    tokenizer: Option<&tokenizers::Tokenizer>,
    num_labels: usize,
    vocab_size: usize,
    max_len: Option<usize>,
) -> Result<Vec<Labeled>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, reason: String| Error::BadJson {
        path: path.into(),
        reason: format!("line {line}: {reason}"),
    };
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(n, e.to_string()))?;
        let label = v
            .get("label")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad(n, "no integer \"label\"".into()))?;
        if label < 0 || label as usize >= num_labels {
            return Err(bad(
                n,
                format!("label {label} is outside 0..{num_labels} (the model's num_labels)"),
            ));
        }
        let mut ids: Vec<u32> = if let Some(t) = v.get("text").and_then(Value::as_str) {
            let tok = tokenizer
                .ok_or_else(|| bad(n, "a \"text\" line needs the model's tokenizer.json".into()))?;
            tok.encode(t, true)
                .map_err(|e| bad(n, format!("tokenizing: {e}")))?
                .get_ids()
                .to_vec()
        } else if let Some(a) = v.get("input_ids").and_then(Value::as_array) {
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&x| (x as usize) < vocab_size)
                        .map(|x| x as u32)
                        .ok_or_else(|| {
                            bad(
                                n,
                                format!("input_ids entry {x} is not an id < {vocab_size}"),
                            )
                        })
                })
                .collect::<Result<_>>()?
        } else {
            return Err(bad(n, "expected \"text\" or \"input_ids\"".into()));
        };
        if ids.is_empty() {
            return Err(bad(n, "no tokens".into()));
        }
        if let Some(m) = max_len {
            ids.truncate(m.max(1));
        }
        out.push(Labeled {
            input_ids: ids,
            label,
        });
    }
    if out.is_empty() {
        return Err(Error::BadJson {
            path: path.into(),
            reason: "no examples".into(),
        });
    }
    Ok(out)
}

/// Right-padded inputs `[b, t]` with their mask, and the labels `[b]`.
pub fn batch(examples: &[&Labeled], pad: u32, dev: &Device) -> Result<(ClassifierInputs, Tensor)> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for e in examples {
        let n = e.input_ids.len();
        ids.extend(
            e.input_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, t - n)),
        );
        mask.extend((0..t).map(|j| u32::from(j < n)));
    }
    let labels: Vec<i64> = examples.iter().map(|e| e.label).collect();
    Ok((
        ClassifierInputs {
            input_ids: Tensor::from_vec(ids, (b, t), dev)?,
            attention_mask: Some(Tensor::from_vec(mask, (b, t), dev)?),
            token_type_ids: None,
        },
        Tensor::from_vec(labels, b, dev)?,
    ))
}

/// Settings of [`train_classifier`].
#[derive(Debug, Clone)]
pub struct ClassifierTrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule over all steps.
    pub schedule: Schedule,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Examples per step.
    pub batch_size: usize,
    /// Passes over the data.
    pub epochs: usize,
    /// Seed of the data order.
    pub seed: u64,
}

/// What [`train_classifier`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassifierSummary {
    /// Optimizer steps.
    pub steps: usize,
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
    /// Wall time of the training loop, seconds.
    pub seconds: f64,
}

/// The model's pad id, or an error saying why a batch cannot be padded.
fn pad_of(model: &Classifier) -> Result<u32> {
    model.pad_id().ok_or_else(|| {
        Error::Config(
            "the model's config has no pad_token_id: set one to batch sequences (as transformers needs)"
                .into(),
        )
    })
}

/// Trains every trainable variable of `model` (adapters, `modules_to_save`, or all weights)
/// on `data`; `on_step(step, total, loss)` after each step.
pub fn train_classifier(
    model: &Classifier,
    data: &[Labeled],
    cfg: &ClassifierTrainConfig,
    on_step: &mut dyn FnMut(usize, usize, f64),
) -> Result<ClassifierSummary> {
    let dev = Device::Cpu;
    let pad = pad_of(model)?;
    let vars = model.builder().named_trainable_vars();
    if vars.is_empty() {
        return Err(Error::State(
            "nothing to train: the model has no trainable variable".into(),
        ));
    }
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    opt.set_no_decay(super::no_weight_decay);
    let bs = cfg.batch_size.max(1);
    let per_epoch = data.len().div_ceil(bs);
    let total = per_epoch * cfg.epochs;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let start = Instant::now();
    let mut step = 0;
    let mut epoch_losses = vec![];
    for _ in 0..cfg.epochs {
        let order = super::data::permutation(data.len(), &mut rng);
        let mut sum = 0.0;
        for chunk in order.chunks(bs) {
            let ex: Vec<&Labeled> = chunk.iter().map(|&i| &data[i]).collect();
            let (x, labels) = batch(&ex, pad, &dev)?;
            let (l, mut g) = match model.fused_step(&x, &labels)? {
                // The training engine (BERT); the gradients by variable.
                Some((l, grads)) => {
                    let mut by_id: std::collections::HashMap<_, Tensor> = grads
                        .into_iter()
                        .map(|(v, g)| (v.as_tensor().id(), g))
                        .collect();
                    let g: Vec<Option<Tensor>> = vars
                        .iter()
                        .map(|(_, v)| by_id.remove(&v.as_tensor().id()))
                        .collect();
                    (l, g)
                }
                None => {
                    let loss = classification_loss(&model.logits(&x, true)?, &labels)?;
                    let grads = loss.backward()?;
                    let g: Vec<Option<Tensor>> = vars
                        .iter()
                        .map(|(_, v)| grads.get(v.as_tensor()).cloned())
                        .collect();
                    (f64::from(loss.to_scalar::<f32>()?), g)
                }
            };
            if cfg.max_grad_norm > 0.0 {
                clip_grad_norm(&mut g, cfg.max_grad_norm)?;
            }
            let lr = cfg.schedule.lr(cfg.lr, step, cfg.warmup_steps, total);
            opt.step(&g, lr)?;
            step += 1;
            sum += l;
            on_step(step, total, l);
        }
        epoch_losses.push(sum / per_epoch.max(1) as f64);
    }
    Ok(ClassifierSummary {
        steps: step,
        epoch_losses,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Mean loss and accuracy of `model` on `data` (no dropout), in batches of `batch_size`.
pub fn evaluate_classifier(
    model: &Classifier,
    data: &[Labeled],
    batch_size: usize,
) -> Result<(f64, f64)> {
    let dev = Device::Cpu;
    let pad = pad_of(model)?;
    let (mut loss, mut right) = (0.0, 0usize);
    for chunk in data.chunks(batch_size.max(1)) {
        let ex: Vec<&Labeled> = chunk.iter().collect();
        let (x, labels) = batch(&ex, pad, &dev)?;
        let logits = match model.fused_logits(&x)? {
            Some(l) => l,
            None => model.logits(&x, false)?.detach(),
        };
        loss +=
            f64::from(classification_loss(&logits, &labels)?.to_scalar::<f32>()?) * ex.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        right += pred
            .iter()
            .zip(&ex)
            .filter(|(p, e)| i64::from(**p) == e.label)
            .count();
    }
    let n = data.len().max(1) as f64;
    Ok((loss / n, right as f64 / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_right_with_a_mask() {
        let a = Labeled {
            input_ids: vec![5, 6, 7],
            label: 1,
        };
        let b = Labeled {
            input_ids: vec![8],
            label: 0,
        };
        let (x, l) = batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            x.input_ids.to_vec2::<u32>().unwrap(),
            [[5, 6, 7], [8, 0, 0]]
        );
        assert_eq!(
            x.attention_mask.unwrap().to_vec2::<u32>().unwrap(),
            [[1, 1, 1], [1, 0, 0]]
        );
        assert_eq!(l.to_vec1::<i64>().unwrap(), [1, 0]);
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"input_ids\": [1, 2], \"label\": 1}\n{\"input_ids\": [1], \"label\": 3}\n",
        )
        .unwrap();
        let e = load_labeled(&p, None, 2, 10, None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("label 3"), "{e}");
        std::fs::write(&p, "{\"text\": \"hi\", \"label\": 0}\n").unwrap();
        let e = load_labeled(&p, None, 2, 10, None).unwrap_err().to_string();
        assert!(e.contains("tokenizer"), "{e}");
    }
}
