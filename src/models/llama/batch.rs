//! Batched decoding of many sequences, each with its own adapter (or none), through one frozen
//! base model: the mixed-adapter batches of S-LoRA and Punica, on the CPU.
//!
//! ```text
//! rows:   every new token of every sequence, stacked          X: [N, in]   N = Σ tᵢ
//! linear: Y = X·W0ᵀ + b                one shared GEMM for all rows (the frozen base)
//!         Y[n] += s_g·(X[n]·A_gᵀ)·B_gᵀ  for each row n of a sequence with adapter g
//!                                       (a gathered low-rank product, Punica's SGMV idea:
//!                                        r·(in + out) per row, whatever adapters are mixed)
//! attn:   per sequence i, its own positions offᵢ..offᵢ + tᵢ (RoPE), causal mask and KV cache
//! head:   only each sequence's last row → logits [V]
//! ```
//!
//! A sequence joins the batch with its whole prompt as its first chunk (`tᵢ` rows) and then
//! feeds one token per step; it can leave after any step (its [`Cache`] is dropped). Every
//! sequence computes exactly the math of [`Llama::forward_with_cache`] with the adapter loaded
//! into the model, so greedy decoding gives the tokens `generate` gives for it alone (up to f32
//! summation order, far below the gaps between top logits).
//!
//! ```
//! # use lora::models::{BatchSeq, Cache, Llama};
//! # fn demo(base: &Llama, a: &lora::models::ServeAdapter) -> lora::Result<()> {
//! let (mut c1, mut c2) = (Cache::new(base), Cache::new(base));
//! let logits = base.forward_batch(&mut [
//!     BatchSeq { tokens: &[1, 5, 9], adapter: None, cache: &mut c1 },
//!     BatchSeq { tokens: &[1, 7], adapter: Some(a), cache: &mut c2 },
//! ])?;
//! assert_eq!(logits.len(), 2); // the last position's logits of each sequence
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{attention_mask, swiglu, tied_head, Cache, Llama, Step};
use crate::adapter::Adapter;
use crate::config::ModuleKind;
use crate::error::{Error, Result};
use crate::kernels::vecmath::dot;
use crate::layers::LoraLinear;

/// The decoder linears of one layer, in [`ServeAdapter`]'s slot order.
const SLOTS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One module's factors as plain row-major f32: `a: [r, in]`, `b: [out, r]`, scale `s`.
#[derive(Debug, Clone)]
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scale: f32,
}

impl Factors {
    /// `y += s·(x·Aᵀ)·Bᵀ` for one row `x: [in]`, `y: [out]`.
    fn apply_row(&self, x: &[f32], y: &mut [f32]) {
        let inp = x.len();
        let mut xa = [0f32; 64];
        let mut big = Vec::new();
        let xa: &mut [f32] = if self.r <= xa.len() {
            &mut xa[..self.r]
        } else {
            big.resize(self.r, 0.0);
            &mut big
        };
        for (k, v) in xa.iter_mut().enumerate() {
            *v = self.scale * dot(&self.a[k * inp..(k + 1) * inp], x);
        }
        for (o, v) in y.iter_mut().enumerate() {
            *v += dot(&self.b[o * self.r..(o + 1) * self.r], xa);
        }
    }
}

/// An adapter prepared for [`Llama::forward_batch`]: its factors per decoder linear (and
/// `lm_head`) as plain f32, checked against the base model's shapes.
#[derive(Debug, Clone)]
pub struct ServeAdapter {
    layers: Vec<[Option<Factors>; 7]>,
    head: Option<Factors>,
    params: usize,
}

impl ServeAdapter {
    /// Number of adapter parameters (|A| + |B| over modules).
    pub fn num_params(&self) -> usize {
        self.params
    }
}

/// One sequence of a batch step: its new tokens (the whole prompt when it joins, then one
/// token), its adapter (`None`: the base model) and its KV cache, which the step extends.
#[derive(Debug)]
pub struct BatchSeq<'a> {
    /// The tokens after the `cache.len()` already seen (at least one).
    pub tokens: &'a [u32],
    /// The adapter this sequence runs with.
    pub adapter: Option<&'a ServeAdapter>,
    /// This sequence's keys and values; extended by the step.
    pub cache: &'a mut Cache,
}

/// Which module of a [`ServeAdapter`] a linear is.
#[derive(Clone, Copy)]
enum Slot {
    Layer(usize, usize),
    Head,
}

