//! [`LoraEmbedding`]: an embedding table with a low-rank adapter, PEFT's `lora.Embedding`.
//!
//! ```text
//! y  = E[ids] + s·(Aᵀ[ids])·Bᵀ          E: [vocab, dim] (frozen)
//!                                      A: [r, vocab] (`lora_embedding_A`), B: [dim, r] (`lora_embedding_B`)
//! ΔE = s·(B·A)ᵀ  : [vocab, dim]        merged: y = (E + ΔE)[ids]
//! ```
//!
//! PEFT's default init (and its "gaussian") is the reverse of the linear one: A zeros,
//! B ~ N(0, 1). There is no
//! dropout: dropping integer ids means nothing (PEFT creates the module but never applies it).

use candle_core::{DType, Tensor, Var};

use super::dora::{self, NormAxis};
use super::{
    apply_delta, check_finite, check_init, expect_shape, init, LoraRng, LoraSpec, LowRank,
    Mergeable, Param,
};
use crate::config::InitLoraWeights;
use crate::error::{Error, Result};

/// An embedding lookup with an optional LoRA adapter (see the module doc).
#[derive(Debug, Clone)]
pub struct LoraEmbedding {
    table: Param,
    lora: Option<LowRank>,
    merged: bool,
}

impl LoraEmbedding {
    /// A plain, frozen embedding table `[vocab, dim]`.
    pub fn frozen(table: Tensor) -> Self {
        LoraEmbedding {
            table: Param::Frozen(table),
            lora: None,
            merged: false,
        }
    }

    /// A plain embedding whose table is trainable (full fine-tuning).
    pub fn trainable(table: &Tensor) -> Result<Self> {
        Ok(LoraEmbedding {
            table: Param::trainable(table)?,
            lora: None,
            merged: false,
        })
    }

    /// Wraps a frozen `table: [vocab, dim]` with a new adapter initialised by `spec.init`.
    pub fn new(table: Tensor, spec: &LoraSpec, rng: &LoraRng, name: &str) -> Result<Self> {
        if spec.r == 0 {
            return Self::trainable(&table);
        }
        check_init(&spec.init, name)?;
        let (vocab, dim) = table.dims2()?;
        let (r, dev) = (spec.r, table.device());
        let (a, b) = match spec.init {
            // PEFT `tuners/lora/layer.py` `reset_lora_parameters`: for `lora_embedding_A/B`
            // every init other than `False` (`True` and "gaussian" alike) is A = 0, B ~ N(0, 1).
            InitLoraWeights::Default | InitLoraWeights::Gaussian => (
                Tensor::zeros((r, vocab), DType::F32, dev)?,
                init::normal(&[dim, r], 1.0, rng, dev)?,
            ),
            InitLoraWeights::Random => (
                init::normal(&[r, vocab], 1.0, rng, dev)?,
                init::normal(&[dim, r], 1.0, rng, dev)?,
            ),
            InitLoraWeights::Other(_) => unreachable!("refused by check_init"),
        };
        let layer = Self::from_adapter(table, a, b, spec.scale(), name)?;
        if spec.use_dora {
            return layer.with_dora(None);
        }
        Ok(layer)
    }

    /// Turns the adapter into DoRA with magnitude `m: [dim]`, or PEFT's initial
    /// `m = ‖E + ΔE‖` per embedding column (over the vocabulary) when `None` (see
    /// [`super::dora`]; PEFT's `DoraEmbeddingLayer` uses `fan_in_fan_out=True`).
    pub fn with_dora(mut self, m: Option<Tensor>) -> Result<Self> {
        let delta = self.delta_weight()?;
        let t = self.table.tensor().clone();
        if let (Some(l), Some(delta)) = (self.lora.as_mut(), delta) {
            let dim = t.dim(1)?;
            l.set_magnitude(m, &t, &delta, NormAxis::Last, &[dim])?;
        }
        Ok(self)
    }

