//! Fused rotary position embedding with the head transpose, with its own backward (CPU, f32).
//!
//! ```text
//! input  x: [b, t, h·d] (a projection's output, contiguous), cos/sin: [t, d]
//! forward   y[b, h, t, :] = x̃ ⊙ cos[t] + rotate_half(x̃) ⊙ sin[t],  x̃ = x[b, t, h·d + 0..d]
//!           rotate_half([x₁, x₂]) = [−x₂, x₁]                       y: [b, h, t, d] contiguous
//! backward  dx̃ = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin),  rotate_halfᵀ([a₁, a₂]) = [a₂, −a₁]
//! ```
//!
//! Saves: the composed path is `reshape`/`transpose`, two `narrow`s, `neg`, `cat`, two
//! broadcast products and an add (the transpose and the `cat` each copy), about as many again
//! in backward with zero-initialised accumulation; this op rotates the projection in place
//! (`kernels::rope`) and writes the heads transposed once, each way, parallel on rayon.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::lora_linear::{f32_slice, with_data};
use crate::kernels::rope::rope_inplace;
use crate::kernels::Isa;

/// RoPE on `[b, t, heads·d]` giving `[b, heads, t, d]`.
pub(crate) struct RopeOp {
    /// Number of heads h.
    pub heads: usize,
    /// `[t, d]` contiguous f32.
    pub cos: Tensor,
    /// `[t, d]` contiguous f32.
    pub sin: Tensor,
}

impl RopeOp {
    fn dims(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
        let (b, t, hd) = shape.dims3()?;
        let (ct, d) = self.cos.dims2()?;
        if ct != t || hd != self.heads * d || d % 2 != 0 {
            candle_core::bail!(
                "rope: x {shape:?} vs cos [{ct}, {d}] with {} heads",
                self.heads
            );
        }
        Ok((b, t, d))
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, "x")?;
        let (b, t, d) = self.dims(l.shape())?;
        let h = self.heads;
        let isa = Isa::current();
        let mut rot = x.to_vec();
        with_data(&self.cos, "cos", |cos| {
            with_data(&self.sin, "sin", |sin| {
                rope_inplace(isa, &mut rot, t, h, cos, sin, false);
                Ok(())
            })
        })?;
        // [b, t, h, d] → [b, h, t, d], one task per (batch, head).
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, yb)| {
            let (bi, hi) = (bh / h, bh % h);
            for (p, yr) in yb.chunks_exact_mut(d).enumerate() {
                yr.copy_from_slice(&rot[((bi * t + p) * h + hi) * d..][..d]);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, d) = self.dims(x.shape())?;
        let h = self.heads;
        let dy = dy.contiguous()?;
        let isa = Isa::current();
        let mut dx = vec![0f32; x.elem_count()];
        with_data(&dy, "dy", |g| {
            // [b, h, t, d] → [b, t, h, d], one task per (batch, position).
            dx.par_chunks_mut(h * d).enumerate().for_each(|(bt, row)| {
                let (bi, p) = (bt / t, bt % t);
                for (hi, out) in row.chunks_exact_mut(d).enumerate() {
                    out.copy_from_slice(&g[((bi * h + hi) * t + p) * d..][..d]);
                }
            });
            with_data(&self.cos, "cos", |cos| {
                with_data(&self.sin, "sin", |sin| {
                    rope_inplace(isa, &mut dx, t, h, cos, sin, true);
                    Ok(())
                })
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, t, h * d), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_tensor};
    use candle_core::{Var, D};

    #[test]
    fn values_and_gradients_match_the_composed_path() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&rand_tensor(&[b, t, h * d], 1)).unwrap();
        let cos = rand_tensor(&[t, d], 2);
        let sin = rand_tensor(&[t, d], 3);
        let op = RopeOp {
            heads: h,
            cos: cos.clone(),
            sin: sin.clone(),
        };
        let fused = x.as_tensor().apply_op1(op).unwrap();
        let q = x
            .as_tensor()
            .reshape((b, t, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let x1 = q.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = q.narrow(D::Minus1, d / 2, d / 2).unwrap();
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let want = (q.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap();
        assert_close(&fused, &want, 1e-6);
        let up = rand_tensor(&[b, h, t, d], 4);
        let g1 = (fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
            1e-5,
        );
    }
}
