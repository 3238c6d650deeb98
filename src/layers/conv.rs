//! [`LoraConv2d`]: a 2-D convolution with a low-rank adapter, PEFT's `lora.Conv2d`.
//!
//! ```text
//! y  = conv(x, W0) + b + s·conv1x1(conv(dropout(x), A), B)
//!      W0: [out, in, kh, kw] (frozen)   A: [r, in, kh, kw]   B: [out, r, 1, 1]
//!      A uses the base's stride, padding **and dilation**; B is 1×1, stride 1, no padding.
//! ΔW = s·einsum("or,rikl->oikl", B[:, :, 0, 0], A)   merged: y = conv(x, W0 + ΔW) + b
//! ```
//!
//! PEFT 0.21.2 builds `lora_A` without the base's dilation, so a dilated conv crashes there
//! (peft#3697); here A shares the full geometry and merged ≡ unmerged for dilated convs too.
//! Only `groups = 1` is supported (PEFT cannot merge grouped convs either).

use candle_core::{DType, Tensor, Var};

use super::dora::{self, NormAxis};
use super::{
    apply_delta, check_finite, check_init, dropout, expect_shape, init, LoraRng, LoraSpec, LowRank,
    Mergeable, Param,
};
use crate::config::InitLoraWeights;
use crate::error::{Error, Result};

/// Stride, padding and dilation of a square 2-D convolution (candle's conv takes one value each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeometry {
    /// Zero padding on every side.
    pub padding: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Dilation in both directions.
    pub dilation: usize,
}

impl Default for Conv2dGeometry {
    fn default() -> Self {
        Conv2dGeometry {
            padding: 0,
            stride: 1,
            dilation: 1,
        }
    }
}

/// A 2-D convolution with an optional LoRA adapter (see the module doc).
#[derive(Debug, Clone)]
pub struct LoraConv2d {
    weight: Param,
    bias: Option<Param>,
    geom: Conv2dGeometry,
    lora: Option<LowRank>,
    merged: bool,
    rng: LoraRng,
}

impl LoraConv2d {
    /// A plain frozen conv with `weight: [out, in, kh, kw]`.
    pub fn frozen(weight: Tensor, bias: Option<Tensor>, geom: Conv2dGeometry) -> Self {
        LoraConv2d {
            weight: Param::Frozen(weight),
            bias: bias.map(Param::Frozen),
            geom,
            lora: None,
            merged: false,
            rng: LoraRng::new(0),
        }
    }

