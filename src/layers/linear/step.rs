//! A LoRA linear layer's training step without candle's autograd: [`LoraLinear::forward_backward`].
//!
//! For a loss `L` of the output, given `dy = ∂L/∂y` (for `L = Σ y`, `dy` is one value broadcast,
//! which is read in place, not copied):
//!
//! ```text
//! y  = x·W0ᵀ + b + s·(x⊙m)·Aᵀ·Bᵀ
//! dA = s·(dy·B)ᵀ·(x⊙m)      dB = s·dyᵀ·((x⊙m)·Aᵀ)      dX = dy·W0 + s·((dy·B)·A)⊙m
//! ```
//!
//! On the CPU in f32 both passes are the fused op of `ops::lora_linear`, called directly: no
//! gradient store, no zero-filled accumulators, no copy of a broadcast `dy`, and no gradient for
//! anything but A, B and (when it tracks gradients) x. Elsewhere it is candle's autograd of
//! `Σ y ⊙ dy`, with the same results.

use std::sync::Arc;

use candle_core::{CustomOp3, DType, Tensor};

use super::LoraLinear;
use crate::error::{Error, Result};

/// What [`LoraLinear::forward_backward`] computes.
#[derive(Debug, Clone)]
pub struct LinearGrads {
    /// The layer's output `[..., out]` (training mode: dropout applied), detached.
    pub y: Tensor,
    /// `∂L/∂A`, `[r, in]`.
    pub a: Tensor,
    /// `∂L/∂B`, `[out, r]`.
    pub b: Tensor,
    /// `∂L/∂x`, `[..., in]`, when `x` tracks gradients (a variable or computed from one), as
    /// candle's backward would give it; else `None`.
    pub x: Option<Tensor>,
}

impl LoraLinear {
    /// One training step of the layer without autograd: the forward pass in training mode,
    /// then the gradients of a loss whose gradient with respect to the output is `dy(&y)`
    /// (the same shape as `y`). See the module doc for the math. Errors if the layer has no
    /// adapter or is merged.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use lora::{LoraLinear, LoraRng, LoraSpec};
    /// # fn main() -> lora::Result<()> {
    /// let w0 = Tensor::randn(0f32, 0.02, (32, 48), &Device::Cpu)?;
    /// let layer = LoraLinear::new(w0, None, &LoraSpec::new(4, 8.0), &LoraRng::new(0), "proj")?;
    /// let x = Tensor::randn(0f32, 1.0, (10, 48), &Device::Cpu)?;
    /// // L = Σ y: dy is 1 everywhere, one value broadcast.
    /// let g = layer.forward_backward(&x, |y| Ok(Tensor::ones((), DType::F32, y.device())?.broadcast_as(y.shape())?))?;
    /// assert_eq!((g.a.dims(), g.b.dims()), (&[4, 48][..], &[32, 4][..]));
    /// assert!(g.x.is_none()); // x is a plain tensor
    /// # Ok(()) }
    /// ```
    pub fn forward_backward(
        &self,
        x: &Tensor,
        dy: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<LinearGrads> {
        let (l, w) = match (&self.lora, self.merged) {
            (Some(l), false) => (l, self.weight()),
            _ => {
                return Err(Error::State(format!(
                    "forward_backward needs an unmerged adapter{}",
                    self.lora
                        .as_ref()
                        .map_or(String::new(), |l| format!(" (module `{}`)", l.name))
                )))
            }
        };
        let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
        if !self.fusable(x, w) || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            return self.autograd_step(x, dy);
        }
        let dims = x.dims();
        let (lead, inner) = dims.split_at(dims.len().saturating_sub(1));
        let (n, inp) = (
            lead.iter().product::<usize>(),
            inner.first().copied().unwrap_or(1),
        );
        let x2 = x.reshape((n, inp))?.contiguous()?;
        let op: Arc<Box<dyn CustomOp3 + Send + Sync>> =
            Arc::new(Box::new(self.lora_op(w, l, n * inp, true)));
        let y2 = x2.apply_op3_arc(a, b, op.clone())?.detach();
        let mut out_shape = lead.to_vec();
        out_shape.push(y2.dim(1)?);
        let y = y2.reshape(out_shape)?;
        let dy = checked_dy(dy(&y)?, &y, &l.name)?;
        let dy2 = if dy.stride().iter().all(|&s| s == 0) {
            // One value broadcast (the gradient of a sum): stays a view.
            let mut one = dy;
            while one.rank() > 0 {
                one = one.get(0)?;
            }
            one.broadcast_as(y2.shape())?
        } else {
            dy.reshape(y2.shape())?
        };
        let (dx, da, db) = op.bwd(&x2, a, b, &y2, &dy2)?;
        let missing = || {
            Error::State(format!(
                "module `{}`: the fused backward gave no dA/dB",
                l.name
            ))
        };
        Ok(LinearGrads {
            y,
            a: da.ok_or_else(missing)?,
            b: db.ok_or_else(missing)?,
            x: dx.map(|d| d.reshape(x.shape())).transpose()?,
        })
    }

