//! [`Bert`]: the BERT-family encoder (`BertModel`, `BertForSequenceClassification`, and the
//! sentence-transformers layout of the same weights without the `bert.` prefix) as transformers
//! computes it, every linear and embedding built through [`LoraBuilder`] under transformers'
//! module names, so a PEFT adapter lands exactly where PEFT puts it.
//!
//! ```text
//! x₀ = LN(word_embeddings[ids] + position_embeddings[0..t] + token_type_embeddings[tt])   [b, t, H]
//! per layer (post-LayerNorm):
//!     a = attention.output.dense(Attn(query(x), key(x), value(x)))
//!     x = attention.output.LayerNorm(x + a)
//!     m = output.dense(act(intermediate.dense(x)))
//!     x = output.LayerNorm(x + m)
//! pooled = tanh(pooler.dense(x[:, 0]))                                                  [b, H]
//! logits = classifier(pooled)                                                          [b, L]
//!
//! LN(x)  = w ⊙ (x − mean(x)) / √(var(x) + ε) + b        (biased variance, over the last dim)
//! Attn   = softmax(q·kᵀ/√d + m) · v,  m = 0 for real tokens, f32::MIN for padding keys (bidirectional)
//! act    = gelu (erf form, transformers' "gelu"), or the tanh form for "gelu_new" /
//!          "gelu_pytorch_tanh", or relu
//! ```
//!
//! Every op is differentiable: the LayerNorm and the softmax are composed from candle's primitive
//! ops (candle-nn's fused `layer_norm`/`softmax_last_dim` have no backward and are not used), so
//! gradients reach the LoRA factors and any `modules_to_save` copy; the frozen weights are plain
//! tensors and get none. Dropout (hidden and attention) is not applied: only the adapters' own
//! dropout is, in training. Only absolute position embeddings are supported.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::llama::LoraInit;
use crate::adapter::Adapter;
use crate::builder::LoraBuilder;
use crate::error::{Error, Result};
use crate::layers::{LoraEmbedding, LoraLinear, Mergeable};
use crate::model_weights::Checkpoint;

mod engine;

/// The BERT architectures [`Bert`] implements, by their transformers class name.
pub const BERT_ARCHITECTURES: &[&str] = &["BertModel", "BertForSequenceClassification"];

/// A BERT `config.json` (transformers' field names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width H.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// The MLP activation: `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh form) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Rows of `position_embeddings`: the longest input.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// Rows of `token_type_embeddings`.
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// LayerNorm ε.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The padding id (used to pad batches; the attention mask hides the padding).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Only `absolute` is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// The transformers class names.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `bert` (or a BERT-compatible type).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Classifier outputs; defaults to `id2label`'s size, else 2.
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Classifier label names by index.
    #[serde(default)]
    pub id2label: Option<serde_json::Map<String, Value>>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_positions() -> usize {
    512
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Reads `<dir>/config.json` (or the file itself) and checks that [`Bert`] implements it.
    pub fn from_dir(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(super::config::CONFIG_JSON)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| Error::BadJson {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|reason| Error::Unsupported { path: file, reason })?;
        Ok(cfg)
    }

    /// Checks the architecture, activation, position embeddings and head layout.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(a) = self.architectures.first() {
            if !BERT_ARCHITECTURES.contains(&a.as_str()) {
                return Err(format!(
                    "architecture `{a}` is not supported (supported: {})",
                    BERT_ARCHITECTURES.join(", ")
                ));
            }
        }
        self.activation()?;
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(p) => return Err(format!("position_embedding_type `{p}` is not supported")),
        }
        let h = self.num_attention_heads;
        if h == 0 || !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {h}",
                self.hidden_size
            ));
        }
        Ok(())
    }

    fn activation(&self) -> std::result::Result<Act, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Act::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Act::GeluTanh),
            "relu" => Ok(Act::Relu),
            a => Err(format!(
                "hidden_act `{a}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )),
        }
    }

    /// Whether the checkpoint is a `BertForSequenceClassification`.
    pub fn is_classifier(&self) -> bool {
        self.architectures
            .first()
            .is_some_and(|a| a == "BertForSequenceClassification")
    }

    /// The classifier's number of labels.
    pub fn num_labels(&self) -> usize {
        super::config::num_labels(self.num_labels, self.id2label.as_ref())
    }

    /// Whether a `config.json` describes a BERT model (by `model_type` or architecture).
    pub fn describes(cfg: &Value) -> bool {
        cfg.get("model_type").and_then(Value::as_str) == Some("bert")
            || cfg
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
                .is_some_and(|a| a.starts_with("Bert"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Act {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::GeluErf => x.gelu_erf()?,
            Act::GeluTanh => x.gelu()?,
            Act::Relu => x.relu()?,
        })
    }
}

