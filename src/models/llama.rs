//! [`Llama`]: the Llama-family decoder (Llama 1–3, Mistral, Qwen2) as transformers computes it,
//! every linear and embedding built through [`LoraBuilder`] under transformers' module names, so a
//! PEFT adapter lands exactly where PEFT puts it.
//!
//! ```text
//! x₀ = embed_tokens[ids]                                            [b, t, H]
//! per layer:  x += o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))   n = input_layernorm(x)
//!             x += down_proj(silu(gate_proj(n)) ⊙ up_proj(n))                  n = post_attention_layernorm(x)
//! logits = lm_head(norm(x))                                         [b, t, V] (f32)
//!
//! RMSNorm(x) = w ⊙ x / √(mean(x²) + ε)        (in f32, cast back before ⊙ w, as transformers)
//! RoPE(x)    = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x₁, x₂]) = [−x₂, x₁]
//!              angle(p, i) = p · θ^(−2i/d)    (Llama 3 scaling rescales the frequencies)
//! Attn       = softmax(q·kᵀ/√d + causal mask) · v, in f32; kv heads repeated h/kv times (GQA)
//! ```
//!
//! Every op is differentiable (candle-nn's fused norm, softmax and rope kernels, which have no
//! backward, are not used), so gradients reach the LoRA factors; the frozen weights are plain
//! tensors and get none. On the CPU in f32, RMSNorm, RoPE, the scaled masked softmax and the
//! SwiGLU gate run as fused ops of `crate::ops` with their own backward (tested against the composed
//! path); elsewhere the composed candle ops. Attention dropout
//! is not applied (it is 0 in every supported release). Mistral's `sliding_window` is applied
//! in the mask (a token sees the previous `sliding_window` positions, itself included); Qwen2's
//! optional window (`use_sliding_window`, off in released models) is refused by the config.
//!
//! Tied embeddings (`tie_word_embeddings` and no `lm_head.weight` in the checkpoint): the output
//! head is `x·Eᵀ` with `E` the embedding table as it currently is; when `embed_tokens` has an
//! adapter and is merged, the head sees the merged table, as PEFT's shared parameter does. A
//! config that targets `lm_head` gets LoRA on the head over the shared table, as PEFT wraps it
//! (`y = x·Eᵀ + s·(x·Aᵀ)·Bᵀ`); merging that head is refused, since PEFT's merge adds its ΔW to
//! the shared table and so changes the embeddings too.
//!
//! Sequence classification (`LlamaForSequenceClassification`, and the Mistral and Qwen2 ones):
//! no `lm_head`; a `score` linear `[num_labels, H]` (no bias) reads the final hidden state of
//! each row's last token that is not `pad_token_id` (transformers: the largest position whose
//! id differs from the pad id, position 0 when every id is the pad; with no pad id, the last
//! token), see [`Llama::classify`].
//!
//! Inference with a KV cache: [`Llama::forward_with_cache`] appends to a [`Cache`] and gives the
//! same logits as the full forward.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};

use super::config::{LlamaConfig, RopeConfig};
use super::CausalLm;
use crate::adapter::Adapter;
use crate::builder::LoraBuilder;
use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::layers::{LoraEmbedding, LoraLinear, Mergeable};
use crate::model_weights::Checkpoint;

mod batch;
mod engine;
pub use crate::engine::{FusedGrads, FusedOptions};
pub use batch::{BatchSeq, ServeAdapter};

/// How [`Llama::open`] adds LoRA: new adapters from a config, or a saved adapter.
#[derive(Debug, Clone)]
pub enum LoraInit {
    /// New adapters where the config targets (initialised by `init_lora_weights`, seed 0).
    New(LoraConfig),
    /// A loaded adapter (its factors become trainable variables).
    Adapter(Adapter),
}

impl From<LoraConfig> for LoraInit {
    fn from(c: LoraConfig) -> Self {
        LoraInit::New(c)
    }
}

