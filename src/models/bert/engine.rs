//! BERT sequence classification in the training engine ([`crate::engine`]): the family's block
//! list, its head and the step that runs them.
//!
//! ```text
//! embedding (frozen, candle) → L × [ PostNormResidual(LN, SelfAttention(query, key, value,
//!     bidirectional, padding by length, no RoPE), attention.output.dense)
//!   → PostNormResidual(LN, GeluMlp(intermediate.dense, output.dense)) ]
//!   → head: tanh(pooler.dense(x[:, 0])) → classifier → mean cross-entropy (candle autograd on
//!     the b [CLS] rows: the head's own trainable weights and the [CLS] rows' gradient)
//! ```
//!
//! The head runs through [`Bert::head_logits`] (the same code as inference) on the `[CLS]`
//! rows only, so `modules_to_save` copies and any adapter of `pooler.dense` or `classifier`
//! get their gradients from candle's autograd on `[b, H]` tensors; the encoder layers, where
//! nearly all of the time goes, run the engine's blocks.
//!
//! The engine applies when the model is on the CPU in f32 with the erf GELU, no adapter is
//! merged or uses DoRA, every trainable variable is a `lora_A` / `lora_B` of an encoder linear
//! or belongs to the pooler or the classifier, and the attention mask is right padding;
//! otherwise [`Bert::fused_classify_step`] returns `None` and callers use autograd. Tested
//! against the autograd path (loss and every gradient) in `tests`.

use candle_core::{DType, Device, Tensor};

use super::{Act, Bert};
use crate::engine::blocks::{GeluMlp, PooledHead, PostNormResidual, SelfAttention};
use crate::engine::linear::{engine_runs, Lin};
use crate::engine::{covers, cpu_f32, train_step, Block, Cx, Stack};
use crate::error::{Error, Result};
use crate::kernels::attention::{Attention, Mask};
use crate::kernels::Isa;
use crate::layers::LoraLinear;
use crate::models::classification_loss;
use crate::models::classifier::LossAndGrads;

impl Bert {
    /// The encoder linears of layer `i`: `query, key, value, attention.output.dense,
    /// intermediate.dense, output.dense`.
    fn encoder_linears(&self, i: usize) -> [&LoraLinear; 6] {
        let l = &self.layers[i];
        [
            &l.query,
            &l.key,
            &l.value,
            &l.attn_out,
            &l.intermediate,
            &l.output,
        ]
    }

    /// Whether the engine applies to the model: for inference
    /// ([`Bert::fused_classify_logits`]) or, with `train`, for a training step
    /// ([`Bert::fused_classify_step`]; see the module doc). The mask is checked per batch.
    fn fused_applies(&self, train: bool) -> bool {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if self.act != Act::GeluErf || self.classifier.is_none() {
            return false;
        }
        for i in 0..self.layers.len() {
            let l = &self.layers[i];
            for n in [&l.attn_norm, &l.out_norm] {
                if !f32_cpu(&n.weight) || !f32_cpu(&n.bias) {
                    return false;
                }
            }
            if !self.encoder_linears(i).into_iter().all(engine_runs) {
                return false;
            }
        }
        // Every trainable variable has its gradient: encoder linears' factors or weights and
        // LayerNorms in the blocks; embeddings and the head through autograd.
        !train || !self.trainable_vars().is_empty()
    }

    /// The right-padded lengths of an attention mask `[b, t]` (all `t` without one); `None`
    /// when a row is not ones then zeros (the engine's padding is by length).
    fn lengths(b: usize, t: usize, attention_mask: Option<&Tensor>) -> Result<Option<Vec<usize>>> {
        let Some(m) = attention_mask else {
            return Ok(Some(vec![t; b]));
        };
        let rows: Vec<Vec<u32>> = m.to_dtype(DType::U32)?.to_vec2()?;
        let mut lens = Vec::with_capacity(b);
        for r in rows {
            let len = r.iter().take_while(|&&v| v == 1).count();
            if r[len..].iter().any(|&v| v != 0) {
                return Ok(None);
            }
            lens.push(len);
        }
        Ok(Some(lens))
    }

