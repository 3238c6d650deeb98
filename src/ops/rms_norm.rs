//! Fused RMSNorm with its own backward (CPU, f32).
//!
//! ```text
//! forward   inv_i = 1/√(mean_j x_ij² + ε)      [N]        (saved for backward)
//!           y_ij  = w_j · x_ij · inv_i          [N, H]
//! backward  x̂ = x·inv,  ĝ = dy ⊙ w
//!           dx_i = inv_i · (ĝ_i − x̂_i · mean_j(ĝ_ij · x̂_ij))
//!           dw   = Σ_i dy_i ⊙ x̂_i               only when w is trainable
//! ```
//!
//! Saves: the composed candle path runs 7 ops forward (`sqr`, `mean`, `+ε`, `sqrt`, `recip`,
//! two broadcast products, each a full pass and a fresh buffer) and about twice as many in
//! backward, each gradient accumulated through a zero tensor; this op makes one pass forward
//! and one backward (`kernels::norm`). (candle-nn's fused `rms_norm` has no backward.)

use std::sync::Mutex;

use super::lora_linear::{f32_slice, with_data};
use crate::kernels::norm::{rms_norm_backward, rms_norm_forward, rms_norm_weight_grad};
use crate::kernels::Isa;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// `y = w ⊙ x / √(mean(x²) + ε)` over the last dim; build one per forward call.
pub(crate) struct RmsNormOp {
    /// ε.
    pub eps: f32,
    /// `inv` per row, saved by the forward.
    pub saved_inv: Mutex<Option<Vec<f32>>>,
}

impl RmsNormOp {
    pub(crate) fn new(eps: f64) -> Self {
        RmsNormOp {
            eps: eps as f32,
            saved_inv: Mutex::new(None),
        }
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "norm weight")?;
        let h = w.len();
        if h == 0 || l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms-norm: x {:?} does not end in {h}", l1.shape());
        }
        let (y, inv) = rms_norm_forward(Isa::current(), x, w, self.eps);
        *self.saved_inv.lock().unwrap_or_else(|e| e.into_inner()) = Some(inv);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let isa = Isa::current();
        let saved = self
            .saved_inv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let x = x.contiguous()?;
        let dy = dy.contiguous()?;
        let eps = self.eps;
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (dx, dw) = with_data(&x, "x", |xs| {
            with_data(&dy, "dy", |gs| {
                with_data(w, "norm weight", |ws| {
                    let inv = saved.unwrap_or_else(|| rms_norm_forward(isa, xs, ws, eps).1);
                    let dx = want_dx.then(|| {
                        let mut dx = vec![0f32; xs.len()];
                        rms_norm_backward(isa, gs, xs, &inv, ws, &mut dx, false);
                        dx
                    });
                    let dw = want_dw.then(|| rms_norm_weight_grad(isa, gs, xs, &inv));
                    Ok((dx, dw))
                })
            })
        })?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        let dw = dw
            .map(|v| Tensor::from_vec(v, w.shape(), w.device()))
            .transpose()?;
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_tensor};
    use candle_core::{Var, D};

    fn plain(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let inv = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
    }

    #[test]
    fn values_and_gradients_match_the_composed_path() {
        let x = Var::from_tensor(&rand_tensor(&[3, 5, 16], 1)).unwrap();
        let w = Var::from_tensor(&(rand_tensor(&[16], 2) + 1.0).unwrap()).unwrap();
        let up = rand_tensor(&[3, 5, 16], 3); // a random upstream gradient via Σ y ⊙ up
        let eps = 1e-6;
        let fused = x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNormOp::new(eps))
            .unwrap();
        let want = plain(x.as_tensor(), w.as_tensor(), eps);
        assert_close(&fused, &want, 1e-6);
        let g1 = (fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert_close(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn frozen_weight_gets_no_gradient() {
        let x = Var::from_tensor(&rand_tensor(&[4, 8], 4)).unwrap();
        let w = rand_tensor(&[8], 5);
        let y = x.as_tensor().apply_op2(&w, RmsNormOp::new(1e-5)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
        assert!(g.get(x.as_tensor()).is_some());
    }
}
