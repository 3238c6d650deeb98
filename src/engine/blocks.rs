//! The engine's blocks. Shapes: activations `[n, width]` row-major, `n = b·t`.
//!
//! ```text
//! PreNormResidual:  y = x + f(rms(x)·w)          dx = dy + rms'(df_in)
//! SelfAttention:    q,k,v = x·W'ᵀ (+ b), RoPE on q, k;  o = softmax(q·kᵀ/√d + mask)·v;  y = o·Woᵀ
//!                   dP = do·vᵀ, dS = P⊙(dP − Σ_row dP⊙P)/√d, dq = dS·k, dk = dSᵀ·q, dv = Pᵀ·do
//! SwiGluMlp:        y = (silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ
//! PostNormResidual: y = LN(x + f(x))                 dz = LN'(dy), dx = dz + f'(dz)
//! GeluMlp:          y = gelu(x·Wiᵀ + bi)·Woᵀ + bo     (BERT)
//! CausalLmHead:     loss = Σ_predicted (logsumexp(rms(x)·wf·Whᵀ) − logit[label])
//! PooledHead:       loss = f(x[rows])   (classification heads, by autograd on [b, H])
//! ```
//!
//! Every linear is an [`Lin`] (frozen weight, optional adapter); its adapter's gradients come
//! from the block's input and output gradient (see [`super::linear`]).

use candle_core::{Tensor, Var};

use super::linear::{Dropped, Lin};
use super::{saved, Block, Cx, Grads, Head, Saved, Tape};
use crate::error::Result;
use crate::kernels::activation::{gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use crate::kernels::attention::{attention_backward, attention_forward, Attention};
use crate::kernels::gemm;
use crate::kernels::norm::{
    layer_norm_backward, layer_norm_forward, layer_norm_param_grads, rms_norm_backward,
    rms_norm_forward, LayerNormStats,
};
use crate::kernels::rope::rope_inplace;
use crate::kernels::softmax::cross_entropy_inplace;
use crate::kernels::{zip_update, Isa};

/// `a += b`.
fn add_into(isa: Isa, a: &mut [f32], b: &[f32]) {
    zip_update(isa, a, b, |a, b| *a += b);
}

/// A pre-norm residual around an inner block: `y = x + f(rms(x)·w)` (Llama's attention and MLP
/// sublayers). Keeps only the inner block's state: `rms(x)` is recomputed from the kept input
/// in the backward (one normalisation, `O(n·width)`).
pub(crate) struct PreNormResidual<'a> {
    /// RMSNorm weight `[width]`.
    pub norm: &'a [f32],
    /// RMSNorm epsilon.
    pub eps: f32,
    /// The block on the normalised input.
    pub inner: Box<dyn Block + 'a>,
}

impl Block for PreNormResidual<'_> {
    fn trainable(&self) -> bool {
        self.inner.trainable()
    }

    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let (xn, _) = rms_norm_forward(cx.isa, x, self.norm, self.eps);
        let (mut y, s) = self.inner.forward(cx, &xn, tape)?;
        add_into(cx.isa, &mut y, x);
        Ok((y, s))
    }

    fn backward(
        &self,
        cx: &Cx,
        x: &[f32],
        dy: &[f32],
        saved: Saved,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Vec<f32>>> {
        let (xn, inv) = rms_norm_forward(cx.isa, x, self.norm, self.eps);
        let dxn = self.inner.backward(cx, &xn, dy, saved, need_dx, grads)?;
        drop(xn);
        Ok(match dxn {
            Some(dxn) if need_dx => {
                let mut dx = dy.to_vec();
                rms_norm_backward(cx.isa, &dxn, x, &inv, self.norm, &mut dx, true);
                Some(dx)
            }
            _ => None,
        })
    }
}

/// A post-norm residual around an inner block: `y = LN(x + f(x))` with LayerNorm weight and
/// bias (BERT's attention and MLP sublayers). Keeps `z = x + f(x)` and its statistics.
pub(crate) struct PostNormResidual<'a> {
    /// LayerNorm weight `[width]`.
    pub weight: &'a [f32],
    /// LayerNorm bias `[width]`.
    pub bias: &'a [f32],
    /// The weight's and the bias's variables when they train (full fine-tuning).
    pub vars: Option<(Var, Var)>,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// The block on the input.
    pub inner: Box<dyn Block + 'a>,
}

