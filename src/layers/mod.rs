//! LoRA layers with PEFT's layouts and math: [`LoraLinear`], [`LoraEmbedding`], [`LoraConv2d`].
//!
//! Each layer keeps its pretrained weights as plain, frozen [`Tensor`]s (they never receive a
//! gradient) and its low-rank factors `A`, `B` as trainable [`Var`]s. Merging folds
//! `s·ΔW` into the frozen weight (computed in f32, cast back to the base dtype) and is explicit:
//! nothing merges as a side effect of switching between training and inference.

mod conv;
pub mod dora;
mod embedding;
mod init;
mod linear;
pub mod pissa;

pub use conv::{Conv2dGeometry, LoraConv2d};
pub use embedding::LoraEmbedding;
pub use init::{kaiming_uniform, normal, LoraRng};
pub use linear::{with_low_rank_reference, LinearGrads, LoraLinear};

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// A weight that is either frozen (a plain tensor: no gradient ever) or trainable (a [`Var`]).
#[derive(Debug, Clone)]
pub enum Param {
    /// Pretrained and frozen.
    Frozen(Tensor),
    /// Trained (for `r = 0` layers and full fine-tuning).
    Trainable(Var),
}

impl Param {
    /// The tensor, for computation.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }
    /// The variable, when trainable.
    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Frozen(_) => None,
            Param::Trainable(v) => Some(v),
        }
    }
    /// Makes a trainable copy (`Var`) of `t`.
    pub fn trainable(t: &Tensor) -> Result<Self> {
        Ok(Param::Trainable(Var::from_tensor(t)?))
    }
}

/// The low-rank part of a layer: trainable `A`, `B`, the scale `s` and dropout on its input.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// The module's full name (`model.layers.0.self_attn.q_proj`), used in messages.
    pub name: String,
    /// `lora_A`: `[r, in]` (linear), `[r, vocab]` (embedding), `[r, in, kh, kw]` (conv).
    pub a: Var,
    /// `lora_B`: `[out, r]` (linear), `[dim, r]` (embedding), `[out, r, 1, 1]` (conv).
    pub b: Var,
    /// `s = α/r`, or `α/√r` with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the LoRA branch input (training only).
    pub dropout: f32,
    /// DoRA's `lora_magnitude_vector` m (trainable), when the adapter uses DoRA: `[out]`
    /// (linear), `[dim]` (embedding), `[1, out, 1, 1]` (conv). See [`dora`].
    pub magnitude: Option<Var>,
    /// DoRA: the norm `‖W0 + s·B·A‖` used by the last merge, which unmerging needs.
    pub(crate) merged_norm: Option<Tensor>,
}

impl LowRank {
    /// The rank r (rows of A).
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    /// The trainable variables: A, B, and DoRA's magnitude m when present.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.a.clone(), self.b.clone()];
        v.extend(self.magnitude.clone());
        v
    }
    /// Number of trainable parameters (|A| + |B| (+ |m|)).
    pub fn num_params(&self) -> usize {
        self.a.elem_count()
            + self.b.elem_count()
            + self.magnitude.as_ref().map_or(0, |m| m.elem_count())
    }

    /// A new adapter with no DoRA magnitude.
    pub(crate) fn plain(
        name: &str,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: f32,
    ) -> Result<Self> {
        Ok(LowRank {
            name: name.to_string(),
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout,
            magnitude: None,
            merged_norm: None,
        })
    }

    /// Turns on DoRA with magnitude `m` (checked against `shape`), or PEFT's initial
    /// `m = ‖W0 + s·ΔW‖` when `m` is `None` (`DoraLinearLayer.update_layer`). `w0` and `delta`
    /// are the base weight and `s·ΔW` in the same layout.
    pub(crate) fn set_magnitude(
        &mut self,
        m: Option<Tensor>,
        w0: &Tensor,
        delta: &Tensor,
        axis: dora::NormAxis,
        shape: &[usize],
    ) -> Result<()> {
        let m = match m {
            Some(m) => {
                expect_shape(
                    &m,
                    &format!("{}.lora_magnitude_vector", self.name),
                    shape,
                    "DoRA's magnitude vector",
                )?;
                m.to_dtype(DType::F32)?
            }
            None => dora::weight_norm(w0, delta, axis)?.reshape(shape)?,
        };
        self.magnitude = Some(Var::from_tensor(&m)?);
        Ok(())
    }
}