    /// Wraps a frozen table with given `a: [r, vocab]`, `b: [dim, r]`.
    pub fn from_adapter(
        table: Tensor,
        a: Tensor,
        b: Tensor,
        scale: f64,
        name: &str,
    ) -> Result<Self> {
        let (vocab, dim) = table.dims2()?;
        let r = a.dims().first().copied().unwrap_or(0);
        expect_shape(
            &a,
            &format!("{name}.lora_embedding_A"),
            &[r, vocab],
            "lora_embedding_A [r, vocab]",
        )?;
        expect_shape(
            &b,
            &format!("{name}.lora_embedding_B"),
            &[dim, r],
            "lora_embedding_B [dim, r]",
        )?;
        if r == 0 {
            return Err(Error::ShapeMismatch {
                key: format!("{name}.lora_embedding_A"),
                got: a.dims().to_vec(),
                what: "a LoRA factor (empty tensor)".into(),
            });
        }
        Ok(LoraEmbedding {
            table: Param::Frozen(table),
            lora: Some(LowRank::plain(name, &a, &b, scale, 0.0)?),
            merged: false,
        })
    }

    /// The (possibly merged) table `[vocab, dim]`.
    pub fn table(&self) -> &Tensor {
        self.table.tensor()
    }
    /// The adapter, if any.
    pub fn lora(&self) -> Option<&LowRank> {
        self.lora.as_ref()
    }
    /// Every trainable variable.
    pub fn trainable_vars(&self) -> Vec<Var> {
        match &self.lora {
            Some(l) => l.vars(),
            None => self.table.var().into_iter().cloned().collect(),
        }
    }

    /// `s·(B·A)ᵀ`, `[vocab, dim]` in f32.
    pub fn delta_weight(&self) -> Result<Option<Tensor>> {
        self.lora
            .as_ref()
            .map(|l| Ok((l.b.matmul(l.a.as_tensor())?.t()? * l.scale)?))
            .transpose()
    }

    /// Looks up `ids` (any integer shape) → `[..., dim]`.
    ///
    /// With DoRA (PEFT's `DoraEmbeddingVariant.forward`): `y = k ⊙ (E[ids] + s·Aᵀ[ids]·Bᵀ)`,
    /// `k = m/‖E + ΔE‖` per embedding column (detached).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let flat = ids.flatten_all()?;
        let mut out_shape = ids.dims().to_vec();
        out_shape.push(self.table().dim(1)?);
        let mut y = self.table().index_select(&flat, 0)?; // [n, dim]
        if let Some(l) = self.lora.as_ref().filter(|_| !self.merged) {
            let at = l.a.as_tensor().t()?.contiguous()?; // [vocab, r]
            let xa = (at.index_select(&flat, 0)? * l.scale)?; // [n, r]
            let delta = xa.matmul(&l.b.as_tensor().t()?)?.to_dtype(y.dtype())?; // [n, dim]
            y = match &l.magnitude {
                None => (y + delta)?,
                Some(m) => {
                    let de = self.delta_weight()?.expect("has an adapter").detach();
                    let k = dora::factor(m.as_tensor(), self.table(), &de, NormAxis::Last)?;
                    (&y + dora::output(&y, &delta, &k)?)?
                }
            };
        }
        Ok(y.reshape(out_shape)?)
    }
}