impl From<Adapter> for LoraInit {
    fn from(a: Adapter) -> Self {
        LoraInit::Adapter(a)
    }
}

/// RMSNorm with a frozen (or, under full fine-tuning, trainable) weight `[H]`:
/// `y = w ⊙ (x / √(mean(x²) + ε))`, the normalisation in f32 and the product in `x`'s dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm with `weight: [H]`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// The weight `[H]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Normalises the last dimension of `x: [..., H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::fusable(x) && crate::ops::fusable(&self.weight) {
            // One fused pass each way (see `ops::rms_norm`); same math.
            let op = crate::ops::RmsNormOp::new(self.eps);
            return Ok(x.contiguous()?.apply_op2(&self.weight, op)?);
        }
        let dt = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        Ok(x32
            .broadcast_mul(&inv)?
            .to_dtype(dt)?
            .broadcast_mul(&self.weight)?)
    }
}

/// Rotary position embedding: the inverse frequencies `[d/2]` (Llama 3 scaled when asked).
#[derive(Debug, Clone)]
struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// `inv_freq[i] = θ^(−2i/d)`, then transformers' `_compute_llama3_parameters` if set.
    fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / cfg.theta.powf((2 * i) as f64 / head_dim as f64);
                cfg.llama3.map_or(f, |s| llama3_scale(f, &s)) as f32
            })
            .collect();
        Rope { inv_freq }
    }

    /// `cos` and `sin` of `[t, d]` angles for positions `offset..offset + t`, as `dtype`.
    fn cos_sin(&self, offset: usize, t: usize, dtype: DType, dev: &Device) -> Result<[Tensor; 2]> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half * 2);
        let mut sin = Vec::with_capacity(t * half * 2);
        for p in offset..offset + t {
            // emb = cat(freqs, freqs): both halves use the same angles.
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mk =
            |v| -> Result<Tensor> { Ok(Tensor::from_vec(v, (t, 2 * half), dev)?.to_dtype(dtype)?) };
        Ok([mk(cos)?, mk(sin)?])
    }
}

/// Llama 3's rescaling of one inverse frequency.
fn llama3_scale(f: f64, s: &super::config::Llama3Scaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / f;
    if wavelen < high_wavelen {
        f
    } else if wavelen > low_wavelen {
        f / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * f / s.factor + smooth * f
    }
}

