//! DoRA (weight-decomposed low-rank adaptation, `use_dora`): the one place of its math, used by
//! the layers ([`super::LoraLinear`], [`super::LoraConv2d`], [`super::LoraEmbedding`]), by their
//! merge and by the model-free merge of [`crate::merge`]. Ported from PEFT 0.21.2
//! `tuners/lora/dora.py` (`DoraLinearLayer`, `DoraEmbeddingLayer`, `_DoraConvNdLayer`) and
//! `tuners/lora/variants.py` (`DoraLinearVariant`, `DoraEmbeddingVariant`, `_DoraConvNdVariant`).
//!
//! ```text
//! W' = W0 + s·B·A                  n = ‖W'‖ per output unit, detached (no gradient)
//! k  = m / n                       m: lora_magnitude_vector (trainable)
//! y  = W0·x + b + (k − 1)·(W0·x̃) + k·s·B·A·x̃      x̃ = dropout(x) in training, else x
//!    = k ⊙ (W'·x) + b              without dropout
//! merged: W = k ⊙ (W0 + s·B·A)     initial m = ‖W0 + s·B·A‖ (so k = 1 at init)
//! ```
//!
//! The norm runs over every axis but the output unit's: row norms of a linear `[out, in]` and of
//! a conv kernel `[out, in, kh, kw]` (m stored `[out]` and `[1, out, 1, 1]`), and for an
//! embedding table `[vocab, dim]` (and a `fan_in_fan_out` weight `[in, out]`) the norm of each
//! column (m stored `[dim]`). As in the DoRA paper §4.3 and PEFT, `n` is treated as a constant
//! in the backward: the gradient reaches m through `k`, and A, B only through the `k·s·B·A·x̃`
//! term.
//!
//! A merged weight alone cannot be unmerged: `n` depends on W0. Layers keep `n` from their own
//! merge (as PEFT caches it); a merged checkpoint on disk cannot be turned back.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Which axis of the base weight indexes the magnitude vector (the output unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormAxis {
    /// The first axis: linear `[out, in]`, conv `[out, in, kh, kw]`; norms of rows.
    First,
    /// The last axis of a 2-D weight: embedding `[vocab, dim]`, `fan_in_fan_out` `[in, out]`;
    /// norms of columns.
    Last,
}

/// `‖w0 + delta‖` per output unit, `[n]` in f32, detached from the graph.
///
/// Port of `DoraLinearLayer.get_weight_norm` (`torch.linalg.norm(transpose(W, fan_in_fan_out) +
/// scaling·lora_weight, dim=1)`) and `_DoraConvNdLayer.get_weight_norm` (norm over `dim=(1, ..)`);
/// `delta` is already scaled (`s·B·A` in `w0`'s layout).
pub fn weight_norm(w0: &Tensor, delta: &Tensor, axis: NormAxis) -> Result<Tensor> {
    let w = (w0.to_dtype(DType::F32)?.detach() + delta.to_dtype(DType::F32)?.detach())?;
    let sq = w.sqr()?;
    let n = match axis {
        NormAxis::First => {
            let out = w.dim(0)?;
            sq.reshape((out, ()))?.sum(1)?
        }
        NormAxis::Last => sq.sum(0)?,
    };
    Ok(n.sqrt()?.detach())
}

/// `k = m / ‖w0 + delta‖`, `[n]` in f32; the gradient flows to `m` only.
pub fn factor(m: &Tensor, w0: &Tensor, delta: &Tensor, axis: NormAxis) -> Result<Tensor> {
    let n = weight_norm(w0, delta, axis)?;
    Ok((m.to_dtype(DType::F32)?.flatten_all()? / n)?)
}

/// `k` (shape `[n]`) reshaped to broadcast against a weight of `shape` along `axis`.
fn along(k: &Tensor, shape: &[usize], axis: NormAxis) -> Result<Tensor> {
    let mut s = vec![1usize; shape.len()];
    match axis {
        NormAxis::First => s[0] = k.elem_count(),
        NormAxis::Last => *s.last_mut().expect("a weight has axes") = k.elem_count(),
    }
    Ok(k.reshape(s)?)
}

