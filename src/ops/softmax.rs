//! Fused scaled, masked softmax for attention scores, with its own backward (CPU, f32).
//!
//! ```text
//! forward   p_ij  = softmax_j(c · s_ij + m_ij)     s: [..., t, S], m: [t, S] (0 or −∞), c: scale
//! backward  ds_ij = c · p_ij · (dp_ij − Σ_k dp_ik · p_ik)
//! ```
//!
//! Saves: the composed path is `* c`, `+ mask` (broadcast), `max`, `−max`, `exp`, `sum`, `/`
//! (seven passes and buffers over the `[b, h, t, S]` scores) and more than twice that in
//! backward; this op makes one pass each way (`kernels::softmax`), row-parallel on rayon, and
//! its backward reuses the forward's output instead of saving anything. (candle-nn's `softmax_last_dim` has no
//! backward.)

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::lora_linear::{f32_slice, with_data};
use crate::kernels::softmax::{softmax_backward, softmax_inplace};
use crate::kernels::{rows_per_task, vectorised, Isa};

/// `softmax(scale · x + mask)` over the last dim; `mask: [t, S]` repeats over the leading dims.
pub(crate) struct ScaledMaskedSoftmaxOp {
    /// The scale c applied to the scores.
    pub scale: f32,
    /// Additive mask `[t, S]` (contiguous f32), or none.
    pub mask: Option<Tensor>,
}

#[inline(always)]
fn softmax_rows(x: &[f32], y: &mut [f32], s: usize, scale: f32, mask: Option<&[f32]>, row0: usize) {
    for (i, (y, x)) in y.chunks_exact_mut(s).zip(x.chunks_exact(s)).enumerate() {
        let m = mask.map(|m| {
            let t = m.len() / s;
            let r = (row0 + i) % t;
            &m[r * s..(r + 1) * s]
        });
        match m {
            Some(m) => y
                .iter_mut()
                .zip(x)
                .zip(m)
                .for_each(|((y, x), m)| *y = x * scale + m),
            None => y.iter_mut().zip(x).for_each(|(y, x)| *y = x * scale),
        }
        // A fully masked row becomes NaN, as candle's composed path gives.
        softmax_inplace(y);
    }
}

impl CustomOp1 for ScaledMaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, "scores")?;
        let s = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        let rpt = rows_per_task(s);
        let scale = self.scale;
        let isa = Isa::current();
        let mut run = |mask: Option<&[f32]>| -> candle_core::Result<()> {
            if let Some(m) = mask {
                if m.len() % s != 0 || (x.len() / s) % (m.len() / s).max(1) != 0 {
                    candle_core::bail!("scaled-masked-softmax: mask does not fit {:?}", l.shape());
                }
            }
            y.par_chunks_mut(s * rpt)
                .zip(x.par_chunks(s * rpt))
                .enumerate()
                .for_each(|(k, (y, x))| {
                    vectorised(
                        isa,
                        #[inline(always)]
                        || softmax_rows(x, y, s, scale, mask, k * rpt),
                    )
                });
            Ok(())
        };
        match &self.mask {
            Some(m) => with_data(m, "mask", |m| run(Some(m)))?,
            None => run(None)?,
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = p.dims().last().copied().unwrap_or(1).max(1);
        let dp = dp.contiguous()?;
        let p = p.contiguous()?;
        let scale = self.scale;
        let isa = Isa::current();
        let dx = with_data(&p, "softmax output", |ps| {
            with_data(&dp, "dp", |gs| {
                let mut dx = vec![0f32; ps.len()];
                let rpt = rows_per_task(s);
                dx.par_chunks_mut(s * rpt)
                    .zip(ps.par_chunks(s * rpt))
                    .zip(gs.par_chunks(s * rpt))
                    .for_each(|((dx, p), g)| {
                        vectorised(
                            isa,
                            #[inline(always)]
                            || {
                                dx.copy_from_slice(g);
                                for (dx, p) in dx.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                                    softmax_backward(p, dx, scale);
                                }
                            },
                        )
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, p.shape(), p.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_tensor};
    use candle_core::{Device, Var, D};

    #[test]
    fn values_and_gradients_match_the_composed_path() {
        let dev = Device::Cpu;
        let (t, s) = (5, 7);
        // Causal mask with an offset of 2 (queries at positions 2..7 over keys 0..7).
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..s).map(move |j| if j > i + 2 { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &dev).unwrap();
        let x = Var::from_tensor(&rand_tensor(&[2, 3, t, s], 7)).unwrap();
        let up = rand_tensor(&[2, 3, t, s], 8);
        let scale = 0.35;
        for m in [Some(mask), None] {
            let op = ScaledMaskedSoftmaxOp {
                scale,
                mask: m.clone(),
            };
            let fused = x.as_tensor().apply_op1(op).unwrap();
            let z = (x.as_tensor() * scale as f64).unwrap();
            let z = match &m {
                Some(m) => z.broadcast_add(m).unwrap(),
                None => z,
            };
            let want = candle_nn::ops::softmax(&z, D::Minus1).unwrap();
            assert_close(&fused, &want, 1e-6);
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
                1e-6,
            );
        }
    }
}
