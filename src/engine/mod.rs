//! The training engine: a LoRA step with a hand-written backward, composed from blocks (CPU,
//! f32).
//!
//! candle's autograd records every op of the forward, computes a gradient for every operand of
//! every op in the backward (frozen weights included), accumulates each through a fresh zero
//! tensor and allocates every activation anew: on the benchmark Llama that made a LoRA step
//! 2.5× slower than PyTorch + PEFT although the matrix products, the same on both sides, took
//! about a quarter of it. The engine runs the same math directly on f32 buffers through
//! [`crate::kernels`], computing and keeping only what the trainable parameters' gradients
//! need.
//!
//! ```text
//! ids ─ embedding ─ x₀ ─ block₁ ─ x₁ ─ … ─ block_L ─ x_L ─ head (norm, logits, loss)
//!                        ◄──────────── dx, adapter gradients ◄──────────── dlogits
//! ```
//!
//! A model family is a short list of blocks (`models::llama::engine` builds Llama's, Mistral's
//! and Qwen2's from the loaded model). A [`Block`] has a forward that returns its output and
//! what its backward needs, and a backward that turns the output gradient into its adapters'
//! gradients and, when something before it trains, the input gradient. The blocks are
//! [`blocks::PreNormResidual`] (`y = x + f(norm(x))`), [`blocks::PostNormResidual`]
//! (`y = LN(x + f(x))`), [`blocks::SelfAttention`] (GQA, optional RoPE, causal with an optional
//! sliding window or bidirectional with padding), [`blocks::SwiGluMlp`], [`blocks::GeluMlp`],
//! [`Stack`] (blocks in order) and [`Checkpointed`] (activation checkpointing around any
//! block); the embedding and a [`Head`] close the chain: [`blocks::CausalLmHead`] (final norm,
//! logits, cross-entropy) or [`blocks::PooledHead`] (a classification head on chosen rows).
//!
//! Memory: the [`Stack`] keeps each block's input (its parent's output) for the backward, so no
//! block saves its input; a block saves only what its backward cannot recompute cheaply. The
//! normalised inputs are recomputed from the kept input (one RMSNorm), `silu(g)⊙u` is
//! recomputed from `g`, `u`, and the attention probabilities are recomputed from `q`, `k`
//! when they are large ([`blocks::SelfAttention`]).
//!
//! Dropout on an adapter's input draws its mask from the builder's stream in the order the
//! autograd path draws it; a [`Tape`] records the masks a checkpointed block drew and replays
//! them when the backward runs its forward again.
//!
//! Nothing here knows a model: blocks borrow `&[f32]` weights and call the kernels, which
//! dispatch on the instruction set ([`crate::kernels::Isa`]). A GPU backend would give the
//! same blocks device buffers and device kernels. Autograd stays the general fallback and the
//! reference every family's engine step is tested against (loss and every gradient).

use std::any::Any;

use candle_core::{CpuStorage, Storage, Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels::Isa;

pub(crate) mod blocks;
pub(crate) mod linear;

/// The loss and the adapters' gradients of one batch, from
/// [`CausalLm::fused_loss_and_grads`](crate::models::CausalLm::fused_loss_and_grads).
#[derive(Debug)]
pub struct FusedGrads {
    /// `Σ −log p(label)` over the predicted tokens (not divided by their count).
    pub loss_sum: f64,
    /// The number of predicted tokens.
    pub count: usize,
    /// The gradient of `loss_sum` for every trainable variable, shaped like it.
    pub grads: Vec<(Var, Tensor)>,
}

/// How [`CausalLm::fused_loss_and_grads`](crate::models::CausalLm::fused_loss_and_grads) runs
/// a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusedOptions {
    /// Activation (gradient) checkpointing per decoder layer: the forward keeps only each
    /// layer's input (and its dropout masks); the backward runs the layer's forward again to
    /// get the rest. Less memory for the activations (one layer's instead of all of them) for
    /// one more forward of the decoder layers; the results are the same.
    pub gradient_checkpointing: bool,
}

/// Contiguous f32 CPU data of a guarded storage (`Tensor::storage_and_layout`): the engine
/// borrows every frozen weight this way for the length of a step.
pub(crate) fn cpu_f32<'g, G: std::ops::Deref<Target = Storage>>(
    (st, l): &'g (G, &candle_core::Layout),
    what: &str,
) -> Result<&'g [f32]> {
    match (&**st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(Error::State(format!(
            "training engine: {what} is not contiguous f32 on the CPU"
        ))),
    }
}

