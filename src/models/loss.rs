//! The causal-LM loss exactly as transformers computes it (`ForCausalLMLoss`): logits at
//! position `t` predict the label at `t + 1`, labels equal to [`IGNORE_INDEX`] (−100) are
//! skipped, and the loss is the mean cross-entropy over the predicted (non-ignored) tokens:
//!
//! ```text
//! logits: [b, t, V], labels: [b, t]
//! L = −(1/N) · Σ_{i, j < t−1, labels[i, j+1] ≠ −100} log softmax(logits[i, j])[labels[i, j+1]]
//! N = number of such (i, j)
//! ```
//!
//! Every op is differentiable in candle: log-softmax is composed from `max`, `exp`, `sum`,
//! `log` (the max is detached: it only shifts for stability, and its exact gradient cancels),
//! then `gather`. Only the rows that are predicted go through the log-softmax. On the CPU in
//! f32 the same math runs as one fused op with its own backward (`ops::cross_entropy`).

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Labels with this value are not predicted (prompt tokens, padding), as in PyTorch and
/// transformers.
pub const IGNORE_INDEX: i64 = -100;

/// `Σ −log p(label)` over the predicted tokens (see the module doc) and their count `N`.
/// Gradient accumulation divides the sums of several batches by the total count, which makes
/// the result identical to one big batch. With `N = 0` the sum is a zero constant.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(Error::ShapeMismatch {
            key: "labels".into(),
            got: labels.dims().to_vec(),
            what: format!("logits of shape {:?} (expected [{b}, {t}])", logits.dims()),
        });
    }
    let (rows, targets) = predicted_rows(labels, b, t, v)?;
    let n = rows.len();
    let dev = logits.device();
    if n == 0 {
        return Ok((Tensor::zeros((), DType::F32, dev)?, 0));
    }
    let flat = logits.reshape((b * t, v))?;
    if crate::ops::fusable(&flat) {
        // One pass over the logits each way, no row copies (see `ops::cross_entropy`).
        let op = crate::ops::CrossEntropyOp::new(rows, targets);
        return Ok((flat.contiguous()?.apply_op1(op)?, n));
    }
    let picked = flat
        .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?
        .to_dtype(DType::F32)?;
    let logp = log_softmax_last(&picked)?;
    let target = Tensor::from_vec(targets, (n, 1), dev)?;
    let sum = logp.gather(&target, 1)?.sum_all()?.neg()?;
    Ok((sum, n))
}

/// The flat logit rows `i·t + j` that are predicted (label at `j + 1` not −100) and their
/// targets, for `labels: [b, t]` over a vocabulary of `v`; an error names an out-of-range label.
pub(crate) fn predicted_rows(
    labels: &Tensor,
    b: usize,
    t: usize,
    v: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if labels.dims() != [b, t] {
        return Err(Error::ShapeMismatch {
            key: "labels".into(),
            got: labels.dims().to_vec(),
            what: format!("[{b}, {t}] (the token ids' shape)"),
        });
    }
    let rows_labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in rows_labels.iter().enumerate() {
        for (j, &l) in row.iter().enumerate().skip(1) {
            if l == IGNORE_INDEX {
                continue;
            }
            if l < 0 || l as usize >= v {
                return Err(Error::ShapeMismatch {
                    key: format!("labels[{i}, {j}]"),
                    got: vec![],
                    what: format!("the vocabulary: label {l} is outside 0..{v}"),
                });
            }
            rows.push((i * t + j - 1) as u32);
            targets.push(l as u32);
        }
    }
    Ok((rows, targets))
}

/// The mean loss `L` (a scalar tensor, differentiable); an error when no token is predicted
/// (PyTorch would return NaN).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (sum, n) = causal_lm_loss_sum(logits, labels)?;
    if n == 0 {
        return Err(Error::State(
            "causal-LM loss: every label is -100, no token to predict".into(),
        ));
    }
    Ok((sum / n as f64)?)
}

/// `x − max − log Σ exp(x − max)` over the last dim, with the max detached.
fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The loss by hand, in f64.
    fn reference(logits: &[Vec<Vec<f32>>], labels: &[Vec<i64>]) -> f64 {
        let (mut s, mut n) = (0.0, 0);
        for (lr, lab) in logits.iter().zip(labels) {
            for j in 0..lab.len() - 1 {
                let y = lab[j + 1];
                if y == IGNORE_INDEX {
                    continue;
                }
                let row: Vec<f64> = lr[j].iter().map(|&x| x as f64).collect();
                let m = row.iter().cloned().fold(f64::MIN, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                s += lse - row[y as usize];
                n += 1;
            }
        }
        s / n as f64
    }

    fn data() -> (Vec<Vec<Vec<f32>>>, Vec<Vec<i64>>) {
        let logits: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|i| {
                (0..4)
                    .map(|j| {
                        (0..5)
                            .map(|k| ((i * 31 + j * 7 + k * 3) % 11) as f32 * 0.7 - 3.0)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let labels = vec![vec![1, 4, 0, 2], vec![3, 2, IGNORE_INDEX, IGNORE_INDEX]];
        (logits, labels)
    }

    #[test]
    fn matches_shifted_masked_mean_cross_entropy() {
        let dev = Device::Cpu;
        let (logits, labels) = data();
        let lt = Tensor::new(logits.clone(), &dev).unwrap();
        let yt = Tensor::new(labels.clone(), &dev).unwrap();
        let got = causal_lm_loss(&lt, &yt)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = reference(&logits, &labels);
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        let (_, n) = causal_lm_loss_sum(&lt, &yt).unwrap();
        assert_eq!(n, 3 + 1, "row 0 predicts 3 tokens, row 1 one");
    }

    #[test]
    fn gradient_is_softmax_minus_one_hot_over_n() {
        let dev = Device::Cpu;
        let (logits, labels) = data();
        let var = Var::new(logits.clone(), &dev).unwrap();
        let yt = Tensor::new(labels.clone(), &dev).unwrap();
        let loss = causal_lm_loss(var.as_tensor(), &yt).unwrap();
        let g = loss.backward().unwrap();
        let g = g.get(var.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
        let n = 4.0;
        for i in 0..2 {
            for j in 0..4 {
                let target = labels[i].get(j + 1).copied().unwrap_or(IGNORE_INDEX);
                let row: Vec<f64> = logits[i][j].iter().map(|&x| x as f64).collect();
                let z: f64 = row.iter().map(|x| x.exp()).sum();
                for k in 0..5 {
                    let want = if target == IGNORE_INDEX {
                        0.0
                    } else {
                        (row[k].exp() / z - if k as i64 == target { 1.0 } else { 0.0 }) / n
                    };
                    assert!(
                        (g[i][j][k] as f64 - want).abs() < 1e-6,
                        "[{i},{j},{k}] {} vs {want}",
                        g[i][j][k]
                    );
                }
            }
        }
    }

    #[test]
    fn all_ignored_and_out_of_vocab_labels_are_errors() {
        let dev = Device::Cpu;
        let lt = Tensor::zeros((1, 3, 5), DType::F32, &dev).unwrap();
        let ign = Tensor::new(&[[1i64, IGNORE_INDEX, IGNORE_INDEX]], &dev).unwrap();
        assert!(causal_lm_loss(&lt, &ign).is_err());
        assert_eq!(causal_lm_loss_sum(&lt, &ign).unwrap().1, 0);
        let bad = Tensor::new(&[[1i64, 5, 0]], &dev).unwrap();
        let e = causal_lm_loss(&lt, &bad).unwrap_err().to_string();
        assert!(e.contains("labels[0, 1]") && e.contains("label 5"), "{e}");
    }
}
