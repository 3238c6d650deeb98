//! Fused LoRA linear op with its own backward (CPU, f32).
//!
//! ```text
//! forward   xa = s·(x⊙m)·Aᵀ          [N, r]    (saved for backward; m = dropout mask or 1)
//!           y  = x·W0ᵀ + b + xa·Bᵀ   [N, out]  (bias written first, both GEMMs accumulate into y)
//! backward  g  = dy·B                [N, r]
//!           dB = dyᵀ·xa              [out, r]
//!           dA = s·gᵀ·(x⊙m)          [r, in]
//!           dX = dy·W0 + s·(g·A)⊙m   [N, in]   only when x needs a gradient
//! ```
//!
//! candle's generic backward would also compute `dW0 = dyᵀ·x` (an `N×out×in` GEMM, as large as
//! the forward) for the frozen weight and accumulate every gradient through a fresh zero
//! tensor; this op computes only what is needed. The low-rank path is two skinny GEMMs with the
//! scale folded into the first; `B·A` is never formed. Tested against the plain tensor path.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Storage, Tensor};

use super::gemm::gemm_f32;

/// The fused LoRA op; build one per forward call.
pub(crate) struct LoraLinearOp {
    /// Frozen `[out, in]`, contiguous f32 on the CPU.
    pub w0: Tensor,
    /// Frozen `[out]`.
    pub bias: Option<Tensor>,
    /// The LoRA scale s.
    pub scale: f32,
    /// Inverted-dropout mask `[N, in]`, if training with dropout.
    pub mask: Option<Tensor>,
    /// `s·(x⊙m)·Aᵀ`, saved by the forward for the backward.
    pub saved_xa: Mutex<Option<Tensor>>,
}

/// A frozen linear layer `y = x·W0ᵀ + b` whose backward gives only `dX = dy·W0`.
pub(crate) struct FrozenLinearOp {
    /// Frozen `[out, in]`, contiguous f32 on the CPU.
    pub w0: Tensor,
    /// Frozen `[out]`.
    pub bias: Option<Tensor>,
}

pub(super) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lora op: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("lora op: {what} must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(super) fn with_data<T>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(cpu) => f(f32_slice(cpu, l, what)?),
        _ => candle_core::bail!("lora op: {what} must be on the CPU"),
    }
}

/// `y = x·W0ᵀ + b` into a new `[n, out]` buffer.
fn frozen_forward(
    x: &[f32],
    n: usize,
    inp: usize,
    w0: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Vec<f32>> {
    let out = w0.dim(0)?;
    let mut y = vec![0f32; n * out];
    if let Some(b) = bias {
        with_data(b, "bias", |b| {
            for row in y.chunks_exact_mut(out) {
                row.copy_from_slice(b);
            }
            Ok(())
        })?;
    }
    with_data(w0, "W0", |w| {
        // rhs = W0ᵀ: element (k, j) = w[j·in + k]
        gemm_f32(
            n,
            out,
            inp,
            &mut y,
            bias.is_some(),
            x,
            (inp, 1),
            w,
            (1, inp),
            1.0,
        );
        Ok(())
    })?;
    Ok(y)
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let a = f32_slice(s2, l2, "lora_A")?;
        let b = f32_slice(s3, l3, "lora_B")?;
        let (n, inp) = l1.shape().dims2()?;
        let r = l2.shape().dims2()?.0;
        let out = l3.shape().dims2()?.0;
        let masked;
        let xd: &[f32] = match &self.mask {
            Some(m) => {
                masked = with_data(m, "mask", |m| {
                    Ok(x.iter().zip(m).map(|(x, m)| x * m).collect::<Vec<f32>>())
                })?;
                &masked
            }
            None => x,
        };
        let mut xa = vec![0f32; n * r];
        // rhs = Aᵀ: element (k, j) = a[j·in + k]
        gemm_f32(
            n,
            r,
            inp,
            &mut xa,
            false,
            xd,
            (inp, 1),
            a,
            (1, inp),
            self.scale,
        );
        let mut y = frozen_forward(x, n, inp, &self.w0, self.bias.as_ref())?;
        // rhs = Bᵀ: element (k, j) = b[j·r + k]
        gemm_f32(n, out, r, &mut y, true, &xa, (r, 1), b, (1, r), 1.0);
        let saved = Tensor::from_vec(xa, (n, r), &Device::Cpu)?;
        *self.saved_xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x_tracks = x.track_op();
        // Detached inputs: the gradients must not carry a graph. A and B are variables and x
        // holds the whole forward graph; a gradient built from them would keep every
        // activation alive for as long as the gradient (or optimizer state made from it) lives.
        let (x, a, b) = (&x.detach(), &a.detach(), &b.detach());
        let dy = dy.detach().contiguous()?;
        let xd = match &self.mask {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        let saved = self
            .saved_xa
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let xa = match saved {
            Some(xa) => xa,
            None => (xd.matmul(&a.t()?)? * self.scale as f64)?,
        };
        let g = dy.matmul(b)?; // [N, r]
        let db = dy.t()?.matmul(&xa)?; // [out, r]
        let da = (g.t()?.matmul(&xd)? * self.scale as f64)?; // [r, in]
        let dx = if x_tracks {
            let low = (g.matmul(a)? * self.scale as f64)?; // [N, in]
            let low = match &self.mask {
                Some(m) => low.mul(m)?,
                None => low,
            };
            Some((dy.matmul(&self.w0)? + low)?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "x")?;
        let (n, inp) = l.shape().dims2()?;
        let y = frozen_forward(x, n, inp, &self.w0, self.bias.as_ref())?;
        Ok((CpuStorage::F32(y), Shape::from((n, self.w0.dim(0)?))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.matmul(&self.w0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, rand_tensor};
    use candle_core::Var;

    /// The gradients match the plain path and carry no graph: a gradient that tracked ops
    /// would keep the forward activations (and, through optimizer state built from it, every
    /// earlier step's) alive.
    #[test]
    fn gradients_match_the_plain_path_and_are_detached() {
        let x = Var::from_tensor(&rand_tensor(&[6, 5], 1)).unwrap();
        let w0 = rand_tensor(&[4, 5], 2);
        let a = Var::from_tensor(&rand_tensor(&[2, 5], 3)).unwrap();
        let b = Var::from_tensor(&rand_tensor(&[4, 2], 4)).unwrap();
        let h = (x.as_tensor() * 2.0).unwrap(); // an op between the leaf and the layer
        let op = LoraLinearOp {
            w0: w0.clone(),
            bias: None,
            scale: 0.5,
            mask: None,
            saved_xa: Default::default(),
        };
        let y = h.apply_op3(a.as_tensor(), b.as_tensor(), op).unwrap();
        let want = (h.matmul(&w0.t().unwrap()).unwrap()
            + (h.matmul(&a.as_tensor().t().unwrap()).unwrap() * 0.5)
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap())
        .unwrap();
        assert_close(&y, &want, 1e-6);
        let up = rand_tensor(&[6, 4], 5);
        let g1 = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &a, &b] {
            let g = g1.get(v.as_tensor()).unwrap();
            assert_close(g, g2.get(v.as_tensor()).unwrap(), 1e-5);
        }
        for v in [&a, &b] {
            assert!(!g1.get(v.as_tensor()).unwrap().track_op());
        }
    }
}