    /// Builds the encoder's blocks for a batch of `b` sequences of `t` tokens with the given
    /// lengths (borrowing every frozen weight for the call) and runs `f` on them.
    fn with_body<R>(
        &self,
        (b, t): (usize, usize),
        lens: &[usize],
        isa: Isa,
        f: impl FnOnce(&Stack) -> Result<R>,
    ) -> Result<R> {
        let cfg = &self.cfg;
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let eps = cfg.layer_norm_eps as f32;
        let mut tensors: Vec<&Tensor> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            tensors.extend([&l.attn_norm.weight, &l.attn_norm.bias]);
            tensors.extend([&l.out_norm.weight, &l.out_norm.bias]);
            for lin in self.encoder_linears(i) {
                tensors.push(lin.weight());
                if let Some(b) = lin.bias() {
                    tensors.push(b);
                }
            }
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let vars = self.trainable_vars();
        let var_of = |t: &Tensor| vars.iter().find(|v| v.as_tensor().id() == t.id()).cloned();
        let norm_vars = |n: &super::LayerNorm| var_of(&n.weight).zip(var_of(&n.bias));
        let mut next = guards.iter();
        let mut take = |what: &str| -> Result<&[f32]> {
            let g = next
                .next()
                .ok_or_else(|| Error::State("training engine: weight missing".into()))?;
            cpu_f32(g, what)
        };
        let attn = Attention {
            b,
            t,
            heads,
            kv_heads: heads,
            d: h / heads,
            mask: Mask::Bidirectional,
            lens: Some(lens),
            isa,
        };
        let mut body: Vec<Box<dyn Block>> = Vec::with_capacity(2 * self.layers.len());
        for i in 0..self.layers.len() {
            let (aw, ab) = (take("attention LayerNorm")?, take("attention LayerNorm")?);
            let (ow, ob) = (take("output LayerNorm")?, take("output LayerNorm")?);
            let mut lins = Vec::with_capacity(6);
            for lin in self.encoder_linears(i) {
                let w0 = take("linear weight")?;
                let bias = match lin.bias() {
                    Some(_) => Some(take("linear bias")?),
                    None => None,
                };
                lins.push(Lin::new(lin, w0, bias, self.vb.rng(), isa)?);
            }
            let [q, k, v, o, up, down]: [Lin; 6] = lins
                .try_into()
                .map_err(|_| Error::State("training engine: six linears".into()))?;
            let l = &self.layers[i];
            body.push(Box::new(PostNormResidual {
                weight: aw,
                bias: ab,
                vars: norm_vars(&l.attn_norm),
                eps,
                inner: Box::new(SelfAttention::new(q, k, v, o, attn, None)),
            }));
            body.push(Box::new(PostNormResidual {
                weight: ow,
                bias: ob,
                vars: norm_vars(&l.out_norm),
                eps,
                inner: Box::new(GeluMlp { up, down }),
            }));
        }
        let body = Stack { blocks: body };
        let out = f(&body);
        drop(body);
        out
    }

