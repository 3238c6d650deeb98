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
//! (recomputing σ), parallel on rayon.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::lora_linear::{f32_slice, with_data};

/// `silu(g) ⊙ u` for two tensors of one shape.
pub(crate) struct SwiGluOp;

const CHUNK: usize = 16 * 1024;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

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
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(u.par_chunks(CHUNK))
            .for_each(|((y, g), u)| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gc, uc) = (g.contiguous()?, u.contiguous()?);
        let (want_g, want_u) = (g.track_op(), u.track_op());
        let (dg, du) = with_data(&gc, "gate", |gs| {
            with_data(&uc, "up", |us| {
                with_data(&dy, "dy", |ds| {
                    let n = gs.len();
                    let mut dg = vec![0f32; if want_g { n } else { 0 }];
                    let mut du = vec![0f32; if want_u { n } else { 0 }];
                    let dgc = if want_g { CHUNK } else { 1 };
                    let duc = if want_u { CHUNK } else { 1 };
                    // Empty outputs give zero chunks; pad with an iterator of empty slices.
                    let n_chunks = n.div_ceil(CHUNK);
                    let mut dg_chunks: Vec<&mut [f32]> = dg.chunks_mut(dgc).collect();
                    let mut du_chunks: Vec<&mut [f32]> = du.chunks_mut(duc).collect();
                    dg_chunks.resize_with(n_chunks, Default::default);
                    du_chunks.resize_with(n_chunks, Default::default);
                    dg_chunks
                        .into_par_iter()
                        .zip(du_chunks)
                        .zip(gs.par_chunks(CHUNK))
                        .zip(us.par_chunks(CHUNK))
                        .zip(ds.par_chunks(CHUNK))
                        .for_each(|((((dg, du), g), u), d)| {
                            for (i, ((g, u), d)) in g.iter().zip(u).zip(d).enumerate() {
                                let sg = sigmoid(*g);
                                if let Some(x) = dg.get_mut(i) {
                                    *x = d * u * sg * (1.0 + g * (1.0 - sg));
                                }
                                if let Some(x) = du.get_mut(i) {
                                    *x = d * g * sg;
                                }
                            }
                        });
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