/// Explicit merge state of a LoRA layer.
pub trait Mergeable {
    /// Folds `s·ΔW` into the frozen weight. Idempotent; refuses a non-finite result.
    fn merge(&mut self) -> Result<()>;
    /// Takes `s·ΔW` back out of the weight. Idempotent.
    fn unmerge(&mut self) -> Result<()>;
    /// Whether the adapter is currently folded into the weight.
    fn is_merged(&self) -> bool;
}

/// `W ± delta`, computed in f32 and cast back to `w`'s dtype; errors on a non-finite result.
///
/// The rounding is PEFT's (`tuners/lora/layer.py`): Linear and Conv `merge` add the f32 ΔW in
/// place (`weight.data += delta_weight`: summed in f32, rounded once to the base dtype), while
/// their `unmerge` and Embedding's `merge` and `unmerge` first cast ΔW to the base dtype
/// (`delta_weight.to(orig_dtype)`). Callers say which with `round_delta_first`; for an f32 base
/// the two are the same.
pub(crate) fn apply_delta(
    w: &Tensor,
    delta: &Tensor,
    sign: f64,
    round_delta_first: bool,
    name: &str,
) -> Result<Tensor> {
    let w32 = w.to_dtype(DType::F32)?;
    let delta = (delta.to_dtype(DType::F32)? * sign)?;
    let delta = if round_delta_first {
        delta.to_dtype(w.dtype())?.to_dtype(DType::F32)?
    } else {
        delta
    };
    let out = (w32 + delta)?;
    check_finite(&out, name, if sign > 0.0 { "merge" } else { "unmerge" })?;
    Ok(out.to_dtype(w.dtype())?)
}

/// Errors with [`Error::NonFinite`] when `t` holds a NaN or an infinity.
pub(crate) fn check_finite(t: &Tensor, name: &str, what: &str) -> Result<()> {
    let t32 = t.to_dtype(DType::F32)?.flatten_all()?;
    // |x| <= f32::MAX is false exactly for infinities and NaN.
    let finite = t32.abs()?.le(f64::from(f32::MAX))?.to_dtype(DType::F64)?;
    let bad = t32.elem_count() as f64 - finite.sum_all()?.to_scalar::<f64>()?;
    if bad > 0.0 {
        return Err(Error::NonFinite {
            key: name.to_string(),
            what: format!("{what}: {bad} non-finite values"),
        });
    }
    Ok(())
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by 1/(1-p).
/// The mask comes from `rng`, so runs are reproducible from a seed.
pub(crate) fn dropout(x: &Tensor, p: f32, rng: &LoraRng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = rng.keep_mask(x.elem_count(), p);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// What a LoRA layer is built with: rank, alpha, rsLoRA, dropout and init.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank r; 0 builds a plain layer whose own weight and bias are trainable (the seed's r = 0).
    pub r: usize,
    /// α.
    pub alpha: f64,
    /// Scale by α/√r instead of α/r.
    pub use_rslora: bool,
    /// Dropout probability on the LoRA branch input.
    pub dropout: f32,
    /// How A and B start.
    pub init: crate::config::InitLoraWeights,
    /// DoRA: add a trainable magnitude vector m, starting at `‖W0 + s·B·A‖` (see [`dora`]).
    pub use_dora: bool,
}

impl LoraSpec {
    /// A spec with PEFT's defaults for everything but r and α.
    pub fn new(r: usize, alpha: f64) -> Self {
        LoraSpec {
            r,
            alpha,
            use_rslora: false,
            dropout: 0.0,
            init: crate::config::InitLoraWeights::Default,
            use_dora: false,
        }
    }
    /// The scale s: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Refuses init methods that are kept in configs but not implemented.
pub(crate) fn check_init(init: &crate::config::InitLoraWeights, name: &str) -> Result<()> {
    if let crate::config::InitLoraWeights::Other(m) = init {
        return Err(Error::UnsupportedFeature {
            feature: "init_lora_weights".into(),
            detail: format!(
                "`{m}` for module `{name}` (supported: true, false, \"gaussian\"; \"pissa\", \
                 \"pissa_niter_N\" and \"olora\" on linear layers)"
            ),
        });
    }
    Ok(())
}

/// Checks that tensor `key` has shape `want`.
pub(crate) fn expect_shape(t: &Tensor, key: &str, want: &[usize], what: &str) -> Result<()> {
    if t.dims() != want {
        return Err(Error::ShapeMismatch {
            key: key.to_string(),
            got: t.dims().to_vec(),
            what: format!("{what} (expected {want:?})"),
        });
    }
    Ok(())
}