impl Slot {
    fn of(self, a: &ServeAdapter) -> Option<&Factors> {
        match self {
            Slot::Layer(l, j) => a.layers[l][j].as_ref(),
            Slot::Head => a.head.as_ref(),
        }
    }
}

impl Llama {
    /// The linears of layer `l` in [`SLOTS`] order.
    fn layer_linears(&self, l: usize) -> [&LoraLinear; 7] {
        let b = &self.layers[l];
        [
            &b.attn.q,
            &b.attn.k,
            &b.attn.v,
            &b.attn.o,
            &b.mlp.gate,
            &b.mlp.up,
            &b.mlp.down,
        ]
    }

    /// Prepares `adapter` for [`Llama::forward_batch`] on this (adapter-free) model. Errors,
    /// naming the module, on modules other than the decoder linears and `lm_head`, on shapes
    /// that do not fit, and on adapter kinds this path does not compute (DoRA, `fan_in_fan_out`,
    /// LoRA biases).
    pub fn serve_adapter(&self, adapter: &Adapter) -> Result<ServeAdapter> {
        let c = &adapter.config;
        let refuse = |what: &str| Error::Module {
            module: "adapter_config.json".into(),
            reason: format!("{what} is not supported by batched serving"),
        };
        if c.use_dora {
            return Err(refuse("use_dora"));
        }
        if c.fan_in_fan_out {
            return Err(refuse("fan_in_fan_out"));
        }
        if c.lora_bias {
            return Err(refuse("lora_bias"));
        }
        let mut out = ServeAdapter {
            layers: vec![Default::default(); self.layers.len()],
            head: None,
            params: adapter.num_params(),
        };
        for (name, m) in &adapter.modules {
            let slot = self.slot_of(name).ok_or_else(|| Error::Module {
                module: name.clone(),
                reason: "batched serving applies adapters to the decoder's linear layers and \
                         lm_head only"
                    .into(),
            })?;
            let lin = match slot {
                Slot::Layer(l, j) => self.layer_linears(l)[j],
                Slot::Head => self.lm_head.as_ref().ok_or_else(|| Error::Module {
                    module: name.clone(),
                    reason: "the model's head is tied to embed_tokens".into(),
                })?,
            };
            if m.kind != ModuleKind::Linear {
                return Err(Error::Module {
                    module: name.clone(),
                    reason: "is not a linear adapter".into(),
                });
            }
            let (out_f, in_f) = lin.weight().dims2()?;
            let r = m.rank();
            if m.a.dims() != [r, in_f] || m.b.dims() != [out_f, r] {
                return Err(Error::ShapeMismatch {
                    key: name.clone(),
                    got: m.b.dims().to_vec(),
                    what: format!("factors of the base weight [{out_f}, {in_f}] (B [out, r])"),
                });
            }
            let f = Factors {
                a: m.a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                b: m.b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                r,
                scale: adapter.scale_for(name)? as f32,
            };
            match slot {
                Slot::Layer(l, j) => out.layers[l][j] = Some(f),
                Slot::Head => out.head = Some(f),
            }
        }
        Ok(out)
    }

