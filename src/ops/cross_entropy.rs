//! Fused cross-entropy over selected rows, with its own backward (CPU, f32).
//!
//! ```text
//! x: [R, V] logits, rows r_k and targets y_k (k < N)
//! forward   lse_k = log Σ_v exp(x[r_k, v])                 (max-shifted)
//!           L     = Σ_k (lse_k − x[r_k, y_k])             a scalar
//! backward  dx[r_k, v] = dL · (exp(x[r_k, v] − lse_k) − [v = y_k]);  other rows 0
//! ```
//!
//! Saves: the composed path copies the predicted rows out (`index_select`), then runs `max`,
//! `−max`, `exp`, `sum`, `log`, `−lse` and `gather` over `[N, V]`, and in backward about as
//! many passes plus a scatter back into a zero `[R, V]`; this op reads the logits once forward
//! and writes the gradient once (`kernels::softmax`), row-parallel on rayon, without the
//! `[N, V]` copies.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::lora_linear::{f32_slice, with_data};
use crate::kernels::softmax::{cross_entropy_inplace, log_sum_exp_rows};
use crate::kernels::Isa;

/// `Σ_k −log softmax(x[rows[k]])[targets[k]]`; rows must be distinct and in range (the caller
/// checks labels first).
pub(crate) struct CrossEntropyOp {
    /// Row of each predicted token in the flat `[R, V]` logits.
    pub rows: Vec<u32>,
    /// Its target class.
    pub targets: Vec<u32>,
}

impl CrossEntropyOp {
    pub(crate) fn new(rows: Vec<u32>, targets: Vec<u32>) -> Self {
        CrossEntropyOp { rows, targets }
    }
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, "logits")?;
        let (r, v) = l.shape().dims2()?;
        if let Some(bad) = self
            .rows
            .iter()
            .zip(&self.targets)
            .find(|(&i, &t)| i as usize >= r || t as usize >= v)
        {
            candle_core::bail!("cross-entropy: row/target {bad:?} outside [{r}, {v}]");
        }
        let lse = log_sum_exp_rows(Isa::current(), x, v, &self.rows);
        let sum: f64 = lse
            .iter()
            .zip(&self.rows)
            .zip(&self.targets)
            .map(|((l, &i), &t)| (l - x[i as usize * v + t as usize]) as f64)
            .sum();
        Ok((CpuStorage::F32(vec![sum as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dl: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (r, v) = x.dims2()?;
        let g = dl.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let x = x.contiguous()?;
        let mut targets = vec![None; r];
        for (&i, &t) in self.rows.iter().zip(&self.targets) {
            targets[i as usize] = Some(t);
        }
        let isa = Isa::current();
        let dx = with_data(&x, "logits", |xs| {
            // The kernel turns the logits into `softmax − onehot` (0 in rows without a target).
            let mut dx = xs.to_vec();
            cross_entropy_inplace(isa, &mut dx, v, &targets);
            if g != 1.0 {
                dx.par_iter_mut().for_each(|d| *d *= g);
            }
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, (r, v), x.device())?))
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
        let x = Var::from_tensor(&(rand_tensor(&[6, 11], 1) * 4.0).unwrap()).unwrap();
        let (rows, targets) = (vec![0u32, 2, 3, 5], vec![10u32, 0, 4, 4]);
        let op = CrossEntropyOp::new(rows.clone(), targets.clone());
        let fused = x.as_tensor().apply_op1(op).unwrap();
        // Composed: gather the rows, log-softmax, pick the targets.
        let picked = x
            .as_tensor()
            .index_select(&Tensor::new(rows.as_slice(), &dev).unwrap(), 0)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&picked, D::Minus1).unwrap();
        let t = Tensor::from_vec(targets, (4, 1), &dev).unwrap();
        let want = logp
            .gather(&t, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        assert_close(&fused, &want, 1e-5);
        let g1 = (fused * 0.7).unwrap().backward().unwrap();
        let g2 = (want * 0.7).unwrap().backward().unwrap();
        assert_close(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
            1e-6,
        );
    }
}