/// What [`PostNormResidual`]'s backward needs.
struct PostNormSaved {
    z: Vec<f32>,
    stats: LayerNormStats,
    inner: Saved,
}

impl Block for PostNormResidual<'_> {
    fn trainable(&self) -> bool {
        self.vars.is_some() || self.inner.trainable()
    }

    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let (mut z, inner) = self.inner.forward(cx, x, tape)?;
        add_into(cx.isa, &mut z, x);
        let h = self.weight.len();
        let (y, stats) =
            layer_norm_forward(cx.isa, &z, h, Some(self.weight), Some(self.bias), self.eps);
        Ok((y, Box::new(PostNormSaved { z, stats, inner })))
    }

    fn backward(
        &self,
        cx: &Cx,
        x: &[f32],
        dy: &[f32],
        saved: Saved,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Vec<f32>>> {
        let s = *self::saved::<PostNormSaved>(saved, "post-norm residual")?;
        let h = self.weight.len();
        let mut dz = vec![0f32; s.z.len()];
        layer_norm_backward(
            cx.isa,
            dy,
            &s.z,
            h,
            &s.stats,
            Some(self.weight),
            &mut dz,
            false,
        );
        if let Some((w, b)) = &self.vars {
            let (dw, db) = layer_norm_param_grads(cx.isa, dy, &s.z, h, &s.stats);
            let dev = candle_core::Device::Cpu;
            grads.push((w.clone(), Tensor::from_vec(dw, h, &dev)?));
            grads.push((b.clone(), Tensor::from_vec(db, h, &dev)?));
        }
        drop(s.z);
        let dx_inner = self.inner.backward(cx, x, &dz, s.inner, need_dx, grads)?;
        Ok(match dx_inner {
            Some(mut dx) if need_dx => {
                add_into(cx.isa, &mut dx, &dz);
                Some(dx)
            }
            _ => None,
        })
    }
}

/// The GELU (erf) MLP: `y = gelu(x·Wiᵀ + bi)·Woᵀ + bo` (BERT's intermediate and output
/// dense). Keeps the pre-activation; `gelu` of it is recomputed when `Wo` trains.
pub(crate) struct GeluMlp<'a> {
    /// `intermediate.dense` `[inter, hidden]`.
    pub up: Lin<'a>,
    /// `output.dense` `[hidden, inter]`.
    pub down: Lin<'a>,
}

/// What [`GeluMlp`]'s backward needs.
struct GeluSaved {
    pre: Vec<f32>,
    drops: [Option<Dropped>; 2],
}

impl Block for GeluMlp<'_> {
    fn trainable(&self) -> bool {
        self.up.trains() || self.down.trains()
    }

    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let (pre, du) = self.up.forward(x, cx.n, tape)?;
        let act = gelu_forward(cx.isa, &pre);
        let (y, dd) = self.down.forward(&act, cx.n, tape)?;
        Ok((
            y,
            Box::new(GeluSaved {
                pre,
                drops: [du, dd],
            }),
        ))
    }

    fn backward(
        &self,
        cx: &Cx,
        x: &[f32],
        dy: &[f32],
        saved: Saved,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Vec<f32>>> {
        let GeluSaved {
            pre,
            drops: [dr_u, dr_d],
        } = *self::saved::<GeluSaved>(saved, "GELU MLP")?;
        let n = cx.n;
        let dact = self.down.backward_x_new(dy, n, dr_d.as_ref());
        if self.down.trains() {
            let act = gelu_forward(cx.isa, &pre);
            self.down.param_grads(&act, dy, n, dr_d.as_ref(), grads)?;
        }
        let mut dpre = vec![0f32; pre.len()];
        gelu_backward(cx.isa, &pre, &dact, &mut dpre, false);
        drop((pre, dact));
        self.up.param_grads(x, &dpre, n, dr_u.as_ref(), grads)?;
        if !need_dx {
            return Ok(None);
        }
        Ok(Some(self.up.backward_x_new(&dpre, n, dr_u.as_ref())))
    }
}