/// `x ⊙ cos + rotate_half(x) ⊙ sin` for `x: [b, heads, t, d]`, `cos`/`sin`: `[t, d]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// The additive mask `[t, s]` (0 or −∞) for queries at positions `offset..offset + t` over keys
/// `0..s`, or `None` when nothing is masked (one new token, no window cut).
fn attention_mask(
    t: usize,
    offset: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let s = offset + t;
    let blocked = |i: usize, j: usize| j > i || window.is_some_and(|w| i - j >= w);
    if t == 1 && !(0..s).any(|j| blocked(offset, j)) {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(t * s);
    for i in offset..s {
        m.extend((0..s).map(|j| {
            if blocked(i, j) {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        }));
    }
    Ok(Some(Tensor::from_vec(m, (t, s), dev)?))
}

/// Self-attention with grouped-query heads: `q/k/v/o_proj`.
#[derive(Debug, Clone)]
struct Attention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// What one forward pass shares across layers: rope tables, mask, train flag.
struct Step<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    train: bool,
}

impl Attention {
    fn load(vb: &LoraBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let (qkv_bias, o_bias) = cfg.attention_biases();
        let hs = cfg.hidden_size;
        Ok(Attention {
            q: vb.pp("q_proj").linear(hs, h * d, qkv_bias)?,
            k: vb.pp("k_proj").linear(hs, kv * d, qkv_bias)?,
            v: vb.pp("v_proj").linear(hs, kv * d, qkv_bias)?,
            o: vb.pp("o_proj").linear(h * d, hs, o_bias)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x: [b, t, H]` → `[b, t, H]`; `kv` holds this layer's cached keys and values
    /// `[b, kv_heads, s, d]` (after RoPE) and is extended with the new ones.
    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let q = self.q.forward_t(x, step.train)?;
        let k = self.k.forward_t(x, step.train)?;
        let v = self.v.forward_t(x, step.train)?;
        let y = self.attend(q, k, v, step, kv)?;
        self.o.forward_t(&y, step.train)
    }

    /// Attention from the projections `q: [b, t, h·d]`, `k`, `v: [b, t, kv·d]` to the input of
    /// `o_proj` `[b, t, h·d]`: RoPE, the KV cache `kv` (extended), scaled masked softmax.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        step: &Step,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?) // [b, n, t, d]
        };
        let rope = |y: Tensor, n: usize| -> Result<Tensor> {
            if crate::ops::fusable(&y) && crate::ops::fusable(step.cos) {
                // Head transpose and RoPE in one op with its own backward (see `ops::rope`).
                let op = crate::ops::RopeOp {
                    heads: n,
                    cos: step.cos.contiguous()?,
                    sin: step.sin.contiguous()?,
                };
                return Ok(y.contiguous()?.apply_op1(op)?);
            }
            apply_rope(&heads(y, n)?, step.cos, step.sin)
        };
        let q = rope(q, h)?; // [b, h, t, d], contiguous
        let k = rope(k, kvh)?; // [b, kv, t, d]
        let v = heads(v, kvh)?.contiguous()?;
        let (k, v) = match kv {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let s = k.dim(2)?;
        let rep = h / kvh;
        // GQA without copying k/v: the `rep` query heads sharing a kv head become extra rows.
        let qg = q.reshape((b, kvh, rep * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let raw = qg.matmul(&k.t()?)?; // [b, kv, rep·t, s]
        if crate::ops::fusable(&raw) && step.mask.is_none_or(crate::ops::fusable) {
            // Scale, mask and softmax in one op with its own backward (see `ops::softmax`).
            let op = crate::ops::ScaledMaskedSoftmaxOp {
                scale: scale as f32,
                mask: step.mask.cloned(),
            };
            let p = raw.reshape((b, h, t, s))?.apply_op1(op)?;
            let y = p.reshape((b, kvh, rep * t, s))?.matmul(&v)?;
            let y = y
                .reshape((b, h, t, d))?
                .transpose(1, 2)?
                .reshape((b, t, h * d))?;
            return Ok(y);
        }
        let scores = (raw * scale)?;
        let scores = scores.reshape((b, h, t, s))?.to_dtype(DType::F32)?;
        let scores = match step.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
        let y = p.reshape((b, kvh, rep * t, s))?.matmul(&v)?; // [b, kv, rep·t, d]
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        Ok(y)
    }

    fn linears_mut(&mut self) -> [&mut LoraLinear; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}

/// SwiGLU MLP: `down_proj(silu(gate_proj(x)) ⊙ up_proj(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

impl Mlp {
    fn load(vb: &LoraBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (hs, is, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_biases());
        Ok(Mlp {
            gate: vb.pp("gate_proj").linear(hs, is, bias)?,
            up: vb.pp("up_proj").linear(hs, is, bias)?,
            down: vb.pp("down_proj").linear(is, hs, bias)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let g = self.gate.forward_t(x, train)?;
        let u = self.up.forward_t(x, train)?;
        self.down.forward_t(&swiglu(&g, &u)?, train)
    }
}

/// `silu(g) ⊙ u`: on the CPU in f32 one op with its own backward (see `ops::swiglu`).
fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if crate::ops::fusable(g) && crate::ops::fusable(u) {
        return Ok(g
            .contiguous()?
            .apply_op2(&u.contiguous()?, crate::ops::SwiGluOp)?);
    }
    Ok((g.silu()? * u)?)
}

/// One decoder layer (pre-norm residual attention, then pre-norm residual MLP).
#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(vb: &LoraBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let norm = |name: &str| -> Result<RmsNorm> {
            let w = vb.pp(name).tensor("weight", &[cfg.hidden_size])?;
            Ok(RmsNorm::new(w, cfg.rms_norm_eps))
        };
        Ok(Block {
            input_layernorm: norm("input_layernorm")?,
            attn: Attention::load(&vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(&vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward(&self.input_layernorm.forward(x)?, step, kv)?;
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, step.train)?;
        Ok((x + m)?)
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        let Mlp { gate, up, down } = &mut self.mlp;
        self.attn.linears_mut().into_iter().chain([gate, up, down])
    }
}

/// The tied output head `x·Eᵀ`: `x: [b, t, H]`, `E: [V, H]` → `[b, t, V]`, as one 2-D matmul.
fn tied_head(x: &Tensor, table: &Tensor) -> Result<Tensor> {
    let (b, t, hs) = x.dims3()?;
    let y = x.reshape((b * t, hs))?.matmul(&table.t()?)?;
    Ok(y.reshape((b, t, table.dim(0)?))?)
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl Cache {
    /// An empty cache for `model`.
    pub fn new(model: &Llama) -> Self {
        Cache {
            layers: vec![None; model.layers.len()],
            len: 0,
        }
    }

    /// Number of positions cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// The Llama-family causal LM (see the module doc).
#[derive(Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: LoraEmbedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens` (and not targeted), or the model is a classifier.
    lm_head: Option<LoraLinear>,
    /// The head is an adapted linear over the tied embedding table.
    tied_lora_head: bool,
    /// The classifier head `score` of a `*ForSequenceClassification`.
    score: Option<LoraLinear>,
    rope: Rope,
    window: Option<usize>,
    vb: LoraBuilder,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.cfg)
            .field("adapted_modules", &self.vb.adapted_modules())
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Builds the model from `vb` (a builder over the checkpoint, with or without LoRA) under
    /// transformers' names (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, ...,
    /// `lm_head`), then checks with [`LoraBuilder::finish`] that a loaded adapter fits.
    pub fn load(cfg: &LlamaConfig, vb: &LoraBuilder) -> Result<Self> {
        cfg.validate().map_err(super::config::unsupported)?;
        let m = vb.pp("model");
        let embed = m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(&m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            m.pp("norm").tensor("weight", &[cfg.hidden_size])?,
            cfg.rms_norm_eps,
        );
        let (lm_head, score) = if cfg.is_classifier() {
            let score = vb
                .pp("score")
                .linear(cfg.hidden_size, cfg.num_labels(), false)?;
            (None, Some(score))
        } else {
            (Self::load_head(cfg, vb, &embed)?, None)
        };
        let tied_lora_head = cfg.tie_word_embeddings
            && lm_head.as_ref().is_some_and(|h| h.lora().is_some())
            && !vb.has_tensor("lm_head.weight");
        vb.finish()?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            tied_lora_head,
            score,
            rope: Rope::new(&cfg.rope()?, cfg.head_dim()),
            window: cfg.attention_window(),
            vb: vb.clone(),
        })
    }

    /// `lm_head`, or `None` when tied, the checkpoint has no `lm_head.weight` and the config
    /// does not target `lm_head`. A targeted tied head is a LoRA linear over the embedding table,
    /// as PEFT wraps it (`tuners/lora/model.py` `_create_and_replace`: the tied `nn.Linear` gets
    /// a `lora.Linear` whose base weight is the shared parameter).
    fn load_head(
        cfg: &LlamaConfig,
        vb: &LoraBuilder,
        embed: &LoraEmbedding,
    ) -> Result<Option<LoraLinear>> {
        let head = vb
            .pp("lm_head")
            .linear(cfg.hidden_size, cfg.vocab_size, false);
        match head {
            Err(Error::MissingTensor { key, .. })
                if cfg.tie_word_embeddings && key == "lm_head.weight" =>
            {
                let Some(lora) = vb.config() else {
                    return Ok(None);
                };
                if !lora.is_target("lm_head", crate::config::ModuleKind::Linear)? {
                    return Ok(None);
                }
                if lora.extra.get("ensure_weight_tying") == Some(&serde_json::Value::Bool(true)) {
                    return Err(Error::UnsupportedFeature {
                        feature: "ensure_weight_tying".into(),
                        detail: "ensure_weight_tying: true ties the LoRA weights of lm_head and \
                                 embed_tokens (PEFT's target_modules_to_tie)"
                            .into(),
                    });
                }
                if embed.lora().is_some() {
                    return Err(Error::UnsupportedFeature {
                        feature: "target_modules".into(),
                        detail: "embed_tokens and lm_head both targeted on a model with \
                                 tie_word_embeddings (PEFT warns that the shared weight makes \
                                 this ill-defined)"
                            .into(),
                    });
                }
                vb.pp("lm_head")
                    .tied_linear(embed.table().clone())
                    .map(Some)
            }
            other => other.map(Some),
        }
    }

    /// Opens a transformers model folder (`config.json` + safetensors weights), loading weights
    /// as `dtype` on `device`, with LoRA as `lora` says (none: the plain model).
    pub fn open(dir: &Path, lora: Option<LoraInit>, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_dir(dir)?;
        let vb = LoraBuilder::new(Checkpoint::open(dir)?, dtype, device.clone());
        let vb = match lora {
            None => vb,
            Some(LoraInit::New(c)) => vb.with_config(c)?,
            Some(LoraInit::Adapter(a)) => vb.with_adapter(a)?,
        };
        Self::load(&cfg, &vb)
    }

    /// The model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The builder the model was made with (its adapters, names and variables).
    pub fn builder(&self) -> &LoraBuilder {
        &self.vb
    }

    /// Every trainable variable (the adapters' A and B, or all weights under full fine-tuning).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.vb.trainable_vars()
    }

    /// Trainable variables with their names (`<module>.lora_A`, ...).
    pub fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        self.vb.named_trainable_vars()
    }

    /// The adapters' current values in PEFT's form (to save after training).
    pub fn adapter(&self) -> Result<Adapter> {
        self.vb.adapter()
    }

    /// The embedding, every linear layer and the head, for merging.
    fn mergeables_mut(&mut self) -> Vec<&mut dyn Mergeable> {
        let mut v: Vec<&mut dyn Mergeable> = vec![&mut self.embed];
        for b in &mut self.layers {
            v.extend(b.linears_mut().map(|l| l as &mut dyn Mergeable));
        }
        if let Some(h) = &mut self.lm_head {
            v.push(h);
        }
        if let Some(h) = &mut self.score {
            v.push(h);
        }
        v
    }

    /// Folds every adapter into its frozen weight (faster inference; training then errors).
    /// Refused for an adapted head tied to the embeddings (see the module doc).
    pub fn merge_adapters(&mut self) -> Result<()> {
        if self.tied_lora_head {
            return Err(Error::UnsupportedFeature {
                feature: "merge".into(),
                detail: "lm_head has an adapter and is tied to embed_tokens: PEFT's merge adds \
                         its update to the shared table, changing the embeddings too"
                    .into(),
            });
        }
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

    /// Logits `[b, t, V]` (f32) for `ids: [b, t]` at positions `offset..offset + t`, reading and
    /// extending `cache` when given.
    fn run(
        &self,
        ids: &Tensor,
        offset: usize,
        cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        if self.score.is_some() {
            return Err(Error::State(
                "this model is a sequence classifier (score head, no lm_head): use classify".into(),
            ));
        }
        let x = self.hidden(ids, offset, cache, train)?;
        let logits = match &self.lm_head {
            Some(h) => h.forward_t(&x, train)?,
            None => tied_head(&x, self.embed.table())?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Whether the model is a `*ForSequenceClassification` (see [`Llama::classify`]).
    pub fn is_classifier(&self) -> bool {
        self.score.is_some()
    }

    /// Sequence classification: `ids: [b, t]` → logits `[b, num_labels]` (f32), the `score`
    /// head on the final hidden state of each row's last non-pad token (see the module doc).
    /// `train` enables the adapters' dropout.
    pub fn classify(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let Some(score) = &self.score else {
            return Err(Error::State(
                "classify needs a *ForSequenceClassification checkpoint (a score head)".into(),
            ));
        };
        let (b, t) = ids.dims2()?;
        let last = self.pooled_positions(ids)?;
        let x = self.hidden(ids, 0, None, train)?; // [b, t, H]
        let hs = x.dim(2)?;
        let idx: Vec<u32> = last
            .iter()
            .enumerate()
            .map(|(i, &j)| (i * t) as u32 + j)
            .collect();
        let idx = Tensor::from_vec(idx, b, x.device())?;
        let pooled = x.reshape((b * t, hs))?.index_select(&idx, 0)?; // [b, H]
        Ok(score.forward_t(&pooled, train)?.to_dtype(DType::F32)?)
    }

    /// The position each sequence of `ids: [b, t]` is classified by, as transformers picks it:
    /// the last token that is not `pad_token_id` (0 when all are), or the last position for a
    /// single sequence without a `pad_token_id`.
    pub(crate) fn pooled_positions(&self, ids: &Tensor) -> Result<Vec<u32>> {
        let (b, t) = ids.dims2()?;
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        match self.cfg.pad_token_id {
            Some(pad) => Ok(rows
                .iter()
                .map(|r| {
                    // argmax(position · [id ≠ pad]): the first maximum, 0 when all are pads.
                    (0..t)
                        .rev()
                        .find(|&j| r[j] != i64::from(pad))
                        .map_or(0, |j| j as u32)
                })
                .collect()),
            None if b == 1 => Ok(vec![t.saturating_sub(1) as u32]),
            None => Err(Error::State(
                "cannot classify batches of more than one sequence: the config has no \
                 pad_token_id"
                    .into(),
            )),
        }
    }

    /// The final normed hidden states `[b, t, H]` for `ids: [b, t]` at positions
    /// `offset..offset + t`, reading and extending `cache` when given.
    fn hidden(
        &self,
        ids: &Tensor,
        offset: usize,
        mut cache: Option<&mut Cache>,
        train: bool,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if !ids.dtype().is_int() {
            return Err(Error::State(format!(
                "token ids must be integers, got {:?}",
                ids.dtype()
            )));
        }
        let mut x = self.embed.forward(ids)?; // [b, t, H]
        let dev = x.device().clone();
        let [cos, sin] = self.rope.cos_sin(offset, t, x.dtype(), &dev)?;
        let mask = attention_mask(t, offset, self.window, &dev)?;
        let step = Step {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            train,
        };
        for (i, block) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().and_then(|c| c.layers.get_mut(i));
            x = block.forward(&x, &step, kv)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.norm.forward(&x)
    }

    /// Inference with a KV cache: `ids: [b, t]` are the next `t` tokens after the `cache.len()`
    /// already seen; returns their logits `[b, t, V]` (f32) and appends their keys and values.
    pub fn forward_with_cache(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            return Err(Error::State(format!(
                "KV cache has {} layers, the model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let offset = cache.len;
        self.run(ids, offset, Some(cache), false)
    }
}

impl CausalLm for Llama {
    /// `ids: [b, t]` (integer) → logits `[b, t, V]` (f32), positions `0..t`; `train` enables
    /// the adapters' dropout.
    fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        self.run(ids, 0, None, train)
    }

    /// On the CPU in f32 with adapters only on the decoder linears (see
    /// `models::llama::engine`): the training engine's blocks, one pass each way over plain buffers, only the adapters'
    /// gradients computed.
    fn fused_loss_and_grads(
        &self,
        ids: &Tensor,
        labels: &Tensor,
        opts: FusedOptions,
    ) -> Result<Option<FusedGrads>> {
        self.fused_step(ids, labels, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::Llama3Scaling;
    use crate::testutil::max_abs_diff as max_abs;

    #[test]
    fn rms_norm_is_x_over_root_mean_square_times_weight() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 4.0], [1.0, -1.0]], &dev).unwrap();
        let w = Tensor::new(&[2f32, 0.5], &dev).unwrap();
        let y = RmsNorm::new(w, 0.0).forward(&x).unwrap();
        // rms([3, 4]) = √12.5, rms([1, −1]) = 1.
        let r = 12.5f32.sqrt();
        let want = Tensor::new(&[[6.0 / r, 2.0 / r], [2.0, -0.5]], &dev).unwrap();
        assert!(max_abs(&y, &want) < 1e-6);
    }

    #[test]
    fn rope_rotates_each_pair_by_position_times_frequency() {
        let dev = Device::Cpu;
        let cfg = RopeConfig {
            theta: 100.0,
            llama3: None,
        };
        let rope = Rope::new(&cfg, 4); // inv_freq = [1, 0.1]
        let [cos, sin] = rope.cos_sin(3, 1, DType::F32, &dev).unwrap();
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y = apply_rope(&x, &cos, &sin).unwrap().flatten_all().unwrap();
        // Pairs (x₀, x₂) and (x₁, x₃) rotate by angles 3·1 and 3·0.1.
        let (a, b) = (3f32, 0.3f32);
        let want = Tensor::new(
            &[
                a.cos() - 3.0 * a.sin(),
                2.0 * b.cos() - 4.0 * b.sin(),
                3.0 * a.cos() + a.sin(),
                4.0 * b.cos() + 2.0 * b.sin(),
            ],
            &dev,
        )
        .unwrap();
        assert!(max_abs(&y, &want) < 1e-6);
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_between() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let tau = 2.0 * std::f64::consts::PI;
        // Wavelength 100 < 8192/4: kept. Wavelength 10000 > 8192: divided by 8.
        assert_eq!(llama3_scale(tau / 100.0, &s), tau / 100.0);
        assert!((llama3_scale(tau / 10000.0, &s) - tau / 80000.0).abs() < 1e-15);
        // Wavelength 4096: smooth = (8192/4096 − 1)/3 = 1/3.
        let f = tau / 4096.0;
        let want = (2.0 / 3.0) * f / 8.0 + f / 3.0;
        assert!((llama3_scale(f, &s) - want).abs() < 1e-15);
    }

    /// Random weights for `cfg` (with q/k/v/o biases when `biases`), as a name → tensor map.
    pub(super) fn random_weights(
        cfg: &LlamaConfig,
        biases: bool,
    ) -> std::collections::BTreeMap<String, Tensor> {
        let rng = crate::layers::LoraRng::new(11);
        let dev = Device::Cpu;
        let (hs, is, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.num_kv_heads() * cfg.head_dim(),
        );
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![v, hs]),
            ("model.norm.weight".into(), vec![hs]),
        ];
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for (n, sh) in [
                ("self_attn.q_proj", vec![q, hs]),
                ("self_attn.k_proj", vec![kv, hs]),
                ("self_attn.v_proj", vec![kv, hs]),
                ("self_attn.o_proj", vec![hs, q]),
                ("mlp.gate_proj", vec![is, hs]),
                ("mlp.up_proj", vec![is, hs]),
                ("mlp.down_proj", vec![hs, is]),
            ] {
                if biases && n.starts_with("self_attn") {
                    shapes.push((format!("{p}.{n}.bias"), vec![sh[0]]));
                }
                shapes.push((format!("{p}.{n}.weight"), sh));
            }
            shapes.push((format!("{p}.input_layernorm.weight"), vec![hs]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![hs]));
        }
        shapes
            .into_iter()
            .map(|(n, sh)| {
                let t = crate::layers::normal(&sh, 0.3, &rng, &dev).unwrap();
                (n, t)
            })
            .collect()
    }

    pub(super) fn tiny(arch: &str, extra: &str) -> LlamaConfig {
        serde_json::from_str(&format!(
            r#"{{"architectures": ["{arch}"], "vocab_size": 32, "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2 {extra}}}"#
        ))
        .unwrap()
    }

    fn build(cfg: &LlamaConfig, w: std::collections::BTreeMap<String, Tensor>) -> Llama {
        let vb = LoraBuilder::new(crate::builder::MapSource::new(w), DType::F32, Device::Cpu);
        Llama::load(cfg, &vb).unwrap()
    }

    pub(super) fn ids() -> Tensor {
        Tensor::new(
            &[[3u32, 7, 1, 30, 12, 5], [0, 2, 9, 9, 31, 4]],
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn tied_head_equals_an_explicit_head_holding_the_embedding() {
        let cfg = tiny("Qwen2ForCausalLM", r#", "tie_word_embeddings": true"#);
        let w = random_weights(&cfg, true);
        let tied = build(&cfg, w.clone());
        assert!(tied.lm_head.is_none());
        let mut explicit = w;
        let e = explicit["model.embed_tokens.weight"].clone();
        explicit.insert("lm_head.weight".into(), e);
        let untied = build(&cfg, explicit);
        assert!(untied.lm_head.is_some());
        let (a, b) = (
            tied.forward_t(&ids(), false).unwrap(),
            untied.forward_t(&ids(), false).unwrap(),
        );
        assert!(max_abs(&a, &b) < 1e-5);
        // Qwen2 reads q/k/v biases (and no o_proj bias): a model without them fails to load.
        let vb = LoraBuilder::new(
            crate::builder::MapSource::new(random_weights(&cfg, false)),
            DType::F32,
            Device::Cpu,
        );
        let e = Llama::load(&cfg, &vb).unwrap_err().to_string();
        assert!(e.contains("model.layers.0.self_attn.q_proj.bias"), "{e}");
    }

    #[test]
    fn mistral_window_of_one_makes_each_position_attend_only_to_itself() {
        let llama = tiny("LlamaForCausalLM", "");
        let wide = tiny("MistralForCausalLM", r#", "sliding_window": 64"#);
        let one = tiny("MistralForCausalLM", r#", "sliding_window": 1"#);
        let mut w = random_weights(&llama, false);
        w.insert(
            "lm_head.weight".into(),
            crate::layers::normal(
                &[32, 16],
                0.3,
                &crate::layers::LoraRng::new(5),
                &Device::Cpu,
            )
            .unwrap(),
        );
        let ids = ids();
        let full = build(&llama, w.clone()).forward_t(&ids, false).unwrap();
        let wide = build(&wide, w.clone()).forward_t(&ids, false).unwrap();
        assert!(
            max_abs(&full, &wide) < 1e-6,
            "window ≥ length is full attention"
        );
        // With window 1 the token sees only itself, so its output does not depend on its
        // position or on earlier tokens: it equals the 1-token sequence's.
        let model = build(&one, w);
        let windowed = model.forward_t(&ids, false).unwrap();
        let alone = model
            .forward_t(&ids.flatten_all().unwrap().unsqueeze(1).unwrap(), false)
            .unwrap()
            .reshape(windowed.shape())
            .unwrap();
        assert!(max_abs(&windowed, &alone) < 1e-5);
        assert!(max_abs(&windowed, &full) > 1e-2);
    }

    #[test]
    fn mask_is_causal_with_offset_and_window() {
        let dev = Device::Cpu;
        let m = attention_mask(2, 1, None, &dev).unwrap().unwrap();
        let v = m.to_vec2::<f32>().unwrap();
        assert_eq!(v[0], [0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(v[1], [0.0, 0.0, 0.0]);
        assert!(attention_mask(1, 5, None, &dev).unwrap().is_none());
        // Window 2: position 3 sees 2 and 3 only.
        let w = attention_mask(1, 3, Some(2), &dev).unwrap().unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(w.to_vec2::<f32>().unwrap()[0], [ninf, ninf, 0.0, 0.0]);
    }
}
