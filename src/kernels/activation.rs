//! The MLPs' element-wise activations, forward and backward, parallel over chunks on rayon.
//!
//! ```text
//! SwiGLU  y = silu(g) ⊙ u,  silu(g) = g·σ(g),  σ(g) = 1/(1 + e^−g)      g, u, y: [N, I]
//!         dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))),  du = dy ⊙ silu(g)
//! GELU    y = x·Φ(x) = ½·x·(1 + erf(x/√2))                              x, y: [N]
//!         dx = dy ⊙ (Φ(x) + x·φ(x)),  φ(x) = e^(−x²/2)/√(2π)
//! ```
//!
//! GELU is the exact (erf) form, transformers' `"gelu"` (BERT, MiniLM); `erf` is Abramowitz &
//! Stegun 7.1.26 (absolute error ≤ 1.5·10⁻⁷) with the vectorised `exp`.

use rayon::prelude::*;

use super::vecmath::exp1;
use super::{filled, vectorised, Isa, CHUNK};

/// `silu(g) ⊙ u = g·u / (1 + e^−g)` for `g, u` of one length.
pub(crate) fn swiglu_forward(isa: Isa, g: &[f32], u: &[f32]) -> Vec<f32> {
    let len = g.len().min(u.len());
    // SAFETY: the pieces of `y` pair with equally long pieces of `g` and `u` (all at least
    // `len` long), so every one of the `len` values is written.
    unsafe {
        filled(len, |y| {
            y.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(u.par_chunks(CHUNK))
                .for_each(|((y, g), u)| {
                    vectorised(
                        isa,
                        #[inline(always)]
                        || {
                            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                                y.write(g / (1.0 + exp1(-g)) * u);
                            }
                        },
                    )
                })
        })
    }
}

/// The gradients of [`swiglu_forward`] for `dy`, written over `g` and `u` (`(dg, du)`).
pub(crate) fn swiglu_backward(isa: Isa, g: &mut [f32], u: &mut [f32], dy: &[f32]) {
    g.par_chunks_mut(CHUNK)
        .zip(u.par_chunks_mut(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((g, u), dy)| {
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for ((g, u), dy) in g.iter_mut().zip(u.iter_mut()).zip(dy) {
                        let sig = 1.0 / (1.0 + exp1(-*g));
                        let silu = *g * sig;
                        let dg = dy * *u * sig * (1.0 + *g * (1.0 - sig));
                        *u = dy * silu;
                        *g = dg;
                    }
                },
            )
        });
}

/// `erf(x)`, branch-free (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5·10⁻⁷).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp1(-a * a)).copysign(x)
}

/// `Φ(x) = ½·(1 + erf(x/√2))`.
#[inline(always)]
fn phi_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU (erf form) of every element: `y = x·Φ(x)`.
pub(crate) fn gelu_forward(isa: Isa, x: &[f32]) -> Vec<f32> {
    // SAFETY: each chunk of `y` pairs with an equally long chunk of `x`; all are written.
    unsafe {
        filled(x.len(), |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| {
                    vectorised(
                        isa,
                        #[inline(always)]
                        || {
                            for (y, &x) in y.iter_mut().zip(x) {
                                y.write(x * phi_cdf(x));
                            }
                        },
                    )
                })
        })
    }
}

/// GELU's backward: `dx (+)= dy ⊙ (Φ(x) + x·φ(x))` (added to `dx` when `acc`).
pub(crate) fn gelu_backward(isa: Isa, x: &[f32], dy: &[f32], dx: &mut [f32], acc: bool) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((dx, x), dy)| {
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                        let d = phi_cdf(x) + x * INV_SQRT_2PI * exp1(-0.5 * x * x);
                        *dx = if acc { *dx + dy * d } else { dy * d };
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    fn erf64(x: f64) -> f64 {
        // The Maclaurin series below |x| = 3 (precise to ~1e-13 there), the asymptotic series of
        // erfc above (absolute error below 1e-8 there).
        if x.abs() >= 3.0 {
            let z = x.abs();
            let z2 = z * z;
            let erfc = (-z2).exp() / (z * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * z2) + 3.0 / (4.0 * z2 * z2) - 15.0 / (8.0 * z2 * z2 * z2)
                    + 105.0 / (16.0 * z2 * z2 * z2 * z2));
            return x.signum() * (1.0 - erfc);
        }
        let (mut term, mut total, mut n) = (x, x, 0.0);
        loop {
            n += 1.0;
            term *= -x * x / n;
            let add = term / (2.0 * n + 1.0);
            total += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// SwiGLU forward and both gradients against f64, on every target; rel. tolerance 1e-5.
    #[test]
    fn swiglu_matches_f64() {
        let n = 40_000; // over two chunks
        let g: Vec<f32> = values(n, 1).iter().map(|v| 8.0 * v).collect();
        let (u, dy) = (values(n, 2), values(n, 3));
        for isa in Isa::supported() {
            let y = swiglu_forward(isa, &g, &u);
            let (mut dg, mut du) = (g.clone(), u.clone());
            swiglu_backward(isa, &mut dg, &mut du, &dy);
            for i in (0..n).step_by(7) {
                let (gi, ui, di) = (g[i] as f64, u[i] as f64, dy[i] as f64);
                let s = 1.0 / (1.0 + (-gi).exp());
                let tol = |w: f64| 1e-5 * (1.0 + w.abs());
                assert!(
                    (y[i] as f64 - gi * s * ui).abs() <= tol(gi * s * ui),
                    "{isa} y"
                );
                let wdg = di * ui * s * (1.0 + gi * (1.0 - s));
                assert!((dg[i] as f64 - wdg).abs() <= tol(wdg), "{isa} dg");
                assert!(
                    (du[i] as f64 - di * gi * s).abs() <= tol(di * gi * s),
                    "{isa} du"
                );
            }
        }
    }

    /// GELU forward and gradient against f64 over [−8, 8], on every target; absolute
    /// tolerance 1e-6 · (1 + |x|).
    #[test]
    fn gelu_matches_f64() {
        let x: Vec<f32> = (0..20_001)
            .map(|i| -8.0 + 16.0 * i as f32 / 20_000.0)
            .collect();
        let dy = values(x.len(), 4);
        for isa in Isa::supported() {
            let y = gelu_forward(isa, &x);
            let mut dx = vec![0.5f32; x.len()];
            gelu_backward(isa, &x, &dy, &mut dx, true);
            for i in 0..x.len() {
                let xi = x[i] as f64;
                let cdf = 0.5 * (1.0 + erf64(xi / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * xi * xi).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let tol = 1e-6 * (1.0 + xi.abs());
                assert!((y[i] as f64 - xi * cdf).abs() <= tol, "{isa} gelu({xi})");
                let want = 0.5 + dy[i] as f64 * (cdf + xi * pdf);
                assert!((dx[i] as f64 - want).abs() <= tol, "{isa} gelu'({xi})");
            }
        }
    }
}