/// Whether `grads` holds a gradient for each of `vars` (a variable the blocks and heads did
/// not reach would otherwise be skipped silently by the optimizer).
pub(crate) fn covers(grads: &Grads, vars: &[Var]) -> bool {
    let got: std::collections::HashSet<_> = grads.iter().map(|(v, _)| v.as_tensor().id()).collect();
    vars.iter().all(|v| got.contains(&v.as_tensor().id()))
}

/// Gradients of the trainable variables, in the order the backward produced them.
pub(crate) type Grads = Vec<(Var, Tensor)>;

/// What a block's forward keeps for its backward (each block downcasts its own type).
pub(crate) type Saved = Box<dyn Any>;

/// Takes back a block's own saved state.
pub(crate) fn saved<T: 'static>(s: Saved, block: &str) -> Result<Box<T>> {
    s.downcast().map_err(|_| {
        Error::State(format!(
            "training engine: {block} got another block's saved state"
        ))
    })
}

/// The step's shape and kernel target, shared by every block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cx {
    /// Rows `n = b·t` of every activation.
    pub n: usize,
    /// The kernels' instruction set for this step.
    pub isa: Isa,
    /// Whether a [`Stack`] keeps what the backward needs (no backward follows otherwise:
    /// inference, or a body with nothing to train).
    pub keep: bool,
}

/// Where dropout masks come from: fresh from the adapters' streams, fresh and recorded (a
/// checkpointed forward), replayed in the same order (its recomputation), or none at all
/// (inference).
pub(crate) enum Tape {
    /// Inference: no dropout.
    Eval,
    /// Draw fresh masks.
    Fresh,
    /// Draw fresh masks and keep a copy of each.
    Record(Vec<Vec<f32>>),
    /// Give back recorded masks in order.
    Replay(std::vec::IntoIter<Vec<f32>>),
}

impl Tape {
    /// The next dropout mask: `draw()`'s, the recorded one when replaying, none in inference.
    pub(crate) fn mask(&mut self, draw: impl FnOnce() -> Vec<f32>) -> Result<Option<Vec<f32>>> {
        match self {
            Tape::Eval => Ok(None),
            Tape::Fresh => Ok(Some(draw())),
            Tape::Record(kept) => {
                let m = draw();
                kept.push(m.clone());
                Ok(Some(m))
            }
            Tape::Replay(it) => it.next().map(Some).ok_or_else(|| {
                Error::State("training engine: a recomputed forward drew more dropout masks".into())
            }),
        }
    }
}

/// A piece of a model with a forward and a hand-written backward on `[n, width]` row-major
/// activations.
pub(crate) trait Block {
    /// Whether the block has trainable parameters (its backward computes their gradients).
    fn trainable(&self) -> bool;

    /// `y = f(x)` and what the backward needs besides `x` itself (the caller keeps `x`).
    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)>;

    /// From `dy = ∂loss/∂y`: pushes the gradients of the block's trainable parameters and
    /// returns `∂loss/∂x` when `need_dx` (else `None`, and the input gradient is not computed).
    fn backward(
        &self,
        cx: &Cx,
        x: &[f32],
        dy: &[f32],
        saved: Saved,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Vec<f32>>>;
}

/// Blocks applied in order. Keeps every inner block's input (the previous block's output) for
/// the backward; the backward stops as soon as nothing before a block trains.
pub(crate) struct Stack<'a> {
    /// The blocks, first to last.
    pub blocks: Vec<Box<dyn Block + 'a>>,
}

/// [`Stack`]'s saved state: the inputs of blocks `1..` and every block's own state.
struct StackSaved {
    inputs: Vec<Vec<f32>>,
    states: Vec<Saved>,
}

