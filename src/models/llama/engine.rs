//! Llama, Mistral and Qwen2 in the training engine ([`crate::engine`]): the family's block list
//! and the step that runs it.
//!
//! ```text
//! embedding → L × [ PreNormResidual(RMSNorm, SelfAttention(q,k,v (+bias), RoPE, GQA, causal
//!                   or sliding window), o)  →  PreNormResidual(RMSNorm, SwiGluMlp(gate, up, down)) ]
//!           → CausalLmHead(RMSNorm, lm_head (tied or not), cross-entropy)
//! ```
//!
//! Mistral differs from Llama only in its sliding window, Qwen2 in its q/k/v biases; both are
//! options of the same blocks. A `*ForSequenceClassification` model runs the same body with a
//! [`PooledHead`] instead of the LM head ([`Llama::fused_classify_step`]). With [`FusedOptions::gradient_checkpointing`] each decoder layer
//! is a [`Checkpointed`] block. The engine applies when the model is on the CPU in f32, every
//! trainable variable is a `lora_A` / `lora_B` of a decoder linear (`q/k/v/o_proj`,
//! `gate/up/down_proj`), no adapter uses DoRA (its magnitude vector is not in these blocks) and
//! no adapter is merged; otherwise [`Llama::fused_step`] returns `None` and callers use
//! autograd. Tested against the autograd path (loss and every gradient) for each family in
//! `tests`.

use std::collections::HashSet;

use candle_core::{DType, Tensor};

use super::Llama;
use crate::engine::blocks::{CausalLmHead, PooledHead, PreNormResidual, SelfAttention, SwiGluMlp};
use crate::engine::linear::{engine_runs, Lin};
use crate::engine::{
    covers, cpu_f32, train_step, Block, Checkpointed, Cx, FusedGrads, FusedOptions, Stack,
};
use crate::error::{Error, Result};
use crate::kernels::attention::{Attention, Mask};
use crate::kernels::embedding::embedding_forward;
use crate::kernels::Isa;
use crate::layers::LoraLinear;
use crate::models::classification_loss;
use crate::models::classifier::LossAndGrads;

impl Llama {
    /// The decoder linears of layer `i` in the order `q, k, v, o, gate, up, down`.
    fn linears(&self, i: usize) -> [&LoraLinear; 7] {
        let bl = &self.layers[i];
        let (a, m) = (&bl.attn, &bl.mlp);
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
    }

    /// Whether the engine applies (see the module doc): the decoder linears it can run, every
    /// trainable variable an adapter factor of one of them, or (`head_vars`) a variable of the
    /// classification head, which runs through autograd.
    fn engine_applies(&self, head_vars: bool) -> bool {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let mut allowed = HashSet::new();
        for i in 0..self.layers.len() {
            for lin in self.linears(i) {
                if !engine_runs(lin) {
                    return false;
                }
                if let Some(l) = lin.lora() {
                    allowed.insert(l.a.as_tensor().id());
                    allowed.insert(l.b.as_tensor().id());
                }
            }
        }
        if head_vars {
            let Some(score) = &self.score else {
                return false;
            };
            allowed.extend(score.trainable_vars().iter().map(|v| v.as_tensor().id()));
        }
        let vars = self.trainable_vars();
        !vars.is_empty()
            && vars.iter().all(|v| allowed.contains(&v.as_tensor().id()))
            && f32_cpu(self.embed.table())
            && f32_cpu(self.norm.weight())
    }

    /// Whether [`Llama::fused_step`] applies: a causal LM (no classification head) whose
    /// `lm_head` is frozen f32 on the CPU.
    fn fused_applies(&self) -> bool {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        self.score.is_none()
            && self.engine_applies(false)
            && self
                .lm_head
                .as_ref()
                .is_none_or(|h| f32_cpu(h.weight()) && h.lora().is_none())
    }