/// The merged weight `k ⊙ (w0 + delta)` in f32 and the norm `n` it used (kept for unmerging).
///
/// Port of `DoraLinearVariant.merge_safe` (and the embedding and conv variants):
/// `dora_factor = m / weight_norm; new_weight = dora_factor · (orig_weight + delta_weight)`.
pub fn merged_weight(
    w0: &Tensor,
    delta: &Tensor,
    m: &Tensor,
    axis: NormAxis,
) -> Result<(Tensor, Tensor)> {
    let n = weight_norm(w0, delta, axis)?;
    let k = (m.to_dtype(DType::F32)?.flatten_all()?.detach() / &n)?;
    let w = (w0.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
    let merged = w.broadcast_mul(&along(&k, w.dims(), axis)?)?;
    Ok((merged, n))
}

/// The inverse of [`merged_weight`] given the norm it returned: `merged / k − delta`, f32.
///
/// Port of `DoraLinearVariant.unmerge`: `orig_weight / dora_factor − delta_weight`.
pub fn unmerged_weight(
    merged: &Tensor,
    delta: &Tensor,
    m: &Tensor,
    norm: &Tensor,
    axis: NormAxis,
) -> Result<Tensor> {
    let k = (m.to_dtype(DType::F32)?.flatten_all()?.detach() / norm)?;
    let w = merged
        .to_dtype(DType::F32)?
        .broadcast_div(&along(&k, merged.dims(), axis)?)?;
    Ok((w - delta.to_dtype(DType::F32)?)?)
}

/// What DoRA adds to the base output: `(k − 1)·base + k·lora`, where `base` is `W0·x̃` without
/// bias, `lora` is `s·B·A·x̃` and `k` is already shaped to broadcast against both.
///
/// Port of `DoraLinearLayer.forward`: `result_dora = (mag_norm_scale − 1)·base_result +
/// mag_norm_scale·lora_result·scaling`.
pub fn output(base: &Tensor, lora: &Tensor, k: &Tensor) -> Result<Tensor> {
    let k = k.to_dtype(base.dtype())?;
    let km1 = (&k - 1.0)?;
    Ok((base.broadcast_mul(&km1)? + lora.broadcast_mul(&k)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff as max_abs;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn norms_run_over_the_right_axis() {
        let w = t(&[3.0, 4.0, 0.0, 1.0], &[2, 2]);
        let z = t(&[0.0; 4], &[2, 2]);
        assert_eq!(
            weight_norm(&w, &z, NormAxis::First)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [5.0, 1.0]
        );
        let n = weight_norm(&w, &z, NormAxis::Last)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(n, [3.0, 17f32.sqrt()]);
        // Conv: over in·kh·kw.
        let k = t(&[1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[2, 1, 2, 2]);
        let zk = t(&[0.0; 8], &[2, 1, 2, 2]);
        assert_eq!(
            weight_norm(&k, &zk, NormAxis::First)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [3.0, 0.0]
        );
    }

    #[test]
    fn merge_rescales_rows_to_the_magnitude_and_unmerge_inverts() {
        let w0 = t(&[3.0, 0.0, 0.0, 2.0], &[2, 2]);
        let d = t(&[0.0, 4.0, 0.0, 0.0], &[2, 2]);
        let m = t(&[10.0, 1.0], &[2]);
        let (merged, n) = merged_weight(&w0, &d, &m, NormAxis::First).unwrap();
        // Row 0: (3, 4)/5·10; row 1: (0, 2)/2·1.
        assert!(max_abs(&merged, &t(&[6.0, 8.0, 0.0, 1.0], &[2, 2])) < 1e-6);
        let back = unmerged_weight(&merged, &d, &m, &n, NormAxis::First).unwrap();
        assert!(max_abs(&back, &w0) < 1e-6);
    }

    #[test]
    fn output_is_k_times_the_adapted_output_without_dropout() {
        let base = t(&[1.0, 2.0], &[1, 2]);
        let lora = t(&[0.5, -1.0], &[1, 2]);
        let k = t(&[2.0, 3.0], &[2]);
        // base + (k−1)·base + k·lora = k·(base + lora)
        let y = (output(&base, &lora, &k).unwrap() + &base).unwrap();
        assert!(max_abs(&y, &t(&[3.0, 3.0], &[1, 2])) < 1e-6);
    }
}