/// LayerNorm with weight and bias `[H]` (frozen, or trainable under full fine-tuning or
/// `modules_to_save`), composed from differentiable ops:
/// `y = w ⊙ (x − mean(x)) / √(mean((x − mean(x))²) + ε) + b`, computed in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A norm over the last dimension.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    fn load(vb: &LoraBuilder, h: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm::new(
            vb.tensor("weight", &[h])?,
            vb.tensor("bias", &[h])?,
            eps,
        ))
    }

    /// Normalises the last dimension of `x: [..., H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        let y = c.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// `softmax` over the last dimension, composed (the max is a constant shift, detached).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

#[derive(Debug, Clone)]
struct Layer {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    attn_out: LoraLinear,
    attn_norm: LayerNorm,
    intermediate: LoraLinear,
    output: LoraLinear,
    out_norm: LayerNorm,
}

impl Layer {
    fn load(vb: &LoraBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let att = vb.pp("attention");
        let sa = att.pp("self");
        Ok(Layer {
            query: sa.pp("query").linear(h, h, true)?,
            key: sa.pp("key").linear(h, h, true)?,
            value: sa.pp("value").linear(h, h, true)?,
            attn_out: att.pp("output").pp("dense").linear(h, h, true)?,
            attn_norm: LayerNorm::load(&att.pp("output").pp("LayerNorm"), h, eps)?,
            intermediate: vb.pp("intermediate").pp("dense").linear(h, i, true)?,
            output: vb.pp("output").pp("dense").linear(i, h, true)?,
            out_norm: LayerNorm::load(&vb.pp("output").pp("LayerNorm"), h, eps)?,
        })
    }

    /// `x: [b, t, H]`, `mask: [b, 1, 1, t]` additive.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        heads: usize,
        act: Act,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / heads;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.query.forward_t(x, train)?)?;
        let k = split(self.key.forward_t(x, train)?)?;
        let v = split(self.value.forward_t(x, train)?)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let p = softmax_last(&scores)?.to_dtype(v.dtype())?;
        let y = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let a = self.attn_out.forward_t(&y, train)?;
        let x = self.attn_norm.forward(&(x + a)?)?;
        let m = act.apply(&self.intermediate.forward_t(&x, train)?)?;
        let m = self.output.forward_t(&m, train)?;
        self.out_norm.forward(&(x + m)?)
    }

    fn linears_mut(&mut self) -> [&mut LoraLinear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

/// The BERT encoder with its optional pooler and classifier (see the module doc).
#[derive(Clone)]
pub struct Bert {
    cfg: BertConfig,
    word: LoraEmbedding,
    position: LoraEmbedding,
    token_type: LoraEmbedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<LoraLinear>,
    classifier: Option<LoraLinear>,
    act: Act,
    vb: LoraBuilder,
}

impl std::fmt::Debug for Bert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bert")
            .field("config", &self.cfg)
            .field("adapted_modules", &self.vb.adapted_modules())
            .finish_non_exhaustive()
    }
}

