//! AdamW's update of one parameter in three in-place passes (PyTorch's `_single_tensor_adam`
//! with decoupled weight decay), for the optimizer's f32 CPU parameters:
//!
//! ```text
//! p ← p·(1 − lr·wd)            (when the parameter decays)
//! m ← m + (g − m)·(1 − β1)
//! v ← v·β2 + g²·(1 − β2)
//! p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! The tensor path (`train::optim`) runs the same formula as a dozen candle ops, each a pass
//! over the parameter and a fresh buffer; under full fine-tuning of all-MiniLM-L6-v2 (22.7M
//! parameters, 11.7M of them the word-embedding table) those passes were a large share of a
//! step. Tested against that path.

use rayon::prelude::*;

use super::{vectorised, zip_update, Isa, CHUNK};

/// The scalars of one parameter update (f32, as the tensor path applies them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    /// `1 − lr·wd` (1 without decay).
    pub keep: f32,
    /// `1 / √(1 − β2ᵗ)`.
    pub inv_bc2_sqrt: f32,
    /// `ε`.
    pub eps: f32,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f32,
}

/// The first moment: `m ← m + (g − m)·(1 − β1)` in place.
pub(crate) fn first_moment(isa: Isa, m: &mut [f32], g: &[f32], one_minus_b1: f32) {
    zip_update(isa, m, g, |m, g| *m += (g - *m) * one_minus_b1);
}

/// The second moment: `v ← v·β2 + g²·(1 − β2)` in place.
pub(crate) fn second_moment(isa: Isa, v: &mut [f32], g: &[f32], b2: f32, one_minus_b2: f32) {
    zip_update(isa, v, g, |v, g| *v = *v * b2 + g * g * one_minus_b2);
}

/// The parameter: `p ← p·keep − step_size · m / (√v / √(1 − β2ᵗ) + ε)` in place.
pub(crate) fn update_param(isa: Isa, s: AdamWStep, p: &mut [f32], m: &[f32], v: &[f32]) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK))
        .zip(v.par_chunks(CHUNK))
        .for_each(|((p, m), v)| {
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        let denom = v.sqrt() * s.inv_bc2_sqrt + s.eps;
                        *p = *p * s.keep - m / denom * s.step_size;
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three steps of the three passes against PyTorch's formula in f64 (weight decay on,
    /// gradients of mixed sign and size), within 1e-6 relative, on every target.
    #[test]
    fn matches_the_formula_in_f64() {
        let (lr, wd, b1, b2, eps) = (1e-2f64, 0.1f64, 0.9f64, 0.999f64, 1e-8f64);
        let n = 3 * CHUNK + 17;
        let p0: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let grad = |step: usize, i: usize| ((i * 13 + step * 7) % 29) as f32 / 7.0 - 2.0;
        for isa in Isa::supported() {
            let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
            let mut want: Vec<(f64, f64, f64)> =
                p0.iter().map(|&p| (f64::from(p), 0.0, 0.0)).collect();
            for step in 1..=3 {
                let g: Vec<f32> = (0..n).map(|i| grad(step, i)).collect();
                let t = step as i32;
                let (bc1, bc2s) = (1.0 - b1.powi(t), (1.0 - b2.powi(t)).sqrt());
                let s = AdamWStep {
                    keep: (1.0 - lr * wd) as f32,
                    inv_bc2_sqrt: (1.0 / bc2s) as f32,
                    eps: eps as f32,
                    step_size: (lr / bc1) as f32,
                };
                first_moment(isa, &mut m, &g, (1.0 - b1) as f32);
                second_moment(isa, &mut v, &g, b2 as f32, (1.0 - b2) as f32);
                update_param(isa, s, &mut p, &m, &v);
                for ((wp, wm, wv), &g) in want.iter_mut().zip(&g) {
                    let g = f64::from(g);
                    *wp *= 1.0 - lr * wd;
                    *wm += (g - *wm) * (1.0 - b1);
                    *wv = *wv * b2 + g * g * (1.0 - b2);
                    *wp -= lr / bc1 * *wm / (wv.sqrt() / bc2s + eps);
                }
            }
            for (i, (got, (wp, _, _))) in p.iter().zip(&want).enumerate() {
                let got = f64::from(*got);
                assert!(
                    (got - wp).abs() <= 1e-6 * (1.0 + wp.abs()),
                    "{isa}: element {i}: {got} vs {wp}"
                );
            }
        }
    }
}
