//! RMSNorm and LayerNorm over the last dimension, forward and backward, row-parallel on rayon.
//!
//! Shapes: `x, y, dy, dx: [N, H]` row-major, `w, b: [H]`, per-row statistics `[N]`.
//!
//! ```text
//! RMSNorm   inv_i = 1/√(mean_j x_ij² + ε)                     (saved)
//!           y_ij  = w_j · x_ij · inv_i
//!           dx_i  = inv_i·(w⊙dy_i) − inv_i³ · x_i · Σ_j(dy⊙w⊙x)_ij / H
//!           dw    = Σ_i dy_i ⊙ x_i · inv_i
//! LayerNorm μ_i = mean_j x_ij,  rstd_i = 1/√(mean_j (x_ij − μ_i)² + ε)   (saved)
//!           x̂_ij = (x_ij − μ_i)·rstd_i,  y_ij = x̂_ij · w_j + b_j     (w, b optional)
//!           ĝ = dy ⊙ w,  dx_i = rstd_i · (ĝ_i − mean_j ĝ_ij − x̂_i · mean_j(ĝ⊙x̂)_ij)
//!           dw = Σ_i dy_i ⊙ x̂_i,  db = Σ_i dy_i
//! ```

use rayon::prelude::*;

use super::vecmath::{dot, dot3, sum};
use super::{filled, rows_per_task, vectorised, Isa};

/// RMSNorm forward of `x: [N, H]` with `w: [H]` (`H = w.len()`): returns `(y, inv)`.
pub(crate) fn rms_norm_forward(isa: Isa, x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let rows = x.len() / h.max(1);
    let mut inv = vec![0f32; rows];
    let (per, len) = (rows_per_task(h), rows * h);
    // SAFETY: the pieces cover the `rows` whole rows of `h` values, each written below.
    let y = unsafe {
        filled(len, |y| {
            y.par_chunks_mut(h * per)
                .zip(inv.par_chunks_mut(per))
                .zip(x[..len].par_chunks(h * per))
                .for_each(|((y, inv), x)| {
                    vectorised(
                        isa,
                        #[inline(always)]
                        || {
                            for ((y, inv), x) in
                                y.chunks_exact_mut(h).zip(inv).zip(x.chunks_exact(h))
                            {
                                let ms = dot(x, x) / h as f32;
                                *inv = 1.0 / (ms + eps).sqrt();
                                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                                    y.write(w * (x * *inv));
                                }
                            }
                        },
                    )
                })
        })
    };
    (y, inv)
}

/// RMSNorm backward: `dx (+)= inv·(w⊙dy) − inv³·x·Σ(dy⊙w⊙x)/H` (added to `dx` when `acc`,
/// else written over it) for the `x` and `inv` of [`rms_norm_forward`].
pub(crate) fn rms_norm_backward(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    inv: &[f32],
    w: &[f32],
    dx: &mut [f32],
    acc: bool,
) {
    let h = w.len();
    let per = rows_per_task(h);
    dx.par_chunks_mut(h * per)
        .zip(dy.par_chunks(h * per))
        .zip(x.par_chunks(h * per))
        .zip(inv.par_chunks(per))
        .for_each(|(((dx, dy), x), inv)| {
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for (((dx, dy), x), &inv) in dx
                        .chunks_exact_mut(h)
                        .zip(dy.chunks_exact(h))
                        .zip(x.chunks_exact(h))
                        .zip(inv)
                    {
                        let c = inv * inv * inv * dot3(dy, w, x) / h as f32;
                        for (((dx, dy), x), w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                            let g = inv * w * dy - c * x;
                            *dx = if acc { *dx + g } else { g };
                        }
                    }
                },
            )
        });
}

/// RMSNorm's weight gradient `dw = Σ_i dy_i ⊙ x_i·inv_i` (`[H]`, `H = dy.len() / inv.len()`).
pub(crate) fn rms_norm_weight_grad(isa: Isa, dy: &[f32], x: &[f32], inv: &[f32]) -> Vec<f32> {
    let h = dy.len() / inv.len().max(1);
    let mut dw = vec![0f32; h];
    vectorised(
        isa,
        #[inline(always)]
        || {
            for ((dy, x), &r) in dy.chunks_exact(h).zip(x.chunks_exact(h)).zip(inv) {
                for ((d, x), g) in dw.iter_mut().zip(x).zip(dy) {
                    *d += g * x * r;
                }
            }
        },
    );
    dw
}

/// LayerNorm's saved per-row statistics.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerNormStats {
    /// `μ_i`, `[N]`.
    pub mean: Vec<f32>,
    /// `rstd_i = 1/√(var_i + ε)`, `[N]`.
    pub rstd: Vec<f32>,
}