/// Probabilities larger than this (bytes, `b·H·t·t·4`) are recomputed in the backward instead
/// of kept: at the 111M Llama's 4 × 256 tokens and 16 heads they are 16 MiB a layer, the
/// largest activation, and recomputing them costs one `q·kᵀ` and softmax (under 2 % of the
/// layer's products); the benchmark Llama's 4 MiB stay kept.
const KEEP_PROBS_UP_TO: usize = 8 << 20;

#[cfg(test)]
thread_local! {
    /// Tests: recompute `P` whatever its size (blocks made on this thread).
    pub(crate) static RECOMPUTE_PROBS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Multi-head self-attention, grouped-query heads, optional RoPE: `q, k, v = x·W'ᵀ (+ bias)`,
/// RoPE on `q` and `k` (Llama, Mistral, Qwen2; none for BERT), attention with [`Attention`]'s
/// mask (causal, sliding window, or bidirectional with padding), `y = o·Woᵀ (+ bias)`.
pub(crate) struct SelfAttention<'a> {
    /// Query, key, value and output projections.
    pub q: Lin<'a>,
    /// Key projection `[KV·d, hidden]`.
    pub k: Lin<'a>,
    /// Value projection `[KV·d, hidden]`.
    pub v: Lin<'a>,
    /// Output projection `[hidden, H·d]`.
    pub o: Lin<'a>,
    /// Shape and mask.
    pub attn: Attention<'a>,
    /// RoPE tables `(cos, sin)`, `[t, d]` each (both halves equal); `None`: no RoPE.
    pub rope: Option<(&'a [f32], &'a [f32])>,
    /// Keep `P` for the backward (else it is recomputed from `q`, `k`).
    pub keep_probs: bool,
}

impl<'a> SelfAttention<'a> {
    /// The block, keeping `P` when it is at most [`KEEP_PROBS_UP_TO`] bytes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        q: Lin<'a>,
        k: Lin<'a>,
        v: Lin<'a>,
        o: Lin<'a>,
        attn: Attention<'a>,
        rope: Option<(&'a [f32], &'a [f32])>,
    ) -> Self {
        let probs = attn.b * attn.heads * attn.t * attn.t * 4;
        #[cfg(test)]
        let probs = if RECOMPUTE_PROBS.with(|r| r.get()) {
            usize::MAX
        } else {
            probs
        };
        SelfAttention {
            q,
            k,
            v,
            o,
            attn,
            rope,
            keep_probs: probs <= KEEP_PROBS_UP_TO,
        }
    }

    fn rope(&self, x: &mut [f32], heads: usize, backward: bool) {
        if let Some((cos, sin)) = self.rope {
            let a = &self.attn;
            rope_inplace(a.isa, x, a.t, heads, cos, sin, backward);
        }
    }
}

/// What [`SelfAttention`]'s backward needs: the roped `q`, `k`, `v`, `P` when kept, the
/// attention output when `Wo` trains, and the dropout states of `q, k, v, o`.
struct AttentionSaved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Option<Vec<f32>>,
    o: Option<Vec<f32>>,
    drops: [Option<Dropped>; 4],
}