    /// [`LoraLinear::forward_backward`] through candle's autograd of `Σ y ⊙ dy`.
    fn autograd_step(
        &self,
        x: &Tensor,
        dy: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<LinearGrads> {
        let l = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::State("no adapter".into()))?;
        let y = self.forward_t(x, true)?;
        let dy = checked_dy(dy(&y)?, &y, &l.name)?.detach();
        let grads = (&y * &dy.to_dtype(y.dtype())?)?.sum_all()?.backward()?;
        let get = |t: &Tensor| {
            grads.get(t).cloned().ok_or_else(|| {
                Error::State(format!("module `{}`: autograd gave no gradient", l.name))
            })
        };
        Ok(LinearGrads {
            y: y.detach(),
            a: get(l.a.as_tensor())?,
            b: get(l.b.as_tensor())?,
            x: grads.get(x).cloned(),
        })
    }
}

/// `dy`, after checking that it has `y`'s shape.
fn checked_dy(dy: Tensor, y: &Tensor, name: &str) -> Result<Tensor> {
    if dy.dims() != y.dims() {
        return Err(Error::ShapeMismatch {
            key: format!("{name} (dy)"),
            got: dy.dims().to_vec(),
            what: format!(
                "the output's gradient, shaped like the output {:?}",
                y.dims()
            ),
        });
    }
    Ok(dy)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::config::InitLoraWeights;
    use crate::layers::{normal, LoraRng, LoraSpec};
    use crate::testutil::rel_diff;

    fn layer(bias: bool) -> LoraLinear {
        let rng = LoraRng::new(3);
        let spec = LoraSpec {
            init: InitLoraWeights::Random,
            ..LoraSpec::new(4, 8.0)
        };
        let w = normal(&[24, 40], 0.1, &rng, &Device::Cpu).unwrap();
        let b = bias.then(|| normal(&[24], 0.1, &rng, &Device::Cpu).unwrap());
        LoraLinear::new(w, b, &spec, &rng, "l").unwrap()
    }

    /// The explicit step equals candle's autograd of the same loss, within 1e-5 relative:
    /// A, B, x and y, for a broadcast `dy` (L = Σ y) and a dense one, on both forward paths
    /// (few rows: low-rank; many rows: merged weight), with and without x's gradient.
    #[test]
    fn forward_backward_matches_autograd() {
        for (rows, bias) in [(3, true), (200, false)] {
            let l = layer(bias);
            let x = normal(&[2, rows, 40], 1.0, &LoraRng::new(5), &Device::Cpu).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let c = normal(&[2, rows, 24], 1.0, &LoraRng::new(6), &Device::Cpu).unwrap();
            for dense in [false, true] {
                for xin in [&x, xv.as_tensor()] {
                    let dy = |y: &Tensor| -> Result<Tensor> {
                        Ok(if dense {
                            c.clone()
                        } else {
                            Tensor::ones((), DType::F32, y.device())?.broadcast_as(y.shape())?
                        })
                    };
                    let got = l.forward_backward(xin, dy).unwrap();
                    let want = l.autograd_step(xin, dy).unwrap();
                    let what =
                        format!("rows {rows}, dense dy {dense}, x var {}", xin.is_variable());
                    for (n, g, w) in [
                        ("y", &got.y, &want.y),
                        ("A", &got.a, &want.a),
                        ("B", &got.b, &want.b),
                    ] {
                        let r = rel_diff(g, w);
                        assert!(r <= 1e-5, "{n} ({what}): relative difference {r}");
                    }
                    match (&got.x, &want.x) {
                        (Some(g), Some(w)) => {
                            let r = rel_diff(g, w);
                            assert!(r <= 1e-5, "dx ({what}): relative difference {r}");
                        }
                        (None, None) => assert!(!xin.is_variable(), "{what}"),
                        _ => panic!("dx present in one path only ({what})"),
                    }
                }
            }
        }
    }

    /// A merged layer, a plain layer and a `dy` of the wrong shape are refused.
    #[test]
    fn refuses_merged_plain_and_misshapen() {
        let x = normal(&[5, 40], 1.0, &LoraRng::new(5), &Device::Cpu).unwrap();
        let ones = |y: &Tensor| Ok(y.ones_like()?);
        let mut l = layer(false);
        crate::layers::Mergeable::merge(&mut l).unwrap();
        assert!(l.forward_backward(&x, ones).is_err());
        let plain = LoraLinear::frozen(l.weight().clone(), None);
        assert!(plain.forward_backward(&x, ones).is_err());
        let l = layer(false);
        let bad = |_: &Tensor| Ok(Tensor::ones((5, 23), DType::F32, &Device::Cpu)?);
        let e = l.forward_backward(&x, bad).unwrap_err().to_string();
        assert!(e.contains("dy"), "{e}");
    }
}