    /// Wraps a frozen conv with a new adapter initialised by `spec.init` (Kaiming-uniform A with
    /// fan-in `in·kh·kw`, B zeros by default, as PEFT's conv).
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        geom: Conv2dGeometry,
        spec: &LoraSpec,
        rng: &LoraRng,
        name: &str,
    ) -> Result<Self> {
        check_init(&spec.init, name)?;
        let (out_c, in_c, kh, kw) = weight.dims4()?;
        let (r, dev) = (spec.r, weight.device());
        let fan_in = in_c * kh * kw;
        let a = match spec.init {
            InitLoraWeights::Gaussian => {
                init::normal(&[r, in_c, kh, kw], 1.0 / r as f32, rng, dev)?
            }
            _ => init::kaiming_uniform(&[r, in_c, kh, kw], fan_in, rng, dev)?,
        };
        let b = match spec.init {
            InitLoraWeights::Random => init::kaiming_uniform(&[out_c, r, 1, 1], r, rng, dev)?,
            _ => Tensor::zeros((out_c, r, 1, 1), DType::F32, dev)?,
        };
        let layer = Self::from_adapter(
            weight,
            bias,
            geom,
            a,
            b,
            spec.scale(),
            spec.dropout,
            name,
            rng,
        )?;
        if spec.use_dora {
            return layer.with_dora(None);
        }
        Ok(layer)
    }

    /// Turns the adapter into DoRA with magnitude `m: [1, out, 1, 1]` (PEFT's shape), or the
    /// initial `m = ‖W0 + ΔW‖` over `in·kh·kw` when `None` (see [`super::dora`]).
    pub fn with_dora(mut self, m: Option<Tensor>) -> Result<Self> {
        let delta = self.delta_weight()?;
        let w = self.weight.tensor().clone();
        if let (Some(l), Some(delta)) = (self.lora.as_mut(), delta) {
            let out = w.dim(0)?;
            l.set_magnitude(m, &w, &delta, NormAxis::First, &[1, out, 1, 1])?;
        }
        Ok(self)
    }

    /// Wraps a frozen conv with given `a: [r, in, kh, kw]`, `b: [out, r, 1, 1]`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_adapter(
        weight: Tensor,
        bias: Option<Tensor>,
        geom: Conv2dGeometry,
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: f32,
        name: &str,
        rng: &LoraRng,
    ) -> Result<Self> {
        let (out_c, in_c, kh, kw) = weight.dims4()?;
        let r = a.dims().first().copied().unwrap_or(0);
        expect_shape(
            &a,
            &format!("{name}.lora_A.weight"),
            &[r, in_c, kh, kw],
            "lora_A of a conv [r, in, kh, kw]",
        )?;
        expect_shape(
            &b,
            &format!("{name}.lora_B.weight"),
            &[out_c, r, 1, 1],
            "lora_B of a conv [out, r, 1, 1]",
        )?;
        if r == 0 {
            return Err(Error::ShapeMismatch {
                key: format!("{name}.lora_A.weight"),
                got: a.dims().to_vec(),
                what: "a LoRA factor (empty tensor)".into(),
            });
        }
        Ok(LoraConv2d {
            weight: Param::Frozen(weight),
            bias: bias.map(Param::Frozen),
            geom,
            lora: Some(LowRank::plain(name, &a, &b, scale, dropout)?),
            merged: false,
            rng: rng.clone(),
        })
    }

    /// The (possibly merged) kernel `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        self.weight.tensor()
    }
    /// The adapter, if any.
    pub fn lora(&self) -> Option<&LowRank> {
        self.lora.as_ref()
    }
    /// Every trainable variable.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora.as_ref().map(LowRank::vars).unwrap_or_default()
    }

    /// `s·B·A` as a kernel `[out, in, kh, kw]` in f32.
    pub fn delta_weight(&self) -> Result<Option<Tensor>> {
        let Some(l) = &self.lora else { return Ok(None) };
        let (r, in_c, kh, kw) = l.a.dims4()?;
        let out_c = l.b.dim(0)?;
        let b2 = l.b.reshape((out_c, r))?;
        let a2 = l.a.reshape((r, in_c * kh * kw))?;
        Ok(Some(
            (b2.matmul(&a2)?.reshape((out_c, in_c, kh, kw))? * l.scale)?,
        ))
    }

    fn conv(&self, x: &Tensor, k: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
        Ok(x.conv2d(k, g.padding, g.stride, g.dilation, 1)?)
    }

    /// `x: [batch, in, h, w]` → `[batch, out, h', w']`; `train` enables dropout.
    ///
    /// With DoRA (PEFT's `_DoraConvNdVariant.forward`): `y = conv(x, W0) + b + (k − 1)·conv(x̃, W0)
    /// + k·s·conv1x1(conv(x̃, A), B)`, `k = m/‖W0 + ΔW‖` per output channel (detached).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let wx = self.conv(x, self.weight(), self.geom)?;
        let mut y = wx.clone();
        if let Some(b) = self.bias.as_ref().map(Param::tensor) {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        let Some(l) = self.lora.as_ref().filter(|_| !self.merged) else {
            if train && self.merged {
                return Err(Error::State(
                    "conv layer is merged: unmerge it before training".into(),
                ));
            }
            return Ok(y);
        };
        let dropped = train && l.dropout > 0.0;
        let xd = if dropped {
            dropout(x, l.dropout, &self.rng)?
        } else {
            x.clone()
        };
        let h = self.conv(&xd.to_dtype(DType::F32)?, l.a.as_tensor(), self.geom)?; // [b, r, h', w']
        let d = self.conv(&h, l.b.as_tensor(), Conv2dGeometry::default())?;
        let d = (d * l.scale)?.to_dtype(y.dtype())?;
        let Some(m) = &l.magnitude else {
            return Ok((y + d)?);
        };
        let dw = self.delta_weight()?.expect("has an adapter").detach();
        let k = dora::factor(m.as_tensor(), self.weight(), &dw, NormAxis::First)?;
        let k = k.reshape((1, (), 1, 1))?;
        let base = if dropped {
            self.conv(&xd, self.weight(), self.geom)?
        } else {
            wx
        };
        Ok((y + dora::output(&base, &d, &k)?)?)
    }
}

