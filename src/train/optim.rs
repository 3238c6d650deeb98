//! [`AdamW`] with PyTorch's exact update, and gradient clipping by global norm
//! ([`clip_grad_norm`], `torch.nn.utils.clip_grad_norm_`).
//!
//! The update follows `torch/optim/adamw.py` (`_single_tensor_adam`, decoupled weight decay),
//! for each parameter `p` with gradient `g`, at its own step count `t` (starting at 1):
//!
//! ```text
//! p ← p·(1 − lr·wd)                        decoupled weight decay, first
//! m ← m + (1 − β1)·(g − m)                  exp_avg.lerp_(grad, 1 - beta1)
//! v ← β2·v + (1 − β2)·g²                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! denom = √v / √(1 − β2ᵗ) + ε
//! p ← p − (lr / (1 − β1ᵗ)) · m / denom
//! ```
//!
//! Parameters without a gradient are skipped (their state does not advance), as in PyTorch.
//! The state (`m`, `v`, each parameter's step count) saves to and loads from safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels::adamw::{first_moment, second_moment, update_param, AdamWStep};
use crate::kernels::Isa;
use crate::tensor_file::{self, SafeFile};

/// Whether the in-place update applies: every tensor contiguous f32 on the CPU.
fn in_place_applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// The f32 values of a contiguous CPU storage.
fn values<'s>(s: &'s CpuStorage, l: &Layout) -> candle_core::Result<&'s [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("AdamW: expected contiguous f32"),
    }
}

/// [`values`], mutable.
fn values_mut<'s>(s: &'s mut CpuStorage, l: &Layout) -> candle_core::Result<&'s mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("AdamW: expected contiguous f32"),
    }
}

/// `m ← m + (g − m)·(1 − β1)` in place, given `1 − β1`.
struct FirstMoment(f32);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        first_moment(Isa::current(), values_mut(m, ml)?, values(g, gl)?, self.0);
        Ok(())
    }
}

/// `v ← v·β2 + g²·(1 − β2)` in place, given `β2` and `1 − β2`.
struct SecondMoment(f32, f32);

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        vl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        second_moment(
            Isa::current(),
            values_mut(v, vl)?,
            values(g, gl)?,
            self.0,
            self.1,
        );
        Ok(())
    }
}

/// The parameter's update from `m` and `v`, in place.
struct UpdateParam(AdamWStep);

impl InplaceOp3 for UpdateParam {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (values(m, ml)?, values(v, vl)?);
        update_param(Isa::current(), self.0, values_mut(p, pl)?, m, v);
        Ok(())
    }
}

/// AdamW hyper-parameters (PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
/// weight decay 1e-2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (a schedule may override it per step; see [`AdamW::step`]).
    pub lr: f64,
    /// β1, the first-moment decay.
    pub beta1: f64,
    /// β2, the second-moment decay.
    pub beta2: f64,
    /// ε, added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (applied to parameters that decay, see [`AdamW::set_no_decay`]).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One optimised parameter and its state.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    step: u64,
    decay: bool,
}

/// AdamW over a given list of variables (see the module doc for the exact update).
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
}

/// Key prefixes of the saved state.
const M_KEY: &str = "exp_avg.";
const V_KEY: &str = "exp_avg_sq.";
const STEP_KEY: &str = "step.";

