//! [`LoraLinear`]: a linear layer with a low-rank adapter, PEFT's `lora.Linear`.
//!
//! ```text
//! y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ        W0: [out, in], b: [out]   (frozen)
//!                                             A: [r, in],  B: [out, r]  (trainable)
//! s = α/r   (α/√r with rsLoRA)               merged: y = x·(W0 + s·B·A)ᵀ + b
//! ```
//!
//! The unmerged forward (CPU, f32) picks the cheaper of two exact forms: the low-rank path, two
//! skinny matmuls, for few rows or with dropout; or, when `N·(in+out) ≥ in·out`, one GEMM with
//! `W0 + s·B·A` built for that call (an `out×in×r` product; `W0`, `A` and `B` are untouched),
//! which makes unmerged inference cost what merged does (see `ops::lora_linear`). The seed's code
//! builds `B·A` on every call whatever the row count. Other devices and dtypes use the low-rank
//! tensor path. Dropout applies to the LoRA branch input only and only in training, as
//! in PEFT; the seed's layer drops the whole output instead. `r = 0` is a plain linear layer
//! whose weight and bias are trainable, as the seed's code does.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use lora::{LoraLinear, LoraSpec, LoraRng, Mergeable};
//! # fn main() -> lora::Result<()> {
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1., (512, 768), &dev)?;
//! let mut layer = LoraLinear::new(w, None, &LoraSpec::new(8, 16.0), &LoraRng::new(0), "proj")?;
//! assert_eq!(layer.num_trainable(), 8 * 768 + 512 * 8);
//! let x = Tensor::randn(0f32, 1., (4, 768), &dev)?;
//! let y = layer.forward_t(&x, false)?;          // unmerged
//! layer.merge()?;
//! let diff = (layer.forward_t(&x, false)? - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok(()) }
//! ```

use candle_core::{Module, Tensor, Var};
use std::cell::Cell;

use super::dora::{self, NormAxis};
use super::{
    apply_delta, check_finite, check_init, dropout, expect_shape, init, LoraRng, LoraSpec, LowRank,
    Mergeable, Param,
};
use crate::config::InitLoraWeights;
use crate::error::{Error, Result};
use crate::ops;

mod step;
pub use step::LinearGrads;

/// A linear layer `y = x·Wᵀ + b` with an optional LoRA adapter (see the module doc).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Param,
    bias: Option<Param>,
    lora: Option<LowRank>,
    merged: bool,
    rng: LoraRng,
}

/// `x·wᵀ` for `x: [..., in]`, `w: [out, in]` → `[..., out]`, as one 2-D matmul.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len().saturating_sub(1));
    let n: usize = lead.iter().product();
    let x2 = x.reshape((n, inner.first().copied().unwrap_or(1)))?;
    let y = x2.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    Ok(y.reshape(out)?)
}

