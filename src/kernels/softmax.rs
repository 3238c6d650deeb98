//! Softmax and cross-entropy over rows.
//!
//! ```text
//! softmax        p_j = e^(x_j − max x) / Σ_k e^(x_k − max x)          (one row, in place)
//! its backward   ds_j = c · p_j · (dp_j − Σ_k dp_k·p_k)                (c: the scores' scale)
//! cross-entropy  x: [N, V] logits, target y_i per row (or none)
//!                loss = Σ_i (lse_i − x[i, y_i]),  lse_i = log Σ_v e^(x[i, v])
//!                dx[i, v] = e^(x[i, v] − lse_i) − [v = y_i]            (rows without a target: 0)
//! ```
//!
//! The row functions are `#[inline(always)]` for use inside a caller's
//! [`vectorised`](super::vectorised) closure; the `[N, V]` functions run rows in parallel.

use rayon::prelude::*;

use super::vecmath::{dot, exp1, max, sum};
use super::{vectorised, Isa};

/// Softmax of one row in place; returns `log Σ e^x` (the row's log-sum-exp). A row whose
/// maximum is −∞ (all masked) becomes NaN, as the composed candle path gives.
#[inline(always)]
pub(crate) fn softmax_inplace(row: &mut [f32]) -> f32 {
    let mx = max(row);
    if mx == f32::NEG_INFINITY {
        row.fill(f32::NAN);
        return f32::NAN;
    }
    row.iter_mut().for_each(|x| *x = exp1(*x - mx));
    let total = sum(row);
    let inv = 1.0 / total;
    row.iter_mut().for_each(|x| *x *= inv);
    mx + total.ln()
}

/// `log Σ_j e^(x_j)` of one row (max-shifted).
#[inline(always)]
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let mx = max(row);
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp1(x - mx)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp1(x - mx);
        }
    }
    mx + (acc.iter().sum::<f32>() + tail).ln()
}

/// Softmax's backward for one row, in place over `dp`: `dp ← c·p⊙(dp − Σ dp⊙p)`.
#[inline(always)]
pub(crate) fn softmax_backward(p: &[f32], dp: &mut [f32], c: f32) {
    let s = dot(dp, p);
    for (x, p) in dp.iter_mut().zip(p) {
        *x = p * (*x - s) * c;
    }
}

/// Cross-entropy over `logits: [N, V]` with one optional target per row, in place: the rows
/// become their gradient `softmax − onehot` (rows without a target 0); returns the summed loss.
pub(crate) fn cross_entropy_inplace(
    isa: Isa,
    logits: &mut [f32],
    v: usize,
    targets: &[Option<u32>],
) -> f64 {
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .map(|(row, tgt)| {
            let Some(tgt) = *tgt else {
                row.fill(0.0);
                return 0.0;
            };
            vectorised(
                isa,
                #[inline(always)]
                || {
                    let picked = row[tgt as usize];
                    let lse = softmax_inplace(row);
                    row[tgt as usize] -= 1.0;
                    f64::from(lse - picked)
                },
            )
        })
        .sum()
}

/// The log-sum-exp of each row of `logits: [R, V]` named in `rows`.
pub(crate) fn log_sum_exp_rows(isa: Isa, logits: &[f32], v: usize, rows: &[u32]) -> Vec<f32> {
    rows.par_iter()
        .map(|&i| {
            let row = &logits[i as usize * v..][..v];
            vectorised(
                isa,
                #[inline(always)]
                || log_sum_exp(row),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    /// Softmax, its backward, log-sum-exp and cross-entropy against f64 on rows of 1, 37 and
    /// 1000 values, on every target; rel. tolerance 1e-5.
    #[test]
    fn match_f64() {
        for isa in Isa::supported() {
            for v in [1usize, 37, 1000] {
                let n = 4;
                let x: Vec<f32> = values(n * v, 1).iter().map(|a| 6.0 * a).collect();
                let dp = values(n * v, 2);
                let targets: Vec<Option<u32>> = (0..n)
                    .map(|i| (i != 2).then_some((i * 7 % v) as u32))
                    .collect();
                let mut ce = x.clone();
                let loss = cross_entropy_inplace(isa, &mut ce, v, &targets);
                let lses = log_sum_exp_rows(isa, &x, v, &[0, 3]);
                let mut want_loss = 0f64;
                for i in 0..n {
                    let r: Vec<f64> = x[i * v..][..v].iter().map(|&a| a as f64).collect();
                    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + r.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
                    let p: Vec<f64> = r.iter().map(|a| (a - lse).exp()).collect();
                    let mut row = x[i * v..][..v].to_vec();
                    let mut drow = dp[i * v..][..v].to_vec();
                    let got_lse = vectorised(isa, || {
                        let l = softmax_inplace(&mut row);
                        softmax_backward(&row, &mut drow, 0.5);
                        l
                    });
                    let tol = |w: f64| 1e-5 * (1.0 + w.abs());
                    assert!((got_lse as f64 - lse).abs() <= tol(lse), "{isa} lse");
                    let s: f64 = (0..v).map(|j| dp[i * v + j] as f64 * p[j]).sum();
                    for j in 0..v {
                        assert!((row[j] as f64 - p[j]).abs() <= tol(p[j]), "{isa} p");
                        let wd = 0.5 * p[j] * (dp[i * v + j] as f64 - s);
                        assert!((drow[j] as f64 - wd).abs() <= tol(wd), "{isa} ds");
                        let wce = match targets[i] {
                            Some(t) => p[j] - f64::from(u8::from(t as usize == j)),
                            None => 0.0,
                        };
                        assert!((ce[i * v + j] as f64 - wce).abs() <= tol(wce), "{isa} dce");
                    }
                    if let Some(t) = targets[i] {
                        want_loss += lse - r[t as usize];
                    }
                    if i == 0 || i == 3 {
                        let got = lses[if i == 0 { 0 } else { 1 }] as f64;
                        assert!((got - lse).abs() <= tol(lse), "{isa} lse rows");
                    }
                }
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * (1.0 + want_loss.abs()),
                    "{isa}"
                );
            }
        }
    }

    #[test]
    fn a_fully_masked_row_is_nan() {
        let mut row = [f32::NEG_INFINITY; 5];
        assert!(softmax_inplace(&mut row).is_nan());
        assert!(row.iter().all(|v| v.is_nan()));
    }
}