impl Bert {
    /// Builds the model from `vb` under transformers' names: `bert.embeddings...`,
    /// `bert.encoder.layer.{i}.attention.self.query`, ..., `bert.pooler.dense`, `classifier` for
    /// a `BertForSequenceClassification`; the same without `bert.` for a `BertModel` or a
    /// sentence-transformers folder. The pooler is loaded when the checkpoint has it (always for
    /// a classifier). Then checks with [`LoraBuilder::finish`] that a loaded adapter fits.
    pub fn load(cfg: &BertConfig, vb: &LoraBuilder) -> Result<Self> {
        cfg.validate().map_err(super::config::unsupported)?;
        let act = cfg.activation().map_err(super::config::unsupported)?;
        let root = if vb.contains("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb.clone()
        };
        let h = cfg.hidden_size;
        let e = root.pp("embeddings");
        let word = e.pp("word_embeddings").embedding(cfg.vocab_size, h)?;
        let position = e
            .pp("position_embeddings")
            .embedding(cfg.max_position_embeddings, h)?;
        let token_type = e
            .pp("token_type_embeddings")
            .embedding(cfg.type_vocab_size, h)?;
        let emb_norm = LayerNorm::load(&e.pp("LayerNorm"), h, cfg.layer_norm_eps)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(&root.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let pool = root.pp("pooler").pp("dense");
        let pooler = if cfg.is_classifier() || pool.contains("weight") {
            Some(pool.linear(h, h, true)?)
        } else {
            None
        };
        let classifier = if cfg.is_classifier() {
            Some(vb.pp("classifier").linear(h, cfg.num_labels(), true)?)
        } else {
            None
        };
        vb.finish()?;
        Ok(Bert {
            cfg: cfg.clone(),
            word,
            position,
            token_type,
            emb_norm,
            layers,
            pooler,
            classifier,
            act,
            vb: vb.clone(),
        })
    }

    /// Opens a transformers (or sentence-transformers) model folder, loading weights as
    /// `dtype` on `device`, with LoRA as `lora` says (none: the plain model).
    pub fn open(dir: &Path, lora: Option<LoraInit>, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = BertConfig::from_dir(dir)?;
        let vb = LoraBuilder::new(Checkpoint::open(dir)?, dtype, device.clone());
        let vb = match lora {
            None => vb,
            Some(LoraInit::New(c)) => vb.with_config(c)?,
            Some(LoraInit::Adapter(a)) => vb.with_adapter(a)?,
        };
        Self::load(&cfg, &vb)
    }

    /// The model's config.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The builder the model was made with (its adapters, names and variables).
    pub fn builder(&self) -> &LoraBuilder {
        &self.vb
    }

    /// Every trainable variable (adapters' factors, `modules_to_save` copies, or all weights
    /// under full fine-tuning).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.vb.trainable_vars()
    }

    /// The adapters' current values in PEFT's form (to save after training).
    pub fn adapter(&self) -> Result<Adapter> {
        self.vb.adapter()
    }

    /// Whether the model has a classifier head.
    pub fn is_classifier(&self) -> bool {
        self.classifier.is_some()
    }