impl LoraLinear {
    /// A plain linear layer with frozen weight `[out, in]` and bias `[out]`.
    pub fn frozen(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight: Param::Frozen(weight),
            bias: bias.map(Param::Frozen),
            lora: None,
            merged: false,
            rng: LoraRng::new(0),
        }
    }

    /// A plain linear layer whose weight and bias are trainable copies (r = 0, full fine-tuning).
    pub fn trainable(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Ok(LoraLinear {
            weight: Param::trainable(weight)?,
            bias: bias.map(Param::trainable).transpose()?,
            lora: None,
            merged: false,
            rng: LoraRng::new(0),
        })
    }

    /// Wraps a frozen `weight: [out, in]` (and bias) with a new adapter initialised by
    /// `spec.init`; `spec.r == 0` gives [`LoraLinear::trainable`].
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        spec: &LoraSpec,
        rng: &LoraRng,
        name: &str,
    ) -> Result<Self> {
        if spec.r == 0 {
            return Self::trainable(&weight, bias.as_ref());
        }
        if let InitLoraWeights::Other(m) = &spec.init {
            if let Some(method) = super::pissa::Method::parse(m) {
                // PiSSA / OLoRA: factors from the base's SVD / QR, base becomes the residual.
                let rw = super::pissa::init(&weight, method, spec.r, spec.scale(), name)?;
                let l = Self::from_adapter(
                    rw.residual,
                    bias,
                    rw.a,
                    rw.b,
                    spec.scale(),
                    spec.dropout,
                    name,
                    rng,
                )?;
                return if spec.use_dora {
                    l.with_dora(None)
                } else {
                    Ok(l)
                };
            }
        }
        check_init(&spec.init, name)?;
        let (out_f, in_f) = weight.dims2()?;
        let dev = weight.device();
        let r = spec.r;
        let zeros = || Tensor::zeros((out_f, r), candle_core::DType::F32, dev);
        let (a, b) = match spec.init {
            InitLoraWeights::Default => {
                (init::kaiming_uniform(&[r, in_f], in_f, rng, dev)?, zeros()?)
            }
            InitLoraWeights::Gaussian => (
                init::normal(&[r, in_f], 1.0 / r as f32, rng, dev)?,
                zeros()?,
            ),
            // nn.Linear's own init for both factors, as PEFT leaves them with `false`.
            InitLoraWeights::Random => (
                init::kaiming_uniform(&[r, in_f], in_f, rng, dev)?,
                init::kaiming_uniform(&[out_f, r], r, rng, dev)?,
            ),
            InitLoraWeights::Other(_) => unreachable!("refused by check_init"),
        };
        let layer = Self::from_adapter(weight, bias, a, b, spec.scale(), spec.dropout, name, rng)?;
        if spec.use_dora {
            return layer.with_dora(None);
        }
        Ok(layer)
    }

    /// Turns the adapter into DoRA with magnitude `m: [out]`, or PEFT's initial
    /// `m = ‖W0 + s·B·A‖` per row when `None` (see [`super::dora`]). A layer without an adapter is
    /// returned as is.
    pub fn with_dora(mut self, m: Option<Tensor>) -> Result<Self> {
        let delta = self.delta_weight()?;
        let w = self.weight.tensor().clone();
        if let (Some(l), Some(delta)) = (self.lora.as_mut(), delta) {
            let out = w.dim(0)?;
            l.set_magnitude(m, &w, &delta, NormAxis::First, &[out])?;
        }
        Ok(self)
    }

    /// Wraps a frozen weight with given adapter tensors `a: [r, in]`, `b: [out, r]` (loaded from
    /// a file, say), copied into new trainable variables in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn from_adapter(
        weight: Tensor,
        bias: Option<Tensor>,
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: f32,
        name: &str,
        rng: &LoraRng,
    ) -> Result<Self> {
        let (out_f, in_f) = weight.dims2()?;
        let r = a.dims().first().copied().unwrap_or(0);
        expect_shape(
            &a,
            &format!("{name}.lora_A.weight"),
            &[r, in_f],
            "lora_A of a linear layer [r, in]",
        )?;
        expect_shape(
            &b,
            &format!("{name}.lora_B.weight"),
            &[out_f, r],
            "lora_B of a linear layer [out, r]",
        )?;
        if r == 0 {
            return Err(Error::ShapeMismatch {
                key: format!("{name}.lora_A.weight"),
                got: a.dims().to_vec(),
                what: "a LoRA factor (empty tensor: an unsharded ZeRO-3/FSDP export?)".into(),
            });
        }
        if let Some(bias) = &bias {
            expect_shape(bias, &format!("{name}.bias"), &[out_f], "the bias [out]")?;
        }
        Ok(LoraLinear {
            weight: Param::Frozen(weight),
            bias: bias.map(Param::Frozen),
            lora: Some(LowRank::plain(name, &a, &b, scale, dropout)?),
            merged: false,
            rng: rng.clone(),
        })
    }

    /// The (possibly merged) weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.weight.tensor()
    }
    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(Param::tensor)
    }
    /// The adapter, if this layer has one.
    pub fn lora(&self) -> Option<&LowRank> {
        self.lora.as_ref()
    }

    /// Every trainable variable: A and B (and DoRA's m), or the weight and bias for r = 0.
    pub fn trainable_vars(&self) -> Vec<Var> {
        match &self.lora {
            Some(l) => l.vars(),
            None => self
                .weight
                .var()
                .into_iter()
                .chain(self.bias.as_ref().and_then(Param::var))
                .cloned()
                .collect(),
        }
    }

    /// Total parameter count (base + adapter).
    pub fn num_params(&self) -> usize {
        self.weight().elem_count()
            + self.bias().map_or(0, Tensor::elem_count)
            + self.lora.as_ref().map_or(0, LowRank::num_params)
    }

    /// Trainable parameter count.
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `s·B·A`, `[out, in]` in f32, or `None` without an adapter.
    pub fn delta_weight(&self) -> Result<Option<Tensor>> {
        self.lora
            .as_ref()
            .map(|l| Ok((l.b.matmul(l.a.as_tensor())? * l.scale)?))
            .transpose()
    }

    /// The forward pass; `train` enables dropout. Training a merged layer is an error.
    ///
    /// On the CPU in f32 this runs the fused op of `ops::lora_linear` (no gradient for the frozen
    /// weight, the low-rank path as two skinny GEMMs); elsewhere the plain tensor path.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.merged {
            return Err(Error::State(format!(
                "module `{}` is merged: unmerge it before training",
                self.lora.as_ref().map_or("", |l| &l.name)
            )));
        }
        if !self.merged && self.lora.is_some() && LOW_RANK_REFERENCE.with(Cell::get) {
            return self.plain_forward(x, train);
        }
        match self.fused_forward(x, train)? {
            Some(y) => Ok(y),
            None => self.plain_forward(x, train),
        }
    }

    /// The fused CPU/f32 path, or `None` when it does not apply.
    fn fused_forward(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        let Param::Frozen(w) = &self.weight else {
            return Ok(None);
        };
        if !self.fusable(x, w) {
            return Ok(None);
        }
        let f32 = candle_core::DType::F32;
        let dims = x.dims();
        let (lead, inner) = dims.split_at(dims.len().saturating_sub(1));
        let (n, inp) = (
            lead.iter().product::<usize>(),
            inner.first().copied().unwrap_or(1),
        );
        let mut out_shape = lead.to_vec();
        out_shape.push(w.dim(0)?);
        let x2 = x.reshape((n, inp))?.contiguous()?;
        let y = match self.lora.as_ref().filter(|_| !self.merged) {
            // Plain or merged: one GEMM accumulating into the bias (no separate bias pass); the
            // op's backward gives only dX (the weight is frozen).
            None => {
                let op = ops::FrozenLinearOp {
                    w0: w.clone(),
                    bias: self.bias().cloned(),
                };
                x2.apply_op1(op)?
            }
            Some(l) => {
                if l.a.dtype() != f32 || l.b.dtype() != f32 || l.magnitude.is_some() {
                    return Ok(None);
                }
                let op = self.lora_op(w, l, n * inp, train);
                x2.apply_op3(l.a.as_tensor(), l.b.as_tensor(), op)?
            }
        };
        Ok(Some(y.reshape(out_shape)?))
    }

    /// The fused LoRA op over `len` input elements, with a fresh dropout mask when training.
    fn lora_op(&self, w: &Tensor, l: &LowRank, len: usize, train: bool) -> ops::LoraLinearOp {
        let mask = (train && l.dropout > 0.0).then(|| ops::DropMask {
            keep: self.rng.keep_flags(len, l.dropout),
            scale: 1.0 / (1.0 - l.dropout),
        });
        ops::LoraLinearOp {
            w0: w.clone(),
            bias: self.bias().cloned(),
            scale: l.scale as f32,
            mask,
            saved_xa: Default::default(),
        }
    }

    /// Whether the fused CPU/f32 path applies to `x` and the frozen weight `w`.
    fn fusable(&self, x: &Tensor, w: &Tensor) -> bool {
        let f32 = candle_core::DType::F32;
        let bias_ok = self
            .bias()
            .is_none_or(|b| b.dtype() == f32 && b.is_contiguous());
        x.device().is_cpu() && x.dtype() == f32 && w.dtype() == f32 && w.is_contiguous() && bias_ok
    }

    /// The reference path in plain tensor ops (any device and dtype).
    ///
    /// With DoRA (PEFT's `DoraLinearVariant.forward`): `y = W0·x + b + (k − 1)·(W0·x̃) +
    /// k·s·B·A·x̃`, `k = m/‖W0 + s·B·A‖` (detached), `x̃ = dropout(x)` in training with dropout
    /// (then `W0·x̃` is recomputed, as PEFT does), else `x` (and `W0·x` is reused).
    pub(crate) fn plain_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let wx = matmul_t(x, self.weight())?;
        let y = match self.bias() {
            Some(b) => wx.broadcast_add(b)?,
            None => wx.clone(),
        };
        let Some(l) = self.lora.as_ref().filter(|_| !self.merged) else {
            return Ok(y);
        };
        let dropped = train && l.dropout > 0.0;
        let xd = if dropped {
            dropout(x, l.dropout, &self.rng)?
        } else {
            x.clone()
        };
        let xd = xd.to_dtype(l.a.dtype())?;
        let xa = (matmul_t(&xd, l.a.as_tensor())? * l.scale)?; // [..., r]
        let delta = matmul_t(&xa, l.b.as_tensor())?.to_dtype(y.dtype())?; // [..., out]
        let Some(m) = &l.magnitude else {
            return Ok((y + delta)?);
        };
        let dw = (l.b.matmul(l.a.as_tensor())?.detach() * l.scale)?;
        let k = dora::factor(m.as_tensor(), self.weight(), &dw, NormAxis::First)?;
        let base = if dropped {
            matmul_t(&xd.to_dtype(self.weight().dtype())?, self.weight())?
        } else {
            wx
        };
        Ok((y + dora::output(&base, &delta, &k)?)?)
    }
}