impl Block for Stack<'_> {
    fn trainable(&self) -> bool {
        self.blocks.iter().any(|b| b.trainable())
    }

    fn forward(&self, cx: &Cx, x: &[f32], tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(self.blocks.len());
        let mut states = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (y, s) = b.forward(cx, inputs.last().map_or(x, |v| &v[..]), tape)?;
            if !cx.keep {
                inputs.clear();
            } else {
                states.push(s);
            }
            inputs.push(y);
        }
        let y = inputs.pop().unwrap_or_else(|| x.to_vec());
        Ok((y, Box::new(StackSaved { inputs, states })))
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
        let StackSaved {
            mut inputs,
            mut states,
        } = *self::saved::<StackSaved>(saved, "stack")?;
        // needs[i]: whether block i's input gradient is used (something before it trains).
        let mut needs = Vec::with_capacity(self.blocks.len());
        let mut before = need_dx;
        for b in &self.blocks {
            needs.push(before);
            before |= b.trainable();
        }
        let mut d: Option<Vec<f32>> = None;
        for (i, b) in self.blocks.iter().enumerate().rev() {
            let s = states
                .pop()
                .ok_or_else(|| Error::State("stack: state missing".into()))?;
            let input = if i == 0 { None } else { inputs.pop() };
            let xi = input.as_deref().unwrap_or(x);
            let dyi = d.as_deref().unwrap_or(dy);
            if !needs[i] && !b.trainable() {
                return Ok(None);
            }
            d = b.backward(cx, xi, dyi, s, needs[i], grads)?;
            if !needs[i] {
                return Ok(None);
            }
        }
        Ok(Some(d.unwrap_or_else(|| dy.to_vec())))
    }
}

/// Activation checkpointing around a block: the forward keeps only the dropout masks it drew
/// (its input is kept by the caller); the backward runs the forward again with those masks
/// and then the block's backward. One block's activations live at a time, for one more
/// forward of it. Not nested (a checkpointed block inside another draws fresh masks when
/// recomputed).
pub(crate) struct Checkpointed<'a>(pub Box<dyn Block + 'a>);

impl Block for Checkpointed<'_> {
    fn trainable(&self) -> bool {
        self.0.trainable()
    }

    fn forward(&self, cx: &Cx, x: &[f32], _tape: &mut Tape) -> Result<(Vec<f32>, Saved)> {
        let mut rec = Tape::Record(Vec::new());
        let (y, inner) = self.0.forward(cx, x, &mut rec)?;
        drop(inner);
        let Tape::Record(masks) = rec else {
            unreachable!("the tape was made recording")
        };
        Ok((y, Box::new(masks)))
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
        let masks = *self::saved::<Vec<Vec<f32>>>(saved, "checkpointed block")?;
        let (_, inner) = self
            .0
            .forward(cx, x, &mut Tape::Replay(masks.into_iter()))?;
        self.0.backward(cx, x, dy, inner, need_dx, grads)
    }
}

impl Stack<'_> {
    /// Inference: the output of the blocks for `x`, without dropout and keeping nothing.
    pub(crate) fn infer(&self, cx: &Cx, x: &[f32]) -> Result<Vec<f32>> {
        let cx = &Cx { keep: false, ..*cx };
        Ok(self.forward(cx, x, &mut Tape::Eval)?.0)
    }
}

/// A model's end: from the last hidden states to the summed loss, and straight on to the
/// gradient of those hidden states (the head's forward and backward run back to back).
pub(crate) trait Head {
    /// `(loss, ∂loss/∂x)` for hidden states `x: [n, hidden]`, the gradient only when
    /// `need_dx`; pushes the gradients of the head's own trainable parameters.
    fn loss_and_grad(
        &self,
        cx: &Cx,
        x: &[f32],
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<(f64, Option<Vec<f32>>)>;
}

/// A whole training step on the embedded input `x: [n, hidden]`: the loss of `body` then
/// `head`, the gradients of every trainable parameter of both and, when `need_dx` (a trainable
/// embedding), the gradient of `x`.
pub(crate) fn train_step<H: Head>(
    cx: &Cx,
    body: &Stack,
    head: &H,
    x: &[f32],
    need_dx: bool,
) -> Result<(f64, Grads, Option<Vec<f32>>)> {
    let trains = body.trainable() || need_dx;
    let cx = &Cx {
        keep: trains,
        ..*cx
    };
    let (y, saved) = body.forward(cx, x, &mut Tape::Fresh)?;
    let mut grads = Vec::new();
    let (loss, dy) = head.loss_and_grad(cx, &y, trains, &mut grads)?;
    drop(y);
    let dx = match dy {
        Some(dy) => body.backward(cx, x, &dy, saved, need_dx, &mut grads)?,
        None => None,
    };
    Ok((loss, grads, dx))
}