impl Mergeable for LoraEmbedding {
    /// `E + ΔE`; with DoRA `k ⊙ (E + ΔE)` per column ([`dora::merged_weight`]).
    fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Ok(());
        }
        let Some(delta) = self.delta_weight()? else {
            return Ok(());
        };
        let t = self.table().clone();
        let Some(l) = self.lora.as_mut() else {
            return Ok(());
        };
        let merged = match &l.magnitude {
            None => apply_delta(&t, &delta, 1.0, true, &l.name)?,
            Some(m) => {
                let (merged, n) = dora::merged_weight(&t, &delta, m.as_tensor(), NormAxis::Last)?;
                check_finite(&merged, &l.name, "merge")?;
                l.merged_norm = Some(n);
                merged.to_dtype(t.dtype())?
            }
        };
        self.table = Param::Frozen(merged);
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
        let t = self.table().clone();
        let Some(l) = self.lora.as_mut() else {
            return Ok(());
        };
        let restored = match (&l.magnitude, l.merged_norm.take()) {
            (None, _) => apply_delta(&t, &delta, -1.0, true, &l.name)?,
            (Some(m), Some(n)) => {
                dora::unmerged_weight(&t, &delta, m.as_tensor(), &n, NormAxis::Last)?
                    .to_dtype(t.dtype())?
            }
            (Some(_), None) => {
                return Err(Error::State(format!(
                    "module `{}`: DoRA cannot unmerge without the norm of its own merge",
                    l.name
                )))
            }
        };
        self.table = Param::Frozen(restored);
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

    fn setup(init: InitLoraWeights) -> (LoraEmbedding, Tensor) {
        let dev = Device::Cpu;
        let rng = LoraRng::new(5);
        let table = init::normal(&[20, 6], 1.0, &rng, &dev).unwrap();
        let spec = LoraSpec {
            init,
            ..LoraSpec::new(3, 6.0)
        };
        let ids = Tensor::new(&[[1u32, 4, 19], [0, 4, 7]], &dev).unwrap();
        (LoraEmbedding::new(table, &spec, &rng, "emb").unwrap(), ids)
    }

    #[test]
    fn default_init_is_a_zero_b_normal_so_output_is_base() {
        let (e, ids) = setup(InitLoraWeights::Default);
        let l = e.lora().unwrap();
        assert_eq!(
            l.a.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(
            l.b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        let base = e
            .table()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap()
            .reshape((2, 3, 6))
            .unwrap();
        assert_eq!(max_abs(&e.forward(&ids).unwrap(), &base), 0.0);
    }

    #[test]
    fn gaussian_init_on_an_embedding_is_a_zero_b_standard_normal_as_peft() {
        // Issue 13 item 5: PEFT keeps A = 0, B ~ N(0, 1) for "gaussian" on embeddings.
        let (e, ids) = setup(InitLoraWeights::Gaussian);
        let l = e.lora().unwrap();
        let sum_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(sum_abs(&l.a), 0.0);
        let b = l.b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let var = b.iter().map(|x| x * x).sum::<f32>() / b.len() as f32;
        // 18 draws of N(0, 1) (not N(0, 1/r²) = 0.11): the sample variance is far above 0.11.
        assert!(var > 0.3, "B variance {var}");
        let base = e
            .table()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap();
        assert_eq!(
            max_abs(&e.forward(&ids).unwrap().reshape((6, 6)).unwrap(), &base),
            0.0
        );
    }

    #[test]
    fn lookup_equals_table_plus_delta_rows_and_merge_matches() {
        let (mut e, ids) = setup(InitLoraWeights::Random);
        let delta = e.delta_weight().unwrap().unwrap();
        let full = (e.table() + &delta).unwrap();
        let want = full
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap()
            .reshape((2, 3, 6))
            .unwrap();
        let unmerged = e.forward(&ids).unwrap();
        assert!(max_abs(&unmerged, &want) < 1e-5);
        let t0 = e.table().clone();
        e.merge().unwrap();
        assert!(max_abs(&e.forward(&ids).unwrap(), &unmerged) <= 1e-5);
        e.unmerge().unwrap();
        assert!(max_abs(e.table(), &t0) < 1e-5);
    }

    #[test]
    fn only_a_and_b_get_gradients() {
        let (e, ids) = setup(InitLoraWeights::Random);
        let g = e
            .forward(&ids)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let l = e.lora().unwrap();
        assert!(g.get(l.a.as_tensor()).is_some() && g.get(l.b.as_tensor()).is_some());
        assert!(g.get(e.table()).is_none());
    }
}