    /// The embedding output `LN(word[ids] + position[0..t] + token_type[tt])` `[b, t, H]`
    /// (`token_type_ids` zeros when `None`), checking the ids and the length.
    fn embed(&self, ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if !ids.dtype().is_int() {
            return Err(Error::State(format!(
                "token ids must be integers, got {:?}",
                ids.dtype()
            )));
        }
        if t > self.cfg.max_position_embeddings {
            return Err(Error::State(format!(
                "input of {t} tokens is longer than max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let dev = ids.device();
        let pos = Tensor::arange(0u32, t as u32, dev)?;
        let tt = match token_type_ids {
            Some(tt) => tt.clone(),
            None => Tensor::zeros((b, t), DType::U32, dev)?,
        };
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?
            .add(&self.token_type.forward(&tt)?)?;
        self.emb_norm.forward(&x)
    }

    /// The last hidden state `[b, t, H]` for `ids: [b, t]`, with `token_type_ids: [b, t]`
    /// (zeros when `None`) and `attention_mask: [b, t]` (1 for tokens, 0 for padding; all
    /// ones when `None`). `train` enables the adapters' dropout.
    pub fn encode(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dev = ids.device();
        let mut x = self.embed(ids, token_type_ids)?;
        let mask = match attention_mask {
            Some(m) => {
                // (1 − m) · f32::MIN, as transformers' eager extended mask.
                let keep = m.to_dtype(DType::F32)?;
                ((1.0 - keep)? * f64::from(f32::MIN))?.reshape((b, 1, 1, t))?
            }
            None => Tensor::zeros((b, 1, 1, t), DType::F32, dev)?,
        };
        let heads = self.cfg.num_attention_heads;
        for l in &self.layers {
            x = l.forward(&x, &mask, heads, self.act, train)?;
        }
        Ok(x)
    }

    /// The pooler output `tanh(pooler.dense(x[:, 0]))` `[b, H]`.
    pub fn pool(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let p = self
            .pooler
            .as_ref()
            .ok_or_else(|| Error::State("this checkpoint has no pooler (pooler.dense)".into()))?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(p.forward_t(&cls, train)?.tanh()?)
    }

    /// `classifier(pool(·))`: logits `[b, num_labels]` (f32) of the last hidden state.
    fn head_logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.classifier.as_ref().ok_or_else(|| {
            Error::State("classify needs a BertForSequenceClassification checkpoint".into())
        })?;
        let pooled = self.pool(hidden, train)?;
        Ok(c.forward_t(&pooled, train)?.to_dtype(DType::F32)?)
    }

    /// Sequence classification: logits `[b, num_labels]` (f32) of `classifier(pool(encode))`.
    pub fn classify(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        if self.classifier.is_none() {
            return Err(Error::State(
                "classify needs a BertForSequenceClassification checkpoint".into(),
            ));
        }
        let x = self.encode(ids, token_type_ids, attention_mask, train)?;
        self.head_logits(&x, train)
    }

    fn mergeables_mut(&mut self) -> Vec<&mut dyn Mergeable> {
        let mut v: Vec<&mut dyn Mergeable> =
            vec![&mut self.word, &mut self.position, &mut self.token_type];
        for l in &mut self.layers {
            v.extend(l.linears_mut().into_iter().map(|l| l as &mut dyn Mergeable));
        }
        for h in [&mut self.pooler, &mut self.classifier]
            .into_iter()
            .flatten()
        {
            v.push(h);
        }
        v
    }

    /// Folds every adapter into its frozen weight.
    pub fn merge_adapters(&mut self) -> Result<()> {
        self.mergeables_mut()
            .into_iter()
            .try_for_each(|m| m.merge())
    }

    /// Takes every adapter back out of its weight.
    pub fn unmerge_adapters(&mut self) -> Result<()> {
        self.mergeables_mut()
            .into_iter()
            .try_for_each(|m| m.unmerge())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_centres_scales_and_shifts() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 3.0], [2.0, 2.0]], &dev).unwrap();
        let w = Tensor::new(&[2f32, 1.0], &dev).unwrap();
        let b = Tensor::new(&[0.5f32, -0.5], &dev).unwrap();
        let y = LayerNorm::new(w, b, 0.0).forward(&x).unwrap();
        // Row 1: mean 2, var 1 → [−1, 1]; row 2: var 0 with ε = 0 gives 0/0, so use ε below.
        let r0 = y.get(0).unwrap().to_vec1::<f32>().unwrap();
        assert!((r0[0] - (-2.0 + 0.5)).abs() < 1e-6 && (r0[1] - 0.5).abs() < 1e-6);
        let x = Tensor::new(&[[2f32, 2.0]], &dev).unwrap();
        let y = LayerNorm::new(
            Tensor::new(&[1f32, 1.0], &dev).unwrap(),
            Tensor::new(&[0.25f32, 0.0], &dev).unwrap(),
            1e-5,
        )
        .forward(&x)
        .unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), [[0.25, 0.0]]);
    }

    #[test]
    fn softmax_is_exp_over_sum_and_gradients_flow() {
        let dev = Device::Cpu;
        let v = Var::new(&[[0f32, (2f32).ln(), f32::MIN]], &dev).unwrap();
        let p = softmax_last(v.as_tensor()).unwrap();
        let got = p.to_vec2::<f32>().unwrap();
        assert!((got[0][0] - 1.0 / 3.0).abs() < 1e-6 && (got[0][1] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(got[0][2], 0.0);
        // d p₀ / d x = p₀ (e₀ − p): [2/9, −2/9, 0].
        let g = p
            .narrow(1, 0, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!((g[0][0] - 2.0 / 9.0).abs() < 1e-6 && (g[0][1] + 2.0 / 9.0).abs() < 1e-6);
    }
}