    /// The slot of module `name` (`model.layers.{l}.self_attn.q_proj`, ..., `lm_head`).
    fn slot_of(&self, name: &str) -> Option<Slot> {
        if name == "lm_head" {
            return Some(Slot::Head);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (l, leaf) = rest.split_once('.')?;
        let l: usize = l.parse().ok()?;
        let j = SLOTS.iter().position(|s| *s == leaf)?;
        (l < self.layers.len()).then_some(Slot::Layer(l, j))
    }

    /// One step of mixed-adapter batched decoding (see the module doc): runs every sequence's
    /// new tokens, extends each cache, and returns each sequence's next-token logits `[V]` (of
    /// its last new token), in order. The model itself must carry no (unmerged) adapter.
    pub fn forward_batch(&self, seqs: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        if !self.vb.adapted_modules().is_empty() {
            return Err(Error::State(
                "forward_batch runs adapters per sequence: open the base model without one".into(),
            ));
        }
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(Error::State("a batched sequence has no new token".into()));
            }
            if s.cache.layers.len() != self.layers.len() {
                return Err(Error::State(format!(
                    "KV cache has {} layers, the model {}",
                    s.cache.layers.len(),
                    self.layers.len()
                )));
            }
        }
        let dev = self.vb.device().clone();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let n = ids.len();
        let mut x = self.embed.forward(&Tensor::from_vec(ids, (1, n), &dev)?)?; // [1, N, H]
                                                                                // Each row's adapter, and each sequence's rows, rope tables and mask.
        let row_adapter: Vec<Option<&ServeAdapter>> = seqs
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.adapter, s.tokens.len()))
            .collect();
        let mut starts = Vec::with_capacity(seqs.len());
        let mut tables = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs.iter() {
            let (t, off) = (s.tokens.len(), s.cache.len);
            let [cos, sin] = self.rope.cos_sin(off, t, x.dtype(), &dev)?;
            let mask = attention_mask(t, off, self.window, &dev)?;
            tables.push((cos, sin, mask));
            starts.push(start);
            start += t;
        }
        let lin = |l: &LoraLinear, x: &Tensor, slot: Slot| -> Result<Tensor> {
            let y = l.forward_t(x, false)?;
            let rows: Vec<Option<&Factors>> = row_adapter
                .iter()
                .map(|a| a.and_then(|a| slot.of(a)))
                .collect();
            gathered_low_rank(y, x, &rows)
        };
        for (li, block) in self.layers.iter().enumerate() {
            let h = block.input_layernorm.forward(&x)?;
            let q = lin(&block.attn.q, &h, Slot::Layer(li, 0))?;
            let k = lin(&block.attn.k, &h, Slot::Layer(li, 1))?;
            let v = lin(&block.attn.v, &h, Slot::Layer(li, 2))?;
            let mut ys = Vec::with_capacity(seqs.len());
            for ((s, &st), (cos, sin, mask)) in seqs.iter_mut().zip(&starts).zip(&tables) {
                let t = s.tokens.len();
                let step = Step {
                    cos,
                    sin,
                    mask: mask.as_ref(),
                    train: false,
                };
                let part = |p: &Tensor| p.narrow(1, st, t);
                ys.push(block.attn.attend(
                    part(&q)?,
                    part(&k)?,
                    part(&v)?,
                    &step,
                    Some(&mut s.cache.layers[li]),
                )?);
            }
            let y = Tensor::cat(&ys, 1)?;
            x = (x + lin(&block.attn.o, &y, Slot::Layer(li, 3))?)?;
            let h = block.post_attention_layernorm.forward(&x)?;
            let g = lin(&block.mlp.gate, &h, Slot::Layer(li, 4))?;
            let u = lin(&block.mlp.up, &h, Slot::Layer(li, 5))?;
            let m = lin(&block.mlp.down, &swiglu(&g, &u)?, Slot::Layer(li, 6))?;
            x = (x + m)?;
        }
        // Only each sequence's last row goes through the norm and the head.
        let last: Vec<u32> = seqs
            .iter()
            .zip(&starts)
            .map(|(s, &st)| (st + s.tokens.len() - 1) as u32)
            .collect();
        let b = last.len();
        let last_adapter: Vec<Option<&ServeAdapter>> = seqs.iter().map(|s| s.adapter).collect();
        let x = x.index_select(&Tensor::from_vec(last, b, &dev)?, 1)?; // [1, B, H]
        let x = self.norm.forward(&x)?;
        let logits = match &self.lm_head {
            Some(h) => {
                let y = h.forward_t(&x, false)?;
                let rows: Vec<Option<&Factors>> = last_adapter
                    .iter()
                    .map(|a| a.and_then(|a| Slot::Head.of(a)))
                    .collect();
                gathered_low_rank(y, &x, &rows)?
            }
            None => tied_head(&x, self.embed.table())?,
        };
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        Ok(logits.to_dtype(DType::F32)?.squeeze(0)?.to_vec2::<f32>()?)
    }
}