/// LayerNorm forward of `x: [N, H]` (`H = h`) with optional `w, b: [H]`: returns `y` and the
/// statistics for [`layer_norm_backward`]. The variance is the biased one (PyTorch's).
pub(crate) fn layer_norm_forward(
    isa: Isa,
    x: &[f32],
    h: usize,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f32,
) -> (Vec<f32>, LayerNormStats) {
    let rows = x.len() / h.max(1);
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let (per, len) = (rows_per_task(h), rows * h);
    // SAFETY: the pieces cover the `rows` whole rows of `h` values, each written below.
    let y = unsafe {
        filled(len, |y| {
            y.par_chunks_mut(h * per)
                .zip(mean.par_chunks_mut(per))
                .zip(rstd.par_chunks_mut(per))
                .zip(x[..len].par_chunks(h * per))
                .for_each(|(((y, mean), rstd), x)| {
                    vectorised(
                        isa,
                        #[inline(always)]
                        || {
                            for (((y, mu), rs), x) in y
                                .chunks_exact_mut(h)
                                .zip(mean.iter_mut())
                                .zip(rstd.iter_mut())
                                .zip(x.chunks_exact(h))
                            {
                                let m = sum(x) / h as f32;
                                let mut acc = [0f32; 16];
                                let chunks = x.chunks_exact(16);
                                let mut tail = 0f32;
                                for v in chunks.remainder() {
                                    tail += (v - m) * (v - m);
                                }
                                for c in chunks {
                                    for (a, v) in acc.iter_mut().zip(c) {
                                        *a += (v - m) * (v - m);
                                    }
                                }
                                let var = (acc.iter().sum::<f32>() + tail) / h as f32;
                                let r = 1.0 / (var + eps).sqrt();
                                (*mu, *rs) = (m, r);
                                for (j, (y, x)) in y.iter_mut().zip(x).enumerate() {
                                    let xh = (x - m) * r;
                                    let v = match (w, b) {
                                        (Some(w), Some(b)) => xh * w[j] + b[j],
                                        (Some(w), None) => xh * w[j],
                                        (None, Some(b)) => xh + b[j],
                                        (None, None) => xh,
                                    };
                                    y.write(v);
                                }
                            }
                        },
                    )
                })
        })
    };
    (y, LayerNormStats { mean, rstd })
}

/// LayerNorm backward for the input: `dx (+)= rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ⊙x̂))` with
/// `ĝ = dy⊙w` (`dy` when `w` is `None`), added to `dx` when `acc`, else written over it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    h: usize,
    stats: &LayerNormStats,
    w: Option<&[f32]>,
    dx: &mut [f32],
    acc: bool,
) {
    let per = rows_per_task(h);
    dx.par_chunks_mut(h * per)
        .zip(dy.par_chunks(h * per))
        .zip(x.par_chunks(h * per))
        .zip(stats.mean.par_chunks(per))
        .zip(stats.rstd.par_chunks(per))
        .for_each(|((((dx, dy), x), mean), rstd)| {
            let mut g = vec![0f32; h];
            let mut xh = vec![0f32; h];
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for ((((dx, dy), x), &m), &r) in dx
                        .chunks_exact_mut(h)
                        .zip(dy.chunks_exact(h))
                        .zip(x.chunks_exact(h))
                        .zip(mean)
                        .zip(rstd)
                    {
                        for (j, ((g, xh), (dy, x))) in g
                            .iter_mut()
                            .zip(xh.iter_mut())
                            .zip(dy.iter().zip(x))
                            .enumerate()
                        {
                            *g = w.map_or(*dy, |w| dy * w[j]);
                            *xh = (x - m) * r;
                        }
                        let mg = sum(&g) / h as f32;
                        let mgx = dot(&g, &xh) / h as f32;
                        for ((dx, g), xh) in dx.iter_mut().zip(&g).zip(&xh) {
                            let v = r * (g - mg - xh * mgx);
                            *dx = if acc { *dx + v } else { v };
                        }
                    }
                },
            )
        });
}