    /// The token ids of `ids: [b, t]` as u32, checked against the vocabulary.
    fn engine_ids(&self, ids: &Tensor) -> Result<Vec<u32>> {
        let vocab = self.cfg.vocab_size;
        let ids: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::State(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        Ok(ids)
    }

    /// Builds the decoder's blocks for `b` sequences of `t` tokens (borrowing every frozen
    /// weight for the call), embeds `ids` and runs `f(body, x, final norm weight, lm_head or
    /// tied table)`.
    fn with_body<R>(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        opts: FusedOptions,
        isa: Isa,
        f: impl FnOnce(&Stack, &[f32], &[f32], &[f32]) -> Result<R>,
    ) -> Result<R> {
        let cfg = &self.cfg;
        let head_w = self
            .lm_head
            .as_ref()
            .map_or(self.embed.table(), |h| h.weight());
        let mut tensors: Vec<&Tensor> = vec![self.embed.table(), self.norm.weight(), head_w];
        for (i, bl) in self.layers.iter().enumerate() {
            tensors.push(bl.input_layernorm.weight());
            tensors.push(bl.post_attention_layernorm.weight());
            for lin in self.linears(i) {
                tensors.push(lin.weight());
            }
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let d = |i: usize, what: &str| cpu_f32(&guards[i], what);
        let bias_guards: Vec<Vec<_>> = (0..self.layers.len())
            .map(|i| {
                self.linears(i)
                    .map(|l| l.bias().map(|b| b.storage_and_layout()))
                    .into()
            })
            .collect();

        let hd = cfg.head_dim();
        let (mut cos, mut sin) = (Vec::with_capacity(t * hd), Vec::with_capacity(t * hd));
        for p in 0..t {
            for _ in 0..2 {
                for f in &self.rope.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let attn = Attention {
            b,
            t,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            d: hd,
            mask: Mask::Causal {
                window: self.window,
            },
            lens: None,
            isa,
        };
        let eps = cfg.rms_norm_eps as f32;

        // The family: per decoder layer a pre-norm attention and a pre-norm SwiGLU MLP.
        let mut body: Vec<Box<dyn Block>> = Vec::with_capacity(2 * self.layers.len());
        for (i, biases) in bias_guards.iter().enumerate() {
            let base = 3 + i * 9;
            let lins = self.linears(i);
            let lin = |j: usize| -> Result<Lin> {
                let bias = biases[j].as_ref().map(|g| cpu_f32(g, "bias")).transpose()?;
                let w0 = d(base + 2 + j, "linear weight")?;
                Lin::new(lins[j], w0, bias, self.vb.rng(), isa)
            };
            let attention = PreNormResidual {
                norm: d(base, "input_layernorm")?,
                eps,
                inner: Box::new(SelfAttention::new(
                    lin(0)?,
                    lin(1)?,
                    lin(2)?,
                    lin(3)?,
                    attn,
                    Some((&cos, &sin)),
                )),
            };
            let mlp = PreNormResidual {
                norm: d(base + 1, "post_attention_layernorm")?,
                eps,
                inner: Box::new(SwiGluMlp {
                    gate: lin(4)?,
                    up: lin(5)?,
                    down: lin(6)?,
                }),
            };
            if opts.gradient_checkpointing {
                let layer = Stack {
                    blocks: vec![Box::new(attention), Box::new(mlp)],
                };
                body.push(Box::new(Checkpointed(Box::new(layer))));
            } else {
                body.push(Box::new(attention));
                body.push(Box::new(mlp));
            }
        }
        let x = embedding_forward(d(0, "embed_tokens")?, cfg.hidden_size, ids);
        let body = Stack { blocks: body };
        let out = f(&body, &x, d(1, "norm")?, d(2, "lm_head")?);
        drop(body);
        out
    }

    /// One training batch by the engine (see the module doc): the summed loss of
    /// `ids: [b, t]` against `labels: [b, t]` (transformers' shift, −100 skipped) and its
    /// gradient for every trainable variable. `None` when the engine does not apply to this
    /// model; use autograd then. Same results as
    /// `causal_lm_loss_sum(forward_t(ids, true), labels)` and its backward, to f32 rounding.
    pub(super) fn fused_step(
        &self,
        ids: &Tensor,
        labels: &Tensor,
        opts: FusedOptions,
    ) -> Result<Option<FusedGrads>> {
        if !self.fused_applies() {
            return Ok(None);
        }
        let isa = Isa::current();
        let (b, t) = ids.dims2()?;
        let vocab = self.cfg.vocab_size;
        let (rows, tg) = crate::models::loss::predicted_rows(labels, b, t, vocab)?;
        let mut targets = vec![None; b * t];
        for (r, tg) in rows.iter().zip(&tg) {
            targets[*r as usize] = Some(*tg);
        }
        let count = rows.len();
        let ids = self.engine_ids(ids)?;
        let cx = Cx {
            n: b * t,
            isa,
            keep: true,
        };
        let eps = self.cfg.rms_norm_eps as f32;
        let (loss_sum, grads, _) =
            self.with_body(&ids, (b, t), opts, isa, |body, x, norm, weight| {
                let head = CausalLmHead {
                    norm,
                    eps,
                    weight,
                    vocab,
                    targets,
                };
                train_step(&cx, body, &head, x, false)
            })?;
        Ok(Some(FusedGrads {
            loss_sum,
            count,
            grads,
        }))
    }

    /// One training batch of sequence classification by the engine: the mean cross-entropy
    /// of [`Llama::classify`]`(ids, true)` against `labels: [b]` (−100 skipped) and the
    /// gradient of every trainable variable. The decoder runs the engine's blocks; the pooled
    /// rows (the last token that is not `pad_token_id`), the final norm and `score` run through
    /// autograd on `[b, H]`. `None` when the engine does not apply; use autograd then. Same
    /// results as [`classification_loss`] of `classify` and its backward, to f32 rounding.
    pub fn fused_classify_step(
        &self,
        ids: &Tensor,
        labels: &Tensor,
    ) -> Result<Option<LossAndGrads>> {
        if !self.engine_applies(true) {
            return Ok(None);
        }
        let Some(score) = &self.score else {
            return Ok(None);
        };
        let isa = Isa::current();
        let (b, t) = ids.dims2()?;
        let last = self.pooled_positions(ids)?;
        let h = self.cfg.hidden_size;
        let ids = self.engine_ids(ids)?;
        let cx = Cx {
            n: b * t,
            isa,
            keep: true,
        };
        let loss = |pooled: &Tensor| -> Result<Tensor> {
            let logits = score.forward_t(&self.norm.forward(pooled)?, true)?;
            classification_loss(&logits.to_dtype(DType::F32)?, labels)
        };
        let head = PooledHead {
            rows: last
                .iter()
                .enumerate()
                .map(|(i, &j)| i * t + j as usize)
                .collect(),
            hidden: h,
            loss: &loss,
            vars: self.trainable_vars(),
        };
        let (loss, grads, _) = self.with_body(
            &ids,
            (b, t),
            FusedOptions::default(),
            isa,
            |body, x, _, _| train_step(&cx, body, &head, x, false),
        )?;
        // Every trainable variable must have its gradient; otherwise leave it to autograd.
        Ok(covers(&grads, &self.trainable_vars()).then_some((loss, grads)))
    }

    /// Inference by the engine's blocks: the logits `[b, num_labels]` of
    /// [`Llama::classify`]`(ids, false)` (no dropout), keeping no activation. `None` where
    /// the engine does not run the model (not f32 on the CPU, a merged or DoRA adapter, no
    /// `score` head); same values as `classify` to f32 rounding.
    pub fn fused_classify_logits(&self, ids: &Tensor) -> Result<Option<Tensor>> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let runs = (0..self.layers.len()).all(|i| self.linears(i).into_iter().all(engine_runs));
        let Some(score) = self.score.as_ref().filter(|_| runs) else {
            return Ok(None);
        };
        if !f32_cpu(self.embed.table()) || !f32_cpu(self.norm.weight()) {
            return Ok(None);
        }
        let isa = Isa::current();
        let (b, t) = ids.dims2()?;
        let last = self.pooled_positions(ids)?;
        let h = self.cfg.hidden_size;
        let ids = self.engine_ids(ids)?;
        let cx = Cx {
            n: b * t,
            isa,
            keep: false,
        };
        let opts = FusedOptions::default();
        let y = self.with_body(&ids, (b, t), opts, isa, |body, x, _, _| body.infer(&cx, x))?;
        let mut rows = Vec::with_capacity(b * h);
        for (i, &j) in last.iter().enumerate() {
            let r = i * t + j as usize;
            rows.extend_from_slice(&y[r * h..(r + 1) * h]);
        }
        let pooled = Tensor::from_vec(rows, (b, h), &candle_core::Device::Cpu)?;
        let logits = score.forward_t(&self.norm.forward(&pooled)?, false)?;
        Ok(Some(logits.to_dtype(DType::F32)?.detach()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{LoraBuilder, MapSource};
    use crate::config::{InitLoraWeights, LoraConfig};
    use crate::models::llama::tests::{ids, random_weights, tiny};
    use crate::models::loss::causal_lm_loss_sum;
    use crate::models::CausalLm;
    use candle_core::Device;

    fn lora_model(arch: &str, extra: &str, biases: bool, targets: &[&str]) -> Llama {
        lora_model_with(arch, extra, biases, targets, 0.0)
    }

    fn lora_model_with(
        arch: &str,
        extra: &str,
        biases: bool,
        targets: &[&str],
        dropout: f64,
    ) -> Llama {
        let cfg = tiny(arch, extra);
        let mut w = random_weights(&cfg, biases);
        if !cfg.tie_word_embeddings {
            let head = crate::layers::normal(
                &[cfg.vocab_size, cfg.hidden_size],
                0.3,
                &crate::layers::LoraRng::new(5),
                &Device::Cpu,
            )
            .unwrap();
            w.insert("lm_head.weight".into(), head);
        }
        let mut lc = LoraConfig::new(4, 8.0, targets);
        lc.init_lora_weights = InitLoraWeights::Random;
        lc.lora_dropout = dropout;
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu)
            .with_config(lc)
            .unwrap();
        Llama::load(&cfg, &vb).unwrap()
    }

    fn labels() -> Tensor {
        Tensor::new(
            &[[3i64, 7, -100, 30, 12, 5], [0, 2, 9, 9, -100, -100]],
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Loss and every adapter gradient agree with candle's autograd through the model's
    /// forward and the causal-LM loss: relative 1e-5 of each tensor's largest magnitude (f32,
    /// different summation orders), with the kernels on every target the CPU runs.
    fn check(model: &Llama) {
        check_on(model, &ids(), &labels());
    }

    fn check_on(model: &Llama, ids: &Tensor, labels: &Tensor) -> f64 {
        // Both passes draw the same dropout masks (same stream position, same order).
        let (seed, pos) = model.vb.rng().state();
        let logits = model.forward_t(ids, true).unwrap();
        let (sum, count) = causal_lm_loss_sum(&logits, labels).unwrap();
        let want = sum.to_scalar::<f32>().unwrap() as f64;
        let g = sum.backward().unwrap();
        let vars = model.trainable_vars();
        let mut loss = 0.0;
        for isa in Isa::supported() {
            model.vb.rng().restore(seed, pos);
            let fused = crate::kernels::with_isa(isa, || {
                model.fused_step(ids, labels, FusedOptions::default())
            })
            .unwrap()
            .unwrap();
            assert_eq!(fused.count, count);
            assert!(
                (fused.loss_sum - want).abs() <= 1e-5 * want.abs(),
                "{isa}: {} vs {want}",
                fused.loss_sum
            );
            assert_eq!(fused.grads.len(), vars.len());
            for (v, got) in &fused.grads {
                let want = g.get(v.as_tensor()).unwrap();
                let (diff, scale) = crate::ops::testing::diff_and_scale(got, want);
                assert!(scale > 0.0);
                assert!(
                    diff <= 1e-5 * scale,
                    "{isa}: gradient differs by {diff} (scale {scale})"
                );
            }
            loss = fused.loss_sum;
        }
        loss
    }

    const ALL: &[&str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];

    #[test]
    fn matches_autograd_llama_gqa_every_target() {
        check(&lora_model("LlamaForCausalLM", "", false, ALL));
    }

    #[test]
    fn matches_autograd_qwen2_biases_tied_head() {
        check(&lora_model(
            "Qwen2ForCausalLM",
            r#", "tie_word_embeddings": true"#,
            true,
            &["q_proj", "v_proj"],
        ));
    }

    #[test]
    fn matches_autograd_mistral_sliding_window() {
        check(&lora_model(
            "MistralForCausalLM",
            r#", "sliding_window": 3"#,
            false,
            &["k_proj", "o_proj", "down_proj"],
        ));
    }

    /// Sequences longer than two query blocks (of either size): later blocks see every
    /// earlier key, or with a sliding window only the last ones.
    #[test]
    fn matches_autograd_across_query_blocks_with_and_without_window() {
        let t = 2 * 64 + 5; // many query blocks (`kernels::attention::QBLOCK`)
        let ids: Vec<u32> = (0..2 * t).map(|i| (i * 7 % 31) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, t), &Device::Cpu).unwrap();
        let labels = ids.to_dtype(DType::I64).unwrap();
        check_on(
            &lora_model("LlamaForCausalLM", "", false, ALL),
            &ids,
            &labels,
        );
        let windowed = lora_model(
            "MistralForCausalLM",
            r#", "sliding_window": 40"#,
            false,
            ALL,
        );
        check_on(&windowed, &ids, &labels);
    }

    /// Recomputing the attention probabilities in the backward (what large ones get) instead
    /// of keeping them gives the same loss and gradients as autograd, with dropout too.
    #[test]
    fn matches_autograd_with_recomputed_attention_probs() {
        use crate::engine::blocks::RECOMPUTE_PROBS;
        RECOMPUTE_PROBS.with(|r| r.set(true));
        check(&lora_model_with("LlamaForCausalLM", "", true, ALL, 0.2));
        check(&lora_model(
            "MistralForCausalLM",
            r#", "sliding_window": 3"#,
            false,
            ALL,
        ));
        RECOMPUTE_PROBS.with(|r| r.set(false));
    }

    /// Dropout on the adapters' input (PEFT's `lora_dropout`): the same masks as the autograd
    /// path from the same stream, and they change the loss.
    #[test]
    fn matches_autograd_with_dropout() {
        let with = lora_model_with("LlamaForCausalLM", "", false, ALL, 0.3);
        let loss = check_on(&with, &ids(), &labels());
        let without = lora_model("LlamaForCausalLM", "", false, ALL);
        let plain = check_on(&without, &ids(), &labels());
        assert!(
            (loss - plain).abs() > 1e-3 * plain.abs(),
            "{loss} vs {plain}"
        );
    }

    /// Activation checkpointing gives the same loss and gradients (1e-6 relative) as keeping
    /// every activation, with adapter dropout too (the recomputed forward reuses the masks),
    /// and leaves the dropout stream where the plain step leaves it.
    #[test]
    fn checkpointing_changes_nothing_but_memory() {
        for dropout in [0.0, 0.3] {
            let model = lora_model_with("LlamaForCausalLM", "", true, ALL, dropout);
            let (seed, pos) = model.vb.rng().state();
            let run = |gradient_checkpointing: bool| {
                model.vb.rng().restore(seed, pos);
                let opts = FusedOptions {
                    gradient_checkpointing,
                };
                let f = model.fused_step(&ids(), &labels(), opts).unwrap().unwrap();
                (f, model.vb.rng().state())
            };
            let ((plain, after_plain), (ckpt, after_ckpt)) = (run(false), run(true));
            assert_eq!(after_plain, after_ckpt, "dropout {dropout}");
            assert!((plain.loss_sum - ckpt.loss_sum).abs() <= 1e-6 * plain.loss_sum.abs());
            assert_eq!(plain.grads.len(), ckpt.grads.len());
            for ((v1, g1), (v2, g2)) in plain.grads.iter().zip(&ckpt.grads) {
                assert_eq!(v1.as_tensor().id(), v2.as_tensor().id());
                let (diff, scale) = crate::ops::testing::diff_and_scale(g2, g1);
                assert!(
                    scale > 0.0 && diff <= 1e-6 * scale,
                    "dropout {dropout}: {diff}"
                );
            }
        }
    }

    /// A tiny `LlamaForSequenceClassification` (3 labels, pad id 0) with LoRA on every
    /// decoder linear (dropout `dropout`) and the `score` head a trainable copy.
    fn classifier(dropout: f64) -> Llama {
        let cfg = tiny(
            "LlamaForSequenceClassification",
            r#", "pad_token_id": 0, "id2label": {"0": "a", "1": "b", "2": "c"}"#,
        );
        let mut w = random_weights(&cfg, false);
        let score =
            crate::layers::normal(&[3, 16], 0.3, &crate::layers::LoraRng::new(5), &Device::Cpu)
                .unwrap();
        w.insert("score.weight".into(), score);
        let mut lc = LoraConfig::new(4, 8.0, ALL);
        lc.init_lora_weights = InitLoraWeights::Random;
        lc.lora_dropout = dropout;
        lc.modules_to_save = Some(vec!["score".into()]);
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu)
            .with_config(lc)
            .unwrap();
        Llama::load(&cfg, &vb).unwrap()
    }

    /// Sequence classification (`LlamaForSequenceClassification`, LoRA on every decoder
    /// linear, the `score` head a trainable `modules_to_save` copy, pooling on the last token
    /// that is not the pad id): loss and every gradient agree with autograd through
    /// `classify` and `classification_loss`, relative 1e-5, on every kernel target.
    #[test]
    fn classification_matches_autograd() {
        let m = classifier(0.2);
        // Right padding with the pad id 0 (the second row's last real token is at 3).
        let ids =
            Tensor::new(&[[3u32, 7, 1, 30, 12, 5], [4, 2, 9, 9, 0, 0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[2i64, 0], &Device::Cpu).unwrap();
        let (seed, pos) = m.vb.rng().state();
        let loss = classification_loss(&m.classify(&ids, true).unwrap(), &labels).unwrap();
        let want = f64::from(loss.to_scalar::<f32>().unwrap());
        let g = loss.backward().unwrap();
        let vars = m.trainable_vars();
        for isa in Isa::supported() {
            m.vb.rng().restore(seed, pos);
            let (got, grads) =
                crate::kernels::with_isa(isa, || m.fused_classify_step(&ids, &labels))
                    .unwrap()
                    .unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{isa}: {got} vs {want}"
            );
            let what = format!("{isa}");
            crate::testutil::assert_grads_match(&what, &grads, &g, vars.len(), 1e-5, &[]);
        }
    }

    /// Inference by the blocks gives `classify`'s logits (relative 1e-5), with adapter
    /// dropout configured and not applied, drawing nothing from the dropout stream.
    #[test]
    fn classification_inference_matches_classify() {
        let m = classifier(0.3);
        let ids =
            Tensor::new(&[[3u32, 7, 1, 30, 12, 5], [4, 2, 9, 9, 0, 0]], &Device::Cpu).unwrap();
        let want = m.classify(&ids, false).unwrap();
        let before = m.vb.rng().state();
        let got = m.fused_classify_logits(&ids).unwrap().unwrap();
        assert_eq!(m.vb.rng().state(), before);
        let (diff, scale) = crate::testutil::diff_and_scale(&got, &want);
        assert!(
            scale > 0.0 && diff <= 1e-5 * scale,
            "{diff} (scale {scale})"
        );
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let cfg = tiny("LlamaForCausalLM", "");
        let mut w = random_weights(&cfg, false);
        let head = w["model.embed_tokens.weight"].clone();
        w.insert("lm_head.weight".into(), head);
        // Full fine-tuning: every weight is trainable.
        let vb = LoraBuilder::new(MapSource::new(w.clone()), DType::F32, Device::Cpu)
            .full_finetune()
            .unwrap();
        let m = Llama::load(&cfg, &vb).unwrap();
        assert!(m
            .fused_step(&ids(), &labels(), FusedOptions::default())
            .unwrap()
            .is_none());
        // No adapter at all: nothing to train.
        let vb = LoraBuilder::new(MapSource::new(w), DType::F32, Device::Cpu);
        let m = Llama::load(&cfg, &vb).unwrap();
        assert!(m
            .fused_step(&ids(), &labels(), FusedOptions::default())
            .unwrap()
            .is_none());
    }
}