impl AdamW {
    /// An optimizer over `vars` (name, variable), with zero state. Names must be unique; they
    /// key the saved state.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                if !seen.insert(name.clone()) {
                    return Err(Error::State(format!(
                        "optimizer: parameter `{name}` is given twice"
                    )));
                }
                // Two buffers: the update writes each in place.
                let (m, v) = (var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?);
                Ok(Slot {
                    name,
                    m,
                    v,
                    var,
                    step: 0,
                    decay: true,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { cfg, slots })
    }

    /// Exempts the parameters whose name satisfies `no_decay` from weight decay (PyTorch's
    /// parameter groups; transformers' Trainer exempts biases and norm weights).
    pub fn set_no_decay(&mut self, no_decay: impl Fn(&str) -> bool) {
        for s in &mut self.slots {
            s.decay = !no_decay(&s.name);
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The optimised variables, in order (gradients passed to [`AdamW::step`] follow it).
    pub fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    /// The parameter names, in order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// The largest per-parameter step count (the number of steps taken so far).
    pub fn step_count(&self) -> u64 {
        self.slots.iter().map(|s| s.step).max().unwrap_or(0)
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of the i-th variable
    /// (`None`: skipped, as a PyTorch parameter whose `.grad` is `None`).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::State(format!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.cfg;
        for (s, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            // Detached: candle's backward can hand out gradients that still reference the
            // forward graph; optimizer state built from them would keep every step's
            // activations alive.
            let g = g.detach().to_dtype(s.var.dtype())?;
            s.step += 1;
            let t = s.step as i32;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            if in_place_applies(&[s.var.as_tensor(), &s.m, &s.v, &g]) {
                // Three in-place passes (`kernels::adamw`) instead of a dozen tensor ops.
                let keep = if s.decay {
                    1.0 - lr * weight_decay
                } else {
                    1.0
                };
                let step = AdamWStep {
                    keep: keep as f32,
                    inv_bc2_sqrt: (1.0 / bias_correction2_sqrt) as f32,
                    eps: eps as f32,
                    step_size: step_size as f32,
                };
                s.m.inplace_op2(&g, &FirstMoment((1.0 - beta1) as f32))?;
                s.v.inplace_op2(&g, &SecondMoment(beta2 as f32, (1.0 - beta2) as f32))?;
                s.var
                    .as_tensor()
                    .inplace_op3(&s.m, &s.v, &UpdateParam(step))?;
                continue;
            }
            let mut p = s.var.as_tensor().detach();
            if s.decay && weight_decay != 0.0 {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            // exp_avg.lerp_(grad, 1 - beta1): self + weight·(end − self).
            s.m = (&s.m + ((&g - &s.m)? * (1.0 - beta1))?)?;
            s.v = ((&s.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((s.v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let upd = ((&s.m / denom)? * step_size)?;
            s.var.set(&(p - upd)?)?;
        }
        Ok(())
    }

    /// Writes the state (`exp_avg.<name>`, `exp_avg_sq.<name>`, and each step count as
    /// `step.<name>` metadata) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        let mut meta = BTreeMap::new();
        for s in &self.slots {
            tensors.insert(format!("{M_KEY}{}", s.name), s.m.clone());
            tensors.insert(format!("{V_KEY}{}", s.name), s.v.clone());
            meta.insert(format!("{STEP_KEY}{}", s.name), s.step.to_string());
        }
        meta.insert("format".into(), "lora-adamw".into());
        tensor_file::save(path, &tensors, &meta)
    }

    /// Restores a state written by [`AdamW::save`]; its parameters must be exactly these
    /// (same names and shapes).
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let f = SafeFile::open(path)?;
        let meta = f.metadata();
        let want: std::collections::BTreeSet<String> = self
            .slots
            .iter()
            .flat_map(|s| [format!("{M_KEY}{}", s.name), format!("{V_KEY}{}", s.name)])
            .collect();
        if let Some(extra) = f.names().into_iter().find(|n| !want.contains(n)) {
            return Err(Error::UnusedTensor {
                key: extra,
                file: path.into(),
                hint: "the optimizer state is for other parameters".into(),
            });
        }
        let dev = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let get = |key: String| -> Result<Tensor> {
                let t = f.tensor(&key, &dev)?;
                if t.dims() != s.var.dims() {
                    return Err(Error::ShapeMismatch {
                        key,
                        got: t.dims().to_vec(),
                        what: format!("parameter `{}` of shape {:?}", s.name, s.var.dims()),
                    });
                }
                Ok(t.to_dtype(s.var.dtype())?)
            };
            let m = get(format!("{M_KEY}{}", s.name))?;
            let v = get(format!("{V_KEY}{}", s.name))?;
            let step_key = format!("{STEP_KEY}{}", s.name);
            let step = meta
                .get(&step_key)
                .and_then(|x| x.parse::<u64>().ok())
                .ok_or_else(|| Error::BadSafetensors {
                    path: path.into(),
                    reason: format!("metadata `{step_key}` is missing or not a number"),
                })?;
            loaded.push((m, v, step));
        }
        for (s, (m, v, step)) in self.slots.iter_mut().zip(loaded) {
            (s.m, s.v, s.step) = (m, v, step);
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the global 2-norm of all gradients
/// (the norm of the per-tensor norms) is returned; when `max_norm > 0` every gradient is
/// multiplied by `min(1, max_norm / (norm + 1e-6))`. `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        let n = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        sq += n * n;
    }
    let total = sq.sqrt();
    if max_norm > 0.0 && total.is_finite() {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PyTorch's reference, `torch/optim/adamw.py` → `adam.py::_single_tensor_adam`
    /// (decoupled weight decay):
    ///
    /// ```python
    /// param.mul_(1 - lr * weight_decay)
    /// exp_avg.lerp_(grad, 1 - beta1)
    /// exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
    /// bias_correction1 = 1 - beta1 ** step
    /// bias_correction2 = 1 - beta2 ** step
    /// step_size = lr / bias_correction1
    /// bias_correction2_sqrt = bias_correction2 ** 0.5
    /// denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    /// param.addcdiv_(exp_avg, denom, value=-step_size)
    /// ```
    ///
    /// computed by hand in f64 for two steps.
    fn reference(p0: f64, grads: &[f64], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m += (1.0 - b1) * (g - m);
            v = b2 * v + (1.0 - b2) * g * g;
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn adamw_matches_pytorch_formula_with_weight_decay_over_two_steps() {
        let dev = Device::Cpu;
        let p0 = [0.5f32, -1.25, 2.0, 0.0];
        let g1 = [0.1f32, -0.3, 1e-4, 2.0];
        let g2 = [-0.2f32, 0.05, 3e-4, 1.0];
        let var = Var::new(&p0, &dev).unwrap();
        let cfg = AdamWConfig {
            lr: 0.01,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        for g in [&g1, &g2] {
            opt.step(&[Some(Tensor::new(g, &dev).unwrap())], cfg.lr)
                .unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..4 {
            let want = reference(
                p0[i] as f64,
                &[g1[i] as f64, g2[i] as f64],
                0.01,
                0.8,
                0.95,
                1e-6,
                0.1,
            );
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "element {i}: {} vs {want}",
                got[i]
            );
        }
        // Hand-checked first element, step 1 only: p = 0.5·(1 − 1e-3) = 0.4995, m̂ = 0.1,
        // v̂ = 0.01, update = 0.01·0.1/(0.1 + 1e-6) ≈ 0.0099999 → 0.4895001.
        let one = reference(0.5, &[0.1], 0.01, 0.8, 0.95, 1e-6, 0.1);
        assert!((one - 0.489_500_1).abs() < 1e-7, "{one}");
        assert_eq!(opt.step_count(), 2);
    }

    #[test]
    fn no_decay_parameters_skip_weight_decay_and_missing_grads_skip_the_step() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32], &dev).unwrap();
        let b = Var::new(&[1.0f32], &dev).unwrap();
        let c = Var::new(&[1.0f32], &dev).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![
                ("w".into(), a.clone()),
                ("norm.bias".into(), b.clone()),
                ("x".into(), c.clone()),
            ],
            cfg,
        )
        .unwrap();
        opt.set_no_decay(|n| n.ends_with("bias"));
        let g = Some(Tensor::new(&[0.0f32], &dev).unwrap());
        opt.step(&[g.clone(), g, None], 0.1).unwrap();
        // Zero gradient: only the decay moves a parameter.
        assert_eq!(a.as_tensor().to_vec1::<f32>().unwrap(), [0.95]);
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
        assert_eq!(c.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
    }

    #[test]
    fn state_saves_and_loads_so_the_next_step_is_identical() {
        let dev = Device::Cpu;
        let mk = || Var::new(&[[0.3f32, -0.7], [1.1, 0.2]], &dev).unwrap();
        let g = |s: f32| Some(Tensor::new(&[[0.1f32 * s, -0.2], [0.3, s]], &dev).unwrap());
        let (va, vb) = (mk(), mk());
        let mut a = AdamW::new(vec![("w".into(), va.clone())], AdamWConfig::default()).unwrap();
        a.step(&[g(1.0)], 1e-2).unwrap();
        a.step(&[g(-2.0)], 1e-2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        a.save(&path).unwrap();
        vb.set(va.as_tensor()).unwrap();
        let mut b = AdamW::new(vec![("w".into(), vb.clone())], AdamWConfig::default()).unwrap();
        b.load_state(&path).unwrap();
        assert_eq!(b.step_count(), 2);
        a.step(&[g(0.5)], 1e-2).unwrap();
        b.step(&[g(0.5)], 1e-2).unwrap();
        assert_eq!(
            va.as_tensor().to_vec2::<f32>().unwrap(),
            vb.as_tensor().to_vec2::<f32>().unwrap()
        );
        // Another parameter set is refused, naming the file.
        let vc = Var::new(&[1.0f32], &dev).unwrap();
        let mut c = AdamW::new(vec![("other".into(), vc)], AdamWConfig::default()).unwrap();
        let e = c.load_state(&path).unwrap_err().to_string();
        assert!(e.contains("optimizer.safetensors"), "{e}");
    }

    #[test]
    fn clip_grad_norm_follows_torch() {
        let dev = Device::Cpu;
        // Norms 5 and 12 → global 13.
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 4.0], &dev).unwrap()),
            None,
            Some(Tensor::new(&[12.0f32], &dev).unwrap()),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 13.0).abs() < 1e-9);
        let coef = 1.0 / (13.0 + 1e-6);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-7);
        assert!((a[1] as f64 - 4.0 * coef).abs() < 1e-7);
        let c = g[2].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((c[0] as f64 - 12.0 * coef).abs() < 1e-7);
        // Below the limit, or with max_norm 0 (off): unchanged, norm still reported.
        let mut g = vec![Some(Tensor::new(&[0.3f32, 0.4], &dev).unwrap())];
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 0.5).abs() < 1e-7);
        assert_eq!(g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), [0.3, 0.4]);
        let mut g = vec![Some(Tensor::new(&[30.0f32, 40.0], &dev).unwrap())];
        assert!((clip_grad_norm(&mut g, 0.0).unwrap() - 50.0).abs() < 1e-5);
        assert_eq!(
            g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            [30.0, 40.0]
        );
    }
}