/// LayerNorm's parameter gradients `(dw, db)`: `dw = Σ_i dy_i ⊙ x̂_i`, `db = Σ_i dy_i`.
pub(crate) fn layer_norm_param_grads(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    h: usize,
    stats: &LayerNormStats,
) -> (Vec<f32>, Vec<f32>) {
    let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
    vectorised(
        isa,
        #[inline(always)]
        || {
            for (((dy, x), &m), &r) in dy
                .chunks_exact(h)
                .zip(x.chunks_exact(h))
                .zip(&stats.mean)
                .zip(&stats.rstd)
            {
                for (((dw, db), dy), x) in dw.iter_mut().zip(db.iter_mut()).zip(dy).zip(x) {
                    *dw += dy * (x - m) * r;
                    *db += dy;
                }
            }
        },
    );
    (dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    fn close(got: f32, want: f64, tol: f64) -> bool {
        (got as f64 - want).abs() <= tol * (1.0 + want.abs())
    }

    /// RMSNorm forward, input and weight gradients against an f64 reference (the gradient of
    /// `Σ y⊙up`), rows of 37 and 128 values, on every target; rel. tolerance 1e-5.
    #[test]
    fn rms_norm_matches_f64() {
        for isa in Isa::supported() {
            for h in [37usize, 128] {
                let n = 5;
                let (x, w, up) = (values(n * h, 1), values(h, 2), values(n * h, 3));
                let eps = 1e-6f32;
                let (y, inv) = rms_norm_forward(isa, &x, &w, eps);
                let mut dx = values(n * h, 4);
                let dx0 = dx.clone();
                rms_norm_backward(isa, &up, &x, &inv, &w, &mut dx, true);
                let dw = rms_norm_weight_grad(isa, &up, &x, &inv);
                let mut dw64 = vec![0f64; h];
                for i in 0..n {
                    let xr: Vec<f64> = x[i * h..][..h].iter().map(|&v| v as f64).collect();
                    let g: Vec<f64> = up[i * h..][..h].iter().map(|&v| v as f64).collect();
                    let ms = xr.iter().map(|v| v * v).sum::<f64>() / h as f64;
                    let r = 1.0 / (ms + eps as f64).sqrt();
                    let s: f64 = (0..h).map(|j| g[j] * w[j] as f64 * xr[j]).sum();
                    for j in 0..h {
                        let wy = w[j] as f64 * xr[j] * r;
                        assert!(close(y[i * h + j], wy, 1e-5), "{isa} y");
                        let wdx = dx0[i * h + j] as f64 + r * w[j] as f64 * g[j]
                            - r * r * r * xr[j] * s / h as f64;
                        assert!(close(dx[i * h + j], wdx, 1e-5), "{isa} dx");
                        dw64[j] += g[j] * xr[j] * r;
                    }
                }
                for j in 0..h {
                    assert!(close(dw[j], dw64[j], 1e-5), "{isa} dw");
                }
            }
        }
    }

    /// LayerNorm forward (with and without affine parameters), input and parameter gradients
    /// against an f64 reference, on every target; rel. tolerance 1e-5.
    #[test]
    fn layer_norm_matches_f64() {
        for isa in Isa::supported() {
            for (h, affine) in [(37usize, true), (128, true), (20, false)] {
                let n = 6;
                let x: Vec<f32> = values(n * h, 5).iter().map(|v| 3.0 * v + 0.5).collect();
                let (w, b, up) = (values(h, 6), values(h, 7), values(n * h, 8));
                let (wo, bo) = if affine {
                    (Some(&w[..]), Some(&b[..]))
                } else {
                    (None, None)
                };
                let eps = 1e-12f32;
                let (y, st) = layer_norm_forward(isa, &x, h, wo, bo, eps);
                let mut dx = vec![f32::NAN; n * h];
                layer_norm_backward(isa, &up, &x, h, &st, wo, &mut dx, false);
                let (dw, db) = layer_norm_param_grads(isa, &up, &x, h, &st);
                let (mut dw64, mut db64) = (vec![0f64; h], vec![0f64; h]);
                for i in 0..n {
                    let xr: Vec<f64> = x[i * h..][..h].iter().map(|&v| v as f64).collect();
                    let m = xr.iter().sum::<f64>() / h as f64;
                    let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / h as f64;
                    let r = 1.0 / (var + eps as f64).sqrt();
                    let xh: Vec<f64> = xr.iter().map(|v| (v - m) * r).collect();
                    let wj = |j: usize| if affine { w[j] as f64 } else { 1.0 };
                    let bj = |j: usize| if affine { b[j] as f64 } else { 0.0 };
                    let g: Vec<f64> = (0..h).map(|j| up[i * h + j] as f64 * wj(j)).collect();
                    let mg = g.iter().sum::<f64>() / h as f64;
                    let mgx = (0..h).map(|j| g[j] * xh[j]).sum::<f64>() / h as f64;
                    for j in 0..h {
                        assert!(close(y[i * h + j], xh[j] * wj(j) + bj(j), 1e-5), "{isa} y");
                        let want = r * (g[j] - mg - xh[j] * mgx);
                        assert!(close(dx[i * h + j], want, 1e-5), "{isa} dx {j}");
                        dw64[j] += up[i * h + j] as f64 * xh[j];
                        db64[j] += up[i * h + j] as f64;
                    }
                }
                for j in 0..h {
                    assert!(close(dw[j], dw64[j], 1e-5), "{isa} dw");
                    assert!(close(db[j], db64[j], 1e-5), "{isa} db");
                }
            }
        }
    }
}
