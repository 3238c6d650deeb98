//! Fused SwiGLU gate `silu(g) ⊙ u` with its own backward (CPU, f32).
//!
//! ```text
//! forward   y  = silu(g) ⊙ u,   silu(g) = g·σ(g)
//! backward  dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))
//!           du = dy ⊙ silu(g)
//! ```
//!
//! Saves: the composed path keeps `silu(g)` as an extra `[N, I]` activation and its backward
//! runs `silu'` as six elementwise ops plus two products, each a fresh buffer, with every
//! gradient accumulated through a zero tensor; this op makes one pass forward and one backward
//! (recomputing σ) with `kernels::activation`.

use super::lora_linear::{f32_slice, with_data};
use crate::kernels::activation::{swiglu_backward, swiglu_forward};
use crate::kernels::Isa;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// `silu(g) ⊙ u` for two tensors of one shape.
pub(crate) struct SwiGluOp;

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gate")?;
        let u = f32_slice(s2, l2, "up")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape());
        }
        let y = swiglu_forward(Isa::current(), g, u);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let isa = Isa::current();
        let dy = dy.contiguous()?;
        let (gc, uc) = (g.contiguous()?, u.contiguous()?);
        let (want_g, want_u) = (g.track_op(), u.track_op());
        let (dg, du) = with_data(&gc, "gate", |gs| {
            with_data(&uc, "up", |us| {
                with_data(&dy, "dy", |ds| {
                    // The kernel writes both gradients over copies of the inputs.
                    let (mut dg, mut du) = (gs.to_vec(), us.to_vec());
                    swiglu_backward(isa, &mut dg, &mut du, ds);
                    Ok((dg, du))
                })
            })
        })?;
        let mk = |v: Vec<f32>, want: bool| -> candle_core::Result<Option<Tensor>> {
            want.then(|| Tensor::from_vec(v, g.shape(), g.device()))
                .transpose()
        };
        Ok((mk(dg, want_g)?, mk(du, want_u)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_tensor};
    use candle_core::Var;

    #[test]
    fn values_and_gradients_match_the_composed_path() {
        let g = Var::from_tensor(&(rand_tensor(&[3, 40_000], 1) * 3.0).unwrap()).unwrap();
        let u = Var::from_tensor(&rand_tensor(&[3, 40_000], 2)).unwrap();
        let up = rand_tensor(&[3, 40_000], 3);
        let fused = g.as_tensor().apply_op2(u.as_tensor(), SwiGluOp).unwrap();
        let want = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert_close(&fused, &want, 1e-5);
        let g1 = (fused * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            assert_close(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn only_tracked_inputs_get_gradients() {
        let g = Var::from_tensor(&rand_tensor(&[5, 7], 4)).unwrap();
        let u = rand_tensor(&[5, 7], 5);
        let y = g.as_tensor().apply_op2(&u, SwiGluOp).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&u).is_none());
        let want = (g.as_tensor().silu().unwrap() * &u).unwrap();
        let g2 = want.sum_all().unwrap().backward().unwrap();
        assert_close(
            grads.get(g.as_tensor()).unwrap(),
            g2.get(g.as_tensor()).unwrap(),
            1e-5,
        );
    }
}