impl Block for SelfAttention<'_> {
    fn trainable(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.o]
            .iter()
            .any(|l| l.trains())
    }

    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let (n, a) = (cx.n, &self.attn);
        let (mut q, dq) = self.q.forward(x, n, tape)?;
        self.rope(&mut q, a.heads, false);
        let (mut k, dk) = self.k.forward(x, n, tape)?;
        self.rope(&mut k, a.kv_heads, false);
        let (v, dv) = self.v.forward(x, n, tape)?;
        let (p, o) = attention_forward(&q, &k, &v, a);
        let (y, do_) = self.o.forward(&o, n, tape)?;
        let s = AttentionSaved {
            q,
            k,
            v,
            p: self.keep_probs.then_some(p),
            o: self.o.trains().then_some(o),
            drops: [dq, dk, dv, do_],
        };
        Ok((y, Box::new(s)))
    }

    fn backward(
        &self,
        cx: &Cx,
        x: &[f32],
        dy: &[f32],
        saved: Saved,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Vec<f32>>> {
        let s = *self::saved::<AttentionSaved>(saved, "attention")?;
        let (n, a) = (cx.n, &self.attn);
        let [dr_q, dr_k, dr_v, dr_o] = &s.drops;
        let dout = self.o.backward_x_new(dy, n, dr_o.as_ref());
        if let Some(o) = &s.o {
            self.o.param_grads(o, dy, n, dr_o.as_ref(), grads)?;
        }
        drop(s.o);
        let p = match s.p {
            Some(p) => p,
            None => attention_forward(&s.q, &s.k, &s.v, a).0,
        };
        let (mut dq, mut dk, dv) = attention_backward(&s.q, &s.k, &s.v, &p, &dout, a);
        drop((p, dout));
        self.rope(&mut dq, a.heads, true);
        self.rope(&mut dk, a.kv_heads, true);
        self.q.param_grads(x, &dq, n, dr_q.as_ref(), grads)?;
        self.k.param_grads(x, &dk, n, dr_k.as_ref(), grads)?;
        self.v.param_grads(x, &dv, n, dr_v.as_ref(), grads)?;
        if !need_dx {
            return Ok(None);
        }
        let mut dx = self.q.backward_x_new(&dq, n, dr_q.as_ref());
        self.k.backward_x(&dk, n, &mut dx, true, dr_k.as_ref());
        self.v.backward_x(&dv, n, &mut dx, true, dr_v.as_ref());
        Ok(Some(dx))
    }
}

/// The SwiGLU MLP: `y = (silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ`. Keeps the gate and up projections; the
/// product `silu(g)⊙u` is recomputed when `Wd` trains.
pub(crate) struct SwiGluMlp<'a> {
    /// Gate projection `[inter, hidden]`.
    pub gate: Lin<'a>,
    /// Up projection `[inter, hidden]`.
    pub up: Lin<'a>,
    /// Down projection `[hidden, inter]`.
    pub down: Lin<'a>,
}

/// What [`SwiGluMlp`]'s backward needs.
struct MlpSaved {
    g: Vec<f32>,
    u: Vec<f32>,
    drops: [Option<Dropped>; 3],
}

impl Block for SwiGluMlp<'_> {
    fn trainable(&self) -> bool {
        [&self.gate, &self.up, &self.down]
            .iter()
            .any(|l| l.trains())
    }

    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let n = cx.n;
        let (g, dg) = self.gate.forward(x, n, tape)?;
        let (u, du) = self.up.forward(x, n, tape)?;
        let hm = swiglu_forward(cx.isa, &g, &u);
        let (y, dd) = self.down.forward(&hm, n, tape)?;
        let s = MlpSaved {
            g,
            u,
            drops: [dg, du, dd],
        };
        Ok((y, Box::new(s)))
    }

    fn backward(
        &self,
        cx: &Cx,
        x: &[f32],
        dy: &[f32],
        saved: Saved,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Vec<f32>>> {
        let MlpSaved {
            mut g,
            mut u,
            drops: [dr_g, dr_u, dr_d],
        } = *self::saved::<MlpSaved>(saved, "MLP")?;
        let n = cx.n;
        let dhm = self.down.backward_x_new(dy, n, dr_d.as_ref());
        if self.down.trains() {
            let hm = swiglu_forward(cx.isa, &g, &u);
            self.down.param_grads(&hm, dy, n, dr_d.as_ref(), grads)?;
        }
        // g, u become dg, du.
        swiglu_backward(cx.isa, &mut g, &mut u, &dhm);
        drop(dhm);
        self.gate.param_grads(x, &g, n, dr_g.as_ref(), grads)?;
        self.up.param_grads(x, &u, n, dr_u.as_ref(), grads)?;
        if !need_dx {
            return Ok(None);
        }
        let mut dx = self.gate.backward_x_new(&g, n, dr_g.as_ref());
        self.up.backward_x(&u, n, &mut dx, true, dr_u.as_ref());
        Ok(Some(dx))
    }
}

