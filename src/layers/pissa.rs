//! PiSSA and OLoRA initialisation (`init_lora_weights = "pissa"`, `"pissa_niter_N"`, `"olora"`):
//! A and B start from a decomposition of the base weight `W: [out, in]`, and the base is
//! rewritten to the residual `W_res = W − s·B·A`, so that the model's output is unchanged at the
//! start. Ported from PEFT 0.21.2 `tuners/lora/layer.py` (`LoraLayer.pissa_init`,
//! `LoraLayer.olora_init`); the SVD and QR come from `faer` (in f64).
//!
//! ```text
//! PiSSA: W = U·diag(S)·Vᵀ (thin SVD)   S_r' = S[:r]/s
//!        A = diag(√S_r')·Vᵀ[:r]  [r, in]      B = U[:, :r]·diag(√S_r')  [out, r]
//! OLoRA: W = Q·R (thin QR)              A = R[:r]  [r, in]               B = Q[:, :r]  [out, r]
//! both:  W_res = W − s·B·A   (computed in f32 from the f32 A and B, then cast to W's dtype)
//! ```
//!
//! Singular vectors (and Householder QR columns) are defined up to a sign per component; faer and
//! LAPACK may pick different signs, which flips a row of A together with the matching column of
//! B. The products `B·A`, the residual and every model output are the same.
//!
//! `"pissa_niter_N"`: PEFT uses torch's randomized `svd_lowrank` with N subspace iterations (an
//! approximation of the top r singular triplets that depends on torch's random state). We compute
//! the exact truncated SVD instead, which is what the randomized one approximates: deterministic,
//! but a little different from PEFT's adapter, and slower on very large matrices.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// A base-rewriting init: the factors and the residual base weight.
#[derive(Debug, Clone)]
pub struct BaseRewrite {
    /// `lora_A: [r, in]`, f32.
    pub a: Tensor,
    /// `lora_B: [out, r]`, f32.
    pub b: Tensor,
    /// `W − s·B·A`, in `W`'s dtype.
    pub residual: Tensor,
}

/// Which base-rewriting init a config names, if any we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `"pissa"` and `"pissa_niter_N"` (see the module doc for the latter).
    Pissa,
    /// `"olora"`.
    Olora,
}

impl Method {
    /// Parses PEFT's `init_lora_weights` string: `pissa`, `pissa_niter_<N>`, `olora`.
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "pissa" => Some(Method::Pissa),
            "olora" => Some(Method::Olora),
            _ => s
                .strip_prefix("pissa_niter_")
                .filter(|n| n.parse::<usize>().is_ok())
                .map(|_| Method::Pissa),
        }
    }
}

fn to_faer(w: &Tensor) -> Result<faer::Mat<f64>> {
    let (rows, cols) = w.dims2()?;
    let v = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(faer::Mat::from_fn(rows, cols, |i, j| v[i * cols + j]))
}

fn from_fn(
    rows: usize,
    cols: usize,
    f: impl Fn(usize, usize) -> f64,
    w: &Tensor,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|k| f(k / cols, k % cols) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), w.device())?)
}

/// Decomposes `w: [out, in]` by `method` at rank `r` with scale `s` (see the module doc).
pub fn init(w: &Tensor, method: Method, r: usize, scale: f64, name: &str) -> Result<BaseRewrite> {
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(Error::Module {
            module: name.to_string(),
            reason: format!(
                "{method:?} init needs r <= min(out, in) = {}, got r = {r}",
                out.min(inp)
            ),
        });
    }
    let m = to_faer(w)?;
    let (a, b) = match method {
        Method::Pissa => {
            let svd = m.thin_svd().map_err(|e| Error::Module {
                module: name.to_string(),
                reason: format!("PiSSA's SVD did not converge: {e:?}"),
            })?;
            let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
            let root: Vec<f64> = (0..r).map(|i| (s[i] / scale).sqrt()).collect();
            let a = from_fn(r, inp, |i, j| root[i] * v[(j, i)], w)?;
            let b = from_fn(out, r, |i, j| u[(i, j)] * root[j], w)?;
            (a, b)
        }
        Method::Olora => {
            let qr = m.qr();
            let (q, rr) = (qr.compute_thin_Q(), qr.thin_R());
            let a = from_fn(r, inp, |i, j| rr[(i, j)], w)?;
            let b = from_fn(out, r, |i, j| q[(i, j)], w)?;
            (a, b)
        }
    };
    let delta = (b.matmul(&a)? * scale)?;
    let residual = super::apply_delta(w, &delta, -1.0, false, name)?;
    Ok(BaseRewrite { a, b, residual })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff as max_abs;
    use candle_core::Device;

    #[test]
    fn parse_names() {
        assert_eq!(Method::parse("pissa"), Some(Method::Pissa));
        assert_eq!(Method::parse("pissa_niter_4"), Some(Method::Pissa));
        assert_eq!(Method::parse("olora"), Some(Method::Olora));
        assert_eq!(Method::parse("pissa_niter_x"), None);
        assert_eq!(Method::parse("loftq"), None);
    }

    #[test]
    fn residual_plus_adapter_is_the_base_and_factors_have_their_structure() {
        let w = Tensor::randn(0f32, 1.0, (12, 9), &Device::Cpu).unwrap();
        for method in [Method::Pissa, Method::Olora] {
            let r = init(&w, method, 3, 2.0, "m").unwrap();
            let back = (&r.residual + (r.b.matmul(&r.a).unwrap() * 2.0).unwrap()).unwrap();
            assert!(max_abs(&back, &w) < 1e-5, "{method:?}");
            // OLoRA's B has orthonormal columns; PiSSA's B columns are orthogonal with
            // |b_i|² = σ_i/s, equal to |a_i|².
            let btb = r.b.t().unwrap().matmul(&r.b).unwrap();
            let aat = r.a.matmul(&r.a.t().unwrap()).unwrap();
            let off = |m: &Tensor| {
                let eye = Tensor::eye(3, DType::F32, &Device::Cpu).unwrap();
                let d = (m * &eye).unwrap();
                max_abs(&(m - &d).unwrap(), &d.zeros_like().unwrap())
            };
            assert!(off(&btb) < 1e-5, "{method:?}");
            if method == Method::Pissa {
                assert!(off(&aat) < 1e-5);
                let (bd, ad) = (btb.sum(1).unwrap(), aat.sum(1).unwrap());
                assert!(max_abs(&bd, &ad) < 1e-4);
            } else {
                assert!(max_abs(&btb, &Tensor::eye(3, DType::F32, &Device::Cpu).unwrap()) < 1e-5);
            }
        }
        assert!(init(&w, Method::Pissa, 10, 1.0, "m").is_err());
    }
}