thread_local! {
    static LOW_RANK_REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every unmerged adapted [`LoraLinear`] on this thread computing the explicit
/// low-rank form `y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ` with plain tensor ops. The fast path builds the
/// merged weight `W0 + s·B·A` on the fly when that costs less (many rows), which makes "merged
/// vs unmerged" the same computation; checks of merge, unmerge and init compare the merged
/// weight against this form instead.
pub fn with_low_rank_reference<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            LOW_RANK_REFERENCE.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(LOW_RANK_REFERENCE.with(|c| c.replace(true)));
    f()
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x, false).map_err(candle_core::Error::wrap)
    }
}

impl Mergeable for LoraLinear {
    /// `W0 + s·B·A`; with DoRA `k ⊙ (W0 + s·B·A)` ([`dora::merged_weight`]).
    fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Ok(());
        }
        let Some(delta) = self.delta_weight()? else {
            return Ok(());
        };
        let w = self.weight().clone();
        let Some(l) = self.lora.as_mut() else {
            return Ok(());
        };
        let merged = match &l.magnitude {
            None => apply_delta(&w, &delta, 1.0, false, &l.name)?,
            Some(m) => {
                let (merged, n) = dora::merged_weight(&w, &delta, m.as_tensor(), NormAxis::First)?;
                check_finite(&merged, &l.name, "merge")?;
                l.merged_norm = Some(n);
                merged.to_dtype(w.dtype())?
            }
        };
        self.weight = Param::Frozen(merged);
        self.merged = true;
        Ok(())
    }

    fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Ok(());
        }
        let Some(delta) = self.delta_weight()? else {
            return Ok(());
        };
        let w = self.weight().clone();
        let Some(l) = self.lora.as_mut() else {
            return Ok(());
        };
        let restored = match (&l.magnitude, l.merged_norm.take()) {
            (None, _) => apply_delta(&w, &delta, -1.0, true, &l.name)?,
            (Some(m), Some(n)) => {
                let u = dora::unmerged_weight(&w, &delta, m.as_tensor(), &n, NormAxis::First)?;
                check_finite(&u, &l.name, "unmerge")?;
                u.to_dtype(w.dtype())?
            }
            (Some(_), None) => {
                return Err(Error::State(format!(
                    "module `{}`: DoRA cannot unmerge without the norm of its own merge",
                    l.name
                )))
            }
        };
        self.weight = Param::Frozen(restored);
        self.merged = false;
        Ok(())
    }

    fn is_merged(&self) -> bool {
        self.merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff as max_abs;
    use candle_core::{backprop::GradStore, Device, D};

    fn layer(spec: LoraSpec, bias: bool) -> (LoraLinear, Tensor) {
        let dev = Device::Cpu;
        let rng = LoraRng::new(3);
        let w = init::normal(&[24, 16], 0.2, &rng, &dev).unwrap();
        let b = bias.then(|| init::normal(&[24], 0.2, &rng, &dev).unwrap());
        let x = init::normal(&[2, 5, 16], 1.0, &rng, &dev).unwrap();
        (LoraLinear::new(w, b, &spec, &rng, "lin").unwrap(), x)
    }

    fn random_spec(r: usize) -> LoraSpec {
        LoraSpec {
            init: InitLoraWeights::Random,
            ..LoraSpec::new(r, 8.0)
        }
    }

    fn plain(l: &LoraLinear, x: &Tensor) -> Tensor {
        let y = matmul_t(x, l.weight()).unwrap();
        match l.bias() {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    #[test]
    fn b_zero_means_output_equals_base() {
        let (l, x) = layer(LoraSpec::new(4, 8.0), true);
        assert_eq!(
            max_abs(&l.forward_t(&x, true).unwrap(), &plain(&l, &x)),
            0.0
        );
    }

    #[test]
    fn forward_is_base_plus_scaled_low_rank_product() {
        let (l, x) = layer(random_spec(4), true);
        let lr = l.lora().unwrap();
        // Exact math: x·(W + s·B·A)ᵀ + b, computed independently.
        let w_eff = (l.weight() + (lr.b.matmul(lr.a.as_tensor()).unwrap() * 2.0).unwrap()).unwrap();
        let want = matmul_t(&x, &w_eff)
            .unwrap()
            .broadcast_add(l.bias().unwrap())
            .unwrap();
        assert!(max_abs(&l.forward_t(&x, false).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn only_a_and_b_receive_gradients() {
        let (l, x) = layer(random_spec(4), true);
        let grads: GradStore = l
            .forward_t(&x, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let lr = l.lora().unwrap();
        assert!(grads.get(lr.a.as_tensor()).is_some());
        assert!(grads.get(lr.b.as_tensor()).is_some());
        assert!(grads.get(l.weight()).is_none());
        assert!(grads.get(l.bias().unwrap()).is_none());
        assert!(grads.get(&x).is_none());
        // d(sum y)/dB = s·(1ᵀ)·(x·Aᵀ): check one value exactly.
        let xa = matmul_t(&x, lr.a.as_tensor())
            .unwrap()
            .reshape((10, 4))
            .unwrap();
        let want = (xa.sum(0).unwrap() * 2.0).unwrap(); // every row of dB equals this
        let got = grads.get(lr.b.as_tensor()).unwrap().get(0).unwrap();
        assert!(max_abs(&got, &want) < 1e-4);
    }

    #[test]
    fn merged_forward_equals_unmerged_and_unmerge_restores() {
        let (mut l, x) = layer(random_spec(4), true);
        let w0 = l.weight().clone();
        let unmerged = l.forward_t(&x, false).unwrap();
        l.merge().unwrap();
        assert!(l.is_merged());
        assert!(max_abs(&l.forward_t(&x, false).unwrap(), &unmerged) <= 1e-5);
        let once = l.weight().clone();
        l.merge().unwrap();
        assert_eq!(
            max_abs(l.weight(), &once),
            0.0,
            "merging twice = merging once"
        );
        l.unmerge().unwrap();
        assert!(max_abs(l.weight(), &w0) < 1e-6);
        l.unmerge().unwrap();
        assert!(max_abs(l.weight(), &w0) < 1e-6, "unmerging twice = once");
    }

    #[test]
    fn training_a_merged_layer_is_refused() {
        let (mut l, x) = layer(random_spec(2), false);
        l.merge().unwrap();
        let e = l.forward_t(&x, true).unwrap_err().to_string();
        assert!(e.contains("lin") && e.contains("unmerge"), "{e}");
    }

    #[test]
    fn merge_refuses_non_finite_result() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[f32::MAX, 0.0], [0.0, 1.0]], &dev).unwrap();
        let a = Tensor::new(&[[1f32, 0.0]], &dev).unwrap();
        let b = Tensor::new(&[[f32::MAX], [0.0]], &dev).unwrap();
        let mut l =
            LoraLinear::from_adapter(w, None, a, b, 1.0, 0.0, "big", &LoraRng::new(0)).unwrap();
        let e = l.merge().unwrap_err().to_string();
        assert!(e.contains("big") && e.contains("non-finite"), "{e}");
        assert!(!l.is_merged());
    }

    #[test]
    fn rank_zero_is_plain_linear_with_trainable_weight() {
        let (l, x) = layer(LoraSpec::new(0, 8.0), true);
        assert!(l.lora().is_none());
        assert_eq!(l.num_trainable(), 24 * 16 + 24);
        assert_eq!(
            max_abs(&l.forward_t(&x, true).unwrap(), &plain(&l, &x)),
            0.0
        );
        let grads = l
            .forward_t(&x, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(l.weight()).is_some() && grads.get(l.bias().unwrap()).is_some());
    }

    #[test]
    fn rslora_scale_and_gaussian_init() {
        let spec = LoraSpec {
            use_rslora: true,
            init: InitLoraWeights::Gaussian,
            ..LoraSpec::new(16, 8.0)
        };
        assert_eq!(spec.scale(), 2.0);
        let (l, _) = layer(spec, false);
        let lr = l.lora().unwrap();
        assert_eq!(lr.scale, 2.0);
        let a = lr.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        assert!((std - 1.0 / 16.0).abs() < 0.01, "std {std}");
        assert_eq!(
            lr.b.flatten_all()
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn dropout_applies_to_the_lora_branch_only_and_only_in_training() {
        let spec = LoraSpec {
            dropout: 0.5,
            ..random_spec(4)
        };
        let (l, x) = layer(spec, false);
        let eval1 = l.forward_t(&x, false).unwrap();
        assert_eq!(max_abs(&eval1, &l.forward_t(&x, false).unwrap()), 0.0);
        let train = l.forward_t(&x, true).unwrap();
        assert!(max_abs(&train, &eval1) > 1e-3);
        // With B = 0 the base path is untouched by dropout.
        let (l0, x0) = layer(
            LoraSpec {
                dropout: 0.5,
                ..LoraSpec::new(4, 8.0)
            },
            false,
        );
        assert_eq!(
            max_abs(&l0.forward_t(&x0, true).unwrap(), &plain(&l0, &x0)),
            0.0
        );
    }

    #[test]
    fn adapter_shapes_are_checked() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((6, 4), candle_core::DType::F32, &dev).unwrap();
        let a = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros((6, 2), candle_core::DType::F32, &dev).unwrap();
        let e =
            LoraLinear::from_adapter(w, None, a, b, 1.0, 0.0, "m.q", &LoraRng::new(0)).unwrap_err();
        assert!(e.to_string().contains("m.q.lora_A.weight"), "{e}");
    }

    fn grads_of(l: &LoraLinear, x: &Tensor, fused: bool, seed: u64) -> (Tensor, Vec<Tensor>) {
        l.rng.restore(LoraRng::new(seed).state().0, 0);
        let y = if fused {
            l.fused_forward(x, true).unwrap().unwrap()
        } else {
            l.plain_forward(x, true).unwrap()
        };
        // A loss with non-uniform weights so every gradient entry matters.
        let w = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .reshape(y.shape())
            .unwrap();
        let g = (y.clone() * (w / 97.0).unwrap().sin().unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let lr = l.lora().unwrap();
        let mut v = vec![
            g.get(lr.a.as_tensor()).unwrap().clone(),
            g.get(lr.b.as_tensor()).unwrap().clone(),
        ];
        if let Some(dx) = g.get(x) {
            v.push(dx.clone());
        }
        (y, v)
    }

    #[test]
    fn fused_op_matches_plain_path_in_values_and_gradients() {
        for (dropout, bias, track_x) in [(0.0, true, false), (0.0, false, true), (0.3, true, true)]
        {
            let spec = LoraSpec {
                dropout,
                ..random_spec(4)
            };
            let (l, x) = layer(spec, bias);
            let x = if track_x {
                candle_core::Var::from_tensor(&x)
                    .unwrap()
                    .as_tensor()
                    .clone()
            } else {
                x
            };
            let (y1, g1) = grads_of(&l, &x, true, 9);
            let (y2, g2) = grads_of(&l, &x, false, 9);
            assert!(max_abs(&y1, &y2) < 1e-5, "values, dropout {dropout}");
            assert_eq!(g1.len(), g2.len());
            assert_eq!(g1.len(), if track_x { 3 } else { 2 });
            for (a, b) in g1.iter().zip(&g2) {
                let scale = b
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(D::Minus1)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    max_abs(a, b) <= 1e-5 * scale.max(1.0),
                    "gradient differs: {} (scale {scale})",
                    max_abs(a, b)
                );
            }
        }
    }

    /// Both forward paths of the fused op (the merged weight `W0 + s·B·A` at or above
    /// `merged_weight_pays`'s row threshold without dropout, the low-rank branch below it or
    /// with dropout) match the plain path in values and in the gradients of A, B and x, with and
    /// without bias: tolerance 1e-5 relative to the largest entry (f32 rounding of a different
    /// summation order; the values are O(1)..O(10)).
    #[test]
    fn both_fused_paths_match_the_plain_path_with_and_without_bias() {
        // 24×16: threshold 16·24 / (16 + 24) = 9.6 rows.
        for (rows, dropout, merged) in [(10, 0.0, true), (300, 0.0, true), (9, 0.0, false)] {
            for (rows, dropout, merged) in [(rows, dropout, merged), (rows, 0.25, false)] {
                assert_eq!(
                    dropout == 0.0 && ops::merged_weight_pays(rows, 16, 24),
                    merged
                );
                for bias in [true, false] {
                    let spec = LoraSpec {
                        dropout,
                        ..random_spec(4)
                    };
                    let (l, _) = layer(spec, bias);
                    let x =
                        init::normal(&[rows, 16], 1.0, &LoraRng::new(rows as u64), &Device::Cpu)
                            .unwrap();
                    let x = candle_core::Var::from_tensor(&x)
                        .unwrap()
                        .as_tensor()
                        .clone();
                    let (y1, g1) = grads_of(&l, &x, true, 5);
                    let (y2, g2) = grads_of(&l, &x, false, 5);
                    let what = format!("rows {rows}, dropout {dropout}, bias {bias}");
                    let rel = |a: &Tensor, b: &Tensor| {
                        let m = b
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap();
                        max_abs(a, b) / m.max(1.0)
                    };
                    assert!(rel(&y1, &y2) <= 1e-5, "values, {what}");
                    assert_eq!((g1.len(), g2.len()), (3, 3), "{what}");
                    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
                        assert!(rel(a, b) <= 1e-5, "gradient {i} (A, B, x), {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn frozen_op_gives_only_the_input_gradient() {
        let (l, x) = layer(LoraSpec::new(4, 8.0), true);
        let plain = LoraLinear::frozen(l.weight().clone(), l.bias().cloned());
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let y = plain.forward_t(xv.as_tensor(), true).unwrap();
        assert!(max_abs(&y, &plain.plain_forward(&x, false).unwrap()) < 1e-5);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(plain.weight()).is_none());
        let dx = g.get(xv.as_tensor()).unwrap();
        // d(sum y)/dx = 1·W0: every row equals the column sums of W0.
        let want = plain.weight().sum(0).unwrap();
        assert!(max_abs(&dx.reshape((10, 16)).unwrap().get(3).unwrap(), &want) < 1e-5);
    }
}