/// The causal-LM head: final RMSNorm, frozen `lm_head` and the cross-entropy of the rows that
/// have a target (transformers' shift applied by the caller).
pub(crate) struct CausalLmHead<'a> {
    /// Final RMSNorm weight `[hidden]`.
    pub norm: &'a [f32],
    /// RMSNorm epsilon.
    pub eps: f32,
    /// `lm_head` weight `[vocab, hidden]` (the embedding table when tied).
    pub weight: &'a [f32],
    /// Vocabulary size.
    pub vocab: usize,
    /// One optional target per row.
    pub targets: Vec<Option<u32>>,
}

impl Head for CausalLmHead<'_> {
    fn loss_and_grad(
        &self,
        cx: &Cx,
        x: &[f32],
        need_dx: bool,
        _grads: &mut Grads,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let (n, hs, vocab, isa) = (cx.n, self.norm.len(), self.vocab, cx.isa);
        let (xf, invf) = rms_norm_forward(isa, x, self.norm, self.eps);
        let mut logits = gemm::gemm_f32_new(n, vocab, hs, &xf, (hs, 1), self.weight, (1, hs), 1.0);
        drop(xf);
        let loss = cross_entropy_inplace(isa, &mut logits, vocab, &self.targets);
        if !need_dx {
            return Ok((loss, None));
        }
        // `logits` now holds ∂loss/∂logits.
        let dxf = gemm::gemm_f32_new(n, hs, vocab, &logits, (vocab, 1), self.weight, (hs, 1), 1.0);
        drop(logits);
        let mut dx = vec![0f32; n * hs];
        rms_norm_backward(isa, &dxf, x, &invf, self.norm, &mut dx, true);
        Ok((loss, Some(dx)))
    }
}

/// A classification head on chosen rows: gathers rows `rows` of the last hidden states into a
/// `[b, hidden]` leaf and runs `loss` on it through candle's autograd (pooling, norm,
/// classifier: small tensors), which gives the gradients of the head's own variables among
/// `vars` and of the gathered rows, scattered back to their places.
pub(crate) struct PooledHead<'f> {
    /// The row of `x` each sequence is classified by (`[CLS]`, or the last non-pad token).
    pub rows: Vec<usize>,
    /// Hidden width.
    pub hidden: usize,
    /// The scalar loss of the gathered rows.
    pub loss: &'f dyn Fn(&Tensor) -> Result<Tensor>,
    /// The model's trainable variables (those the head uses get their gradients here).
    pub vars: Vec<Var>,
}

impl Head for PooledHead<'_> {
    fn loss_and_grad(
        &self,
        _cx: &Cx,
        x: &[f32],
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let (h, b) = (self.hidden, self.rows.len());
        let mut rows = Vec::with_capacity(b * h);
        for &r in &self.rows {
            rows.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        // A leaf whose gradient autograd reports: the gathered rows' gradient.
        let leaf = Var::from_tensor(&Tensor::from_vec(rows, (b, h), &candle_core::Device::Cpu)?)?;
        let loss = (self.loss)(leaf.as_tensor())?;
        let g = loss.backward()?;
        for v in &self.vars {
            if let Some(gv) = g.get(v.as_tensor()) {
                grads.push((v.clone(), gv.clone()));
            }
        }
        let value = f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        if !need_dx {
            return Ok((value, None));
        }
        let mut dx = vec![0f32; x.len()];
        if let Some(d) = g.get(leaf.as_tensor()) {
            let d: Vec<f32> = d.flatten_all()?.to_vec1()?;
            for (i, &r) in self.rows.iter().enumerate() {
                dx[r * h..(r + 1) * h]
                    .iter_mut()
                    .zip(&d[i * h..(i + 1) * h])
                    .for_each(|(a, b)| *a += b);
            }
        }
        Ok((value, Some(dx)))
    }
}