/// `y[n] += s·(x[n]·Aᵀ)·Bᵀ` with each row's own factors (`None`: unchanged), for `x: [1, N, in]`,
/// `y: [1, N, out]`: the rows run in parallel, whichever adapters they mix.
fn gathered_low_rank(y: Tensor, x: &Tensor, rows: &[Option<&Factors>]) -> Result<Tensor> {
    if rows.iter().all(Option::is_none) {
        return Ok(y);
    }
    let (_, n, inp) = x.dims3()?;
    let out = y.dim(2)?;
    let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut d = vec![0f32; n * out];
    d.par_chunks_mut(out)
        .zip(xv.par_chunks(inp))
        .zip(rows.par_iter())
        .for_each(|((dr, xr), f)| {
            if let Some(f) = f {
                f.apply_row(xr, dr);
            }
        });
    let d = Tensor::from_vec(d, (1, n, out), y.device())?.to_dtype(y.dtype())?;
    Ok((y + d)?)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{random_weights, tiny};
    use super::*;
    use crate::builder::{LoraBuilder, MapSource};
    use crate::config::{InitLoraWeights, LoraConfig};
    use crate::models::CausalLm;
    use candle_core::Device;

    /// The tiny model without adapters, and with a random-B adapter (`seed`) on every linear.
    fn models(seed: u64) -> (Llama, Llama, Adapter) {
        let cfg = tiny("LlamaForCausalLM", "");
        let mut w = random_weights(&cfg, false);
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
        let vb = || LoraBuilder::new(MapSource::new(w.clone()), DType::F32, Device::Cpu);
        let base = Llama::load(&cfg, &vb()).unwrap();
        let mut lc = LoraConfig::new(
            4,
            8.0,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "lm_head",
            ],
        );
        lc.init_lora_weights = InitLoraWeights::Random;
        let adapted = Llama::load(
            &cfg,
            &vb().with_config(lc).unwrap().with_seed(seed).unwrap(),
        )
        .unwrap();
        let adapter = adapted.adapter().unwrap();
        (base, adapted, adapter)
    }

    #[test]
    fn mixed_batch_matches_each_sequence_run_alone() {
        let (base, adapted, adapter) = models(3);
        let (_, adapted2, adapter2) = models(4);
        let (sa, sb) = (
            base.serve_adapter(&adapter).unwrap(),
            base.serve_adapter(&adapter2).unwrap(),
        );
        // Three sequences with different prompts and adapters, joining at different steps.
        let prompts: [&[u32]; 3] = [&[3, 7, 1, 30, 12], &[0, 2, 9], &[5, 5, 6, 7]];
        let alone: [&Llama; 3] = [&adapted, &base, &adapted2];
        let ads = [Some(&sa), None, Some(&sb)];
        let mut caches: Vec<Cache> = (0..3).map(|_| Cache::new(&base)).collect();
        let mut refs: Vec<Cache> = (0..3).map(|_| Cache::new(&base)).collect();
        let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        for step in 0..4 {
            // Sequence 2 joins at step 1; sequence 0 leaves after step 2.
            let live: Vec<usize> = (0..3)
                .filter(|&i| !(i == 2 && step == 0 || i == 0 && step == 3))
                .collect();
            let mut batch: Vec<BatchSeq> = Vec::new();
            let mut cs: Vec<&mut Cache> = caches.iter_mut().collect();
            let mut picked = Vec::new();
            for (i, c) in cs.drain(..).enumerate() {
                if live.contains(&i) {
                    picked.push(i);
                    batch.push(BatchSeq {
                        tokens: &next[i],
                        adapter: ads[i],
                        cache: c,
                    });
                }
            }
            let got = base.forward_batch(&mut batch).unwrap();
            drop(batch);
            for (row, &i) in got.iter().zip(&picked) {
                let ids = Tensor::new(next[i].as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let want = alone[i].forward_with_cache(&ids, &mut refs[i]).unwrap();
                let t = next[i].len();
                let want = want
                    .get(0)
                    .unwrap()
                    .get(t - 1)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let diff = row
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff < 1e-4, "step {step} seq {i}: {diff}");
                let tok = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b }) as u32;
                next[i] = vec![tok];
            }
        }
        // The adapters change the output (the comparison above is not base against base).
        let ids = Tensor::new(&[[3u32, 7, 1]], &Device::Cpu).unwrap();
        let d = crate::testutil::max_abs_diff(
            &adapted.forward_t(&ids, false).unwrap(),
            &base.forward_t(&ids, false).unwrap(),
        );
        assert!(d > 1e-2, "{d}");
    }

    #[test]
    fn adapters_for_other_modules_or_shapes_are_refused() {
        let (base, _, mut adapter) = models(3);
        let m = adapter
            .modules
            .remove("model.layers.0.self_attn.q_proj")
            .unwrap();
        adapter
            .modules
            .insert("model.layers.0.self_attn.x_proj".into(), m.clone());
        let e = base.serve_adapter(&adapter).unwrap_err().to_string();
        assert!(e.contains("x_proj"), "{e}");
        adapter.modules.remove("model.layers.0.self_attn.x_proj");
        adapter
            .modules
            .insert("model.layers.0.self_attn.k_proj".into(), m);
        let e = base.serve_adapter(&adapter).unwrap_err().to_string();
        assert!(e.contains("k_proj"), "{e}");
    }
}