    /// The embedding output as f32 values `[b·t·H]`.
    fn embedded(&self, ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Vec<f32>> {
        Ok(self
            .embed(ids, token_type_ids)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// One training batch of sequence classification by the engine (see the module doc): the
    /// mean cross-entropy of `classify(ids, token_type_ids, attention_mask)` against
    /// `labels: [b]` (−100 skipped) and its gradient for every trainable variable, the
    /// adapters' dropout on. `None` when the engine does not apply; use autograd then. Same
    /// results as [`classification_loss`] of [`Bert::classify`] and its backward, to f32
    /// rounding.
    pub fn fused_classify_step(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<Option<LossAndGrads>> {
        if !self.fused_applies(true) {
            return Ok(None);
        }
        let (b, t) = ids.dims2()?;
        let Some(lens) = Self::lengths(b, t, attention_mask)? else {
            return Ok(None);
        };
        let isa = Isa::current();
        // The embeddings and their LayerNorm train under full fine-tuning: their gradients
        // come from autograd, given the gradient of the embedding output.
        let mut emb_ids: Vec<_> = [&self.word, &self.position, &self.token_type]
            .iter()
            .flat_map(|e| e.trainable_vars())
            .map(|v| v.as_tensor().id())
            .collect();
        emb_ids.extend([self.emb_norm.weight.id(), self.emb_norm.bias.id()]);
        let vars = self.trainable_vars();
        let emb_trains = vars.iter().any(|v| emb_ids.contains(&v.as_tensor().id()));
        let emb = self.embed(ids, token_type_ids)?.to_dtype(DType::F32)?;
        let x = emb.flatten_all()?.to_vec1::<f32>()?;
        let h = self.cfg.hidden_size;
        let loss = |cls: &Tensor| -> Result<Tensor> {
            let logits = self.head_logits(&cls.unsqueeze(1)?, true)?;
            classification_loss(&logits, labels)
        };
        let head = PooledHead {
            rows: (0..b).map(|i| i * t).collect(),
            hidden: h,
            loss: &loss,
            vars: vars.clone(),
        };
        let cx = Cx {
            n: b * t,
            isa,
            keep: true,
        };
        let (loss, mut grads, dx) = self.with_body((b, t), &lens, isa, |body| {
            train_step(&cx, body, &head, &x, emb_trains)
        })?;
        if let Some(dx) = dx {
            // d(Σ emb ⊙ dx)/dθ = the embedding parameters' gradients.
            let dx = Tensor::from_vec(dx, emb.shape(), emb.device())?;
            let g = (emb * dx)?.sum_all()?.backward()?;
            for v in vars
                .iter()
                .filter(|v| emb_ids.contains(&v.as_tensor().id()))
            {
                if let Some(gv) = g.get(v.as_tensor()) {
                    grads.push((v.clone(), gv.clone()));
                }
            }
        }
        // Every trainable variable must have its gradient; otherwise leave it to autograd.
        Ok(covers(&grads, &vars).then_some((loss, grads)))
    }

    /// Inference by the engine's blocks: the logits `[b, num_labels]` of
    /// [`Bert::classify`] without dropout, keeping no activation for a backward, whatever
    /// trains (full fine-tuning too). `None` where the engine does not apply (not f32 on the
    /// CPU, another activation than the erf GELU, a merged or DoRA adapter, left padding); same
    /// values as `classify(…, false)` to f32 rounding.
    pub fn fused_classify_logits(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if !self.fused_applies(false) {
            return Ok(None);
        }
        let (b, t) = ids.dims2()?;
        let Some(lens) = Self::lengths(b, t, attention_mask)? else {
            return Ok(None);
        };
        let isa = Isa::current();
        let x = self.embedded(ids, token_type_ids)?;
        let cx = Cx {
            n: b * t,
            isa,
            keep: false,
        };
        let y = self.with_body((b, t), &lens, isa, |body| body.infer(&cx, &x))?;
        let h = self.cfg.hidden_size;
        let mut rows = Vec::with_capacity(b * h);
        for i in 0..b {
            rows.extend_from_slice(&y[i * t * h..i * t * h + h]);
        }
        let cls = Tensor::from_vec(rows, (b, 1, h), &Device::Cpu)?;
        Ok(Some(self.head_logits(&cls, false)?.detach()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{LoraBuilder, MapSource};
    use crate::config::{InitLoraWeights, LoraConfig};
    use crate::models::BertConfig;

    /// A tiny random BERT classifier's config and weights (2 layers, hidden 16, 4 heads, 3
    /// labels).
    fn weights() -> (BertConfig, std::collections::BTreeMap<String, Tensor>) {
        let cfg: BertConfig = serde_json::from_str(
            r#"{"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 24, "max_position_embeddings": 12,
                "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                "architectures": ["BertForSequenceClassification"],
                "id2label": {"0": "a", "1": "b", "2": "c"}}"#,
        )
        .unwrap();
        let mut w = std::collections::BTreeMap::new();
        let rng = crate::layers::LoraRng::new(11);
        let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
            let t = crate::layers::normal(shape, std, &rng, &Device::Cpu).unwrap();
            w.insert(name, (t + f64::from(mean)).unwrap());
        };
        let (h, i) = (16, 24);
        put(
            "bert.embeddings.word_embeddings.weight".into(),
            &[40, h],
            0.5,
            0.0,
        );
        put(
            "bert.embeddings.position_embeddings.weight".into(),
            &[12, h],
            0.5,
            0.0,
        );
        put(
            "bert.embeddings.token_type_embeddings.weight".into(),
            &[2, h],
            0.5,
            0.0,
        );
        put("bert.embeddings.LayerNorm.weight".into(), &[h], 0.1, 1.0);
        put("bert.embeddings.LayerNorm.bias".into(), &[h], 0.1, 0.0);
        for l in 0..2 {
            let p = format!("bert.encoder.layer.{l}.");
            for (m, o, n) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                put(format!("{p}{m}.weight"), &[o, n], 0.3, 0.0);
                put(format!("{p}{m}.bias"), &[o], 0.1, 0.0);
            }
            for m in ["attention.output.LayerNorm", "output.LayerNorm"] {
                put(format!("{p}{m}.weight"), &[h], 0.1, 1.0);
                put(format!("{p}{m}.bias"), &[h], 0.1, 0.0);
            }
        }
        put("bert.pooler.dense.weight".into(), &[h, h], 0.3, 0.0);
        put("bert.pooler.dense.bias".into(), &[h], 0.1, 0.0);
        put("classifier.weight".into(), &[3, h], 0.3, 0.0);
        put("classifier.bias".into(), &[3], 0.1, 0.0);
        (cfg, w)
    }

    /// [`weights`] with LoRA on the given modules, `modules_to_save` on the classifier and
    /// adapter dropout `dropout`.
    fn model(targets: &[&str], dropout: f64) -> Bert {
        let (cfg, w) = weights();
        let mut lc = LoraConfig::new(4, 8.0, targets);
        lc.init_lora_weights = InitLoraWeights::Random;
        lc.lora_dropout = dropout;
        lc.modules_to_save = Some(vec!["classifier".into()]);
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu)
            .with_config(lc)
            .unwrap();
        Bert::load(&cfg, &vb).unwrap()
    }

    /// A right-padded batch of 3 sequences of up to 7 tokens, types and labels.
    fn batch() -> (Tensor, Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let ids = Tensor::new(
            &[
                [2u32, 7, 9, 30, 4, 3, 0],
                [2, 11, 5, 3, 0, 0, 0],
                [2, 8, 8, 21, 17, 6, 3],
            ],
            &dev,
        )
        .unwrap();
        let tt = Tensor::new(
            &[
                [0u32, 0, 0, 1, 1, 1, 0],
                [0, 0, 0, 0, 0, 0, 0],
                [0, 0, 1, 1, 1, 1, 1],
            ],
            &dev,
        )
        .unwrap();
        let mask = Tensor::new(
            &[
                [1u32, 1, 1, 1, 1, 1, 0],
                [1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 1, 1, 1],
            ],
            &dev,
        )
        .unwrap();
        (ids, tt, mask, Tensor::new(&[2i64, 0, 1], &dev).unwrap())
    }

    /// Loss and every gradient (adapters, the classifier copy, the pooler's adapter) agree
    /// with autograd through `classify` and `classification_loss`, relative 1e-5 of each
    /// tensor's largest magnitude, on every kernel target.
    fn check(m: &Bert) {
        let (ids, tt, mask, labels) = batch();
        let (seed, pos) = m.vb.rng().state();
        let logits = m.classify(&ids, Some(&tt), Some(&mask), true).unwrap();
        let loss = classification_loss(&logits, &labels).unwrap();
        let want = f64::from(loss.to_scalar::<f32>().unwrap());
        let g = loss.backward().unwrap();
        let vars = m.trainable_vars();
        for isa in Isa::supported() {
            m.vb.rng().restore(seed, pos);
            let (got, grads) = crate::kernels::with_isa(isa, || {
                m.fused_classify_step(&ids, Some(&tt), Some(&mask), &labels)
            })
            .unwrap()
            .unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{isa}: {got} vs {want}"
            );
            // Softmax ignores a shift shared by a row's scores, so the key bias's gradient is
            // exactly 0: both sides hold rounding noise only.
            let key_biases: Vec<_> = m
                .layers
                .iter()
                .filter_map(|l| l.key.bias().map(|b| b.id()))
                .collect();
            let what = format!("{isa}");
            crate::testutil::assert_grads_match(&what, &grads, &g, vars.len(), 1e-5, &key_biases);
        }
    }

    #[test]
    fn matches_autograd_every_encoder_linear_and_the_pooler() {
        check(&model(&["query", "key", "value", "dense"], 0.0));
    }

    #[test]
    fn matches_autograd_attention_only_with_dropout() {
        check(&model(&["query", "value"], 0.2));
    }

    /// Inference by the blocks gives `classify`'s logits without dropout (relative 1e-5),
    /// with adapters that have dropout, and draws nothing from the dropout stream.
    #[test]
    fn inference_matches_classify() {
        let m = model(&["query", "key", "value", "dense"], 0.3);
        let (ids, tt, mask, _) = batch();
        let want = m.classify(&ids, Some(&tt), Some(&mask), false).unwrap();
        let before = m.vb.rng().state();
        let got = m
            .fused_classify_logits(&ids, Some(&tt), Some(&mask))
            .unwrap()
            .unwrap();
        assert_eq!(m.vb.rng().state(), before);
        let (diff, scale) = crate::testutil::diff_and_scale(&got, &want);
        assert!(
            scale > 0.0 && diff <= 1e-5 * scale,
            "{diff} (scale {scale})"
        );
    }

    /// Full fine-tuning: every weight's gradient (encoder linears and LayerNorms in the
    /// blocks, embeddings and head through autograd) agrees with autograd.
    #[test]
    fn matches_autograd_full_finetuning() {
        let (cfg, w) = weights();
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu)
            .full_finetune()
            .unwrap();
        let full = Bert::load(&cfg, &vb).unwrap();
        assert!(full.trainable_vars().len() > 30);
        check(&full);
    }

    /// Left padding (not a prefix mask) is not the engine's: autograd.
    #[test]
    fn declines_what_it_does_not_cover() {
        let m = model(&["query", "value"], 0.0);
        let (ids, tt, _, labels) = batch();
        let left = Tensor::new(&[[0u32, 1, 1, 1, 1, 1, 1]; 3], &Device::Cpu).unwrap();
        assert!(m
            .fused_classify_step(&ids, Some(&tt), Some(&left), &labels)
            .unwrap()
            .is_none());
    }
}