impl Mergeable for LoraConv2d {
    /// `W0 + ΔW`; with DoRA `k ⊙ (W0 + ΔW)` per output channel ([`dora::merged_weight`]).
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
                dora::unmerged_weight(&w, &delta, m.as_tensor(), &n, NormAxis::First)?
                    .to_dtype(w.dtype())?
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
    use candle_core::Device;

    fn check_merge_equals_unmerged(geom: Conv2dGeometry) {
        let dev = Device::Cpu;
        let rng = LoraRng::new(11);
        let w = init::normal(&[4, 3, 3, 3], 0.3, &rng, &dev).unwrap();
        let b = init::normal(&[4], 0.3, &rng, &dev).unwrap();
        let x = init::normal(&[2, 3, 9, 9], 1.0, &rng, &dev).unwrap();
        let spec = LoraSpec {
            init: InitLoraWeights::Random,
            ..LoraSpec::new(2, 4.0)
        };
        let mut c = LoraConv2d::new(w.clone(), Some(b.clone()), geom, &spec, &rng, "conv").unwrap();
        let unmerged = c.forward_t(&x, false).unwrap();
        let base = LoraConv2d::frozen(w, Some(b), geom)
            .forward_t(&x, false)
            .unwrap();
        assert!(
            max_abs(&unmerged, &base) > 1e-3,
            "adapter must change the output"
        );
        c.merge().unwrap();
        let merged = c.forward_t(&x, false).unwrap();
        assert_eq!(merged.dims(), unmerged.dims());
        assert!(
            max_abs(&merged, &unmerged) < 1e-5,
            "{geom:?}: {}",
            max_abs(&merged, &unmerged)
        );
    }

    #[test]
    fn conv_merge_equals_unmerged() {
        check_merge_equals_unmerged(Conv2dGeometry {
            padding: 1,
            stride: 1,
            dilation: 1,
        });
        check_merge_equals_unmerged(Conv2dGeometry {
            padding: 0,
            stride: 2,
            dilation: 1,
        });
    }

    #[test]
    fn dilated_conv_merge_equals_unmerged() {
        // PEFT 0.21.2 crashes on exactly this conv (peft#3697).
        check_merge_equals_unmerged(Conv2dGeometry {
            padding: 2,
            stride: 1,
            dilation: 2,
        });
    }

    #[test]
    fn delta_is_the_einsum_of_b_and_a() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[[[1f32, 2.], [3., 4.]]], [[[0f32, 1.], [0., 1.]]]], &dev).unwrap(); // [2,1,2,2]
        let b = Tensor::new(&[[[[1f32]], [[10.]]]], &dev).unwrap(); // [1,2,1,1]
        let w = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
        let c = LoraConv2d::from_adapter(
            w,
            None,
            Conv2dGeometry::default(),
            a,
            b,
            0.5,
            0.0,
            "c",
            &LoraRng::new(0),
        )
        .unwrap();
        let d = c
            .delta_weight()
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(d, vec![0.5, 6.0, 1.5, 7.0]);
    }

    #[test]
    fn only_a_and_b_get_gradients() {
        let dev = Device::Cpu;
        let rng = LoraRng::new(2);
        let w = init::normal(&[4, 3, 3, 3], 0.3, &rng, &dev).unwrap();
        let x = init::normal(&[1, 3, 6, 6], 1.0, &rng, &dev).unwrap();
        let spec = LoraSpec {
            init: InitLoraWeights::Random,
            ..LoraSpec::new(2, 4.0)
        };
        let geom = Conv2dGeometry {
            padding: 2,
            stride: 1,
            dilation: 2,
        };
        let c = LoraConv2d::new(w, None, geom, &spec, &rng, "conv").unwrap();
        let g = c
            .forward_t(&x, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let l = c.lora().unwrap();
        assert!(g.get(l.a.as_tensor()).is_some() && g.get(l.b.as_tensor()).is_some());
        assert!(g.get(c.weight()).is_none());
    }
}
