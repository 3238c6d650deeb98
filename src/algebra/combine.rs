//! `combine`: a weighted combination of LoRA adapters, PEFT's `LoraModel.add_weighted_adapter`
//! (`peft/tuners/lora/model.py`, 0.21.2: `_check_add_weighted_adapter`, `add_weighted_adapter`,
//! `_svd_generalized_task_arithmetic_weighted_adapter`, `_generalized_task_arithmetic_weighted_adapter`).
//!
//! For adapters i = 1…n with weights `wᵢ`, scales `sᵢ` (α/r or α/√r per module) and factors
//! `Bᵢ: [out, rᵢ]`, `Aᵢ: [rᵢ, in]`, per module (over the adapters that have it):
//!
//! | method | new factors | new rank |
//! |---|---|---|
//! | `cat` | `A = cat₀(wᵢ·sᵢ·Aᵢ)`, `B = cat₁(Bᵢ)`; exact: `B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ` | Σ rᵢ |
//! | `svd` | truncated SVD of `ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ = U·Σ·Vᵀ`: `B = U_k·Σ_k`, `A = V_kᵀ` | `--rank`, default max rᵢ |
//! | `linear` | `A = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ` (an approximation: cross terms Bᵢ·Aⱼ appear) | r (all equal) |
//! | `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` | as `linear`, with the [`super::tasks`] merge of that name on A and on B | r (all equal) |
//! | `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` | the merge of that name on the `ΔWᵢ = sᵢ·Bᵢ·Aᵢ`, then the SVD as `svd` | as `svd` |
//!
//! The new adapter has `lora_alpha = r`, so its scale is 1. With a single adapter PEFT always
//! uses `linear`, and so do we. `svd` factors `ΔW` through thin QRs of the stacked factors
//! ([`super::svd_of_product`]) instead of forming the `out × in` matrix; when a module's
//! combined rank is below the requested rank, the extra components are zero (PEFT's full SVD
//! gives round-off-sized ones there).
//!
//! Where this differs from PEFT, on purpose:
//! - **rsLoRA.** A mix of rsLoRA and plain adapters is refused. PEFT copies `use_rslora` from the first adapter into the new config, so when it
//!   is true the combined adapter is scaled by `r/√r = √r` instead of 1 (checked with PEFT
//!   0.21.2: the merged ΔW of `svd`, `cat`, `linear` came out 1.67×, 2.83×, 2.77× too large). We
//!   write `use_rslora: false`; each input's own scale (rsLoRA or not) is applied exactly.
//! - **Per-module ranks.** PEFT zero-pads every module to the config's rank (for `cat`, the sum
//!   of the configs' ranks even where an adapter lacks the module). We write each module at its
//!   own rank and record the exceptions in `rank_pattern`/`alpha_pattern` (escaped full names),
//!   which merges to the same weights.
//! - **Refusals** where PEFT would silently compute something else: DoRA (the new magnitude would
//!   be the base norm), `lora_bias`, trained `bias`, `modules_to_save`, different
//!   `fan_in_fan_out`, `layers_to_transform`, `layers_pattern` or `exclude_modules` (PEFT keeps
//!   the first adapter's, which drops the others' modules), and a weight count that is not the
//!   adapter count (PEFT's `zip` drops the extra).
//! - **DARE** draws its masks from [`super::tasks::DareRng`] with `seed`, not torch's RNG.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use faer::Mat;

pub use super::tasks::SignMethod;
use super::tasks::{self, DareRng};
use crate::adapter::{Adapter, ModuleAdapter};
use crate::config::{Bias, TargetModules};
use crate::error::{Error, Result};

/// PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Weighted sums of A and of B (√|w·s| on each side).
    Linear,
    /// Concatenated ranks; exact.
    Cat,
    /// Truncated SVD of the weighted ΔW sum.
    Svd,
    /// TIES on A and on B.
    Ties,
    /// TIES on the ΔWᵢ, then SVD.
    TiesSvd,
    /// DARE (random pruning, rescaled) on A and on B, summed.
    DareLinear,
    /// DARE on the ΔWᵢ, summed, then SVD.
    DareLinearSvd,
    /// DARE pruning with TIES's sign election, on A and on B.
    DareTies,
    /// DARE-TIES on the ΔWᵢ, then SVD.
    DareTiesSvd,
    /// Magnitude pruning on A and on B, summed.
    MagnitudePrune,
    /// Magnitude pruning on the ΔWᵢ, summed, then SVD.
    MagnitudePruneSvd,
}

impl Method {
    /// Every method, in PEFT's order.
    pub const ALL: [Method; 11] = [
        Method::Svd,
        Method::Linear,
        Method::Cat,
        Method::Ties,
        Method::TiesSvd,
        Method::DareTies,
        Method::DareLinear,
        Method::DareTiesSvd,
        Method::DareLinearSvd,
        Method::MagnitudePrune,
        Method::MagnitudePruneSvd,
    ];

    /// PEFT's name (`"dare_ties_svd"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::Cat => "cat",
            Method::Svd => "svd",
            Method::Ties => "ties",
            Method::TiesSvd => "ties_svd",
            Method::DareLinear => "dare_linear",
            Method::DareLinearSvd => "dare_linear_svd",
            Method::DareTies => "dare_ties",
            Method::DareTiesSvd => "dare_ties_svd",
            Method::MagnitudePrune => "magnitude_prune",
            Method::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the result is an SVD of a combined ΔW (`svd` and `*_svd`).
    pub fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    /// Whether the method prunes, and so needs a density.
    pub fn needs_density(self) -> bool {
        !matches!(self, Method::Linear | Method::Cat | Method::Svd)
    }

    /// Whether the method elects signs (`majority_sign_method` applies).
    pub fn elects_signs(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::TiesSvd | Method::DareTies | Method::DareTiesSvd
        )
    }

    /// Whether the method draws random masks (`seed` applies).
    pub fn is_random(self) -> bool {
        self.name().starts_with("dare")
    }

    /// Whether A and B are combined separately (all ranks must be equal).
    fn per_factor(self) -> bool {
        !self.is_svd() && self != Method::Cat
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::Algebra {
                op: "combine",
                reason: format!(
                    "unknown method `{s}` (one of {})",
                    Method::ALL.map(Method::name).join(", ")
                ),
            })
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The options of [`combine`]: PEFT's `add_weighted_adapter` arguments.
#[derive(Debug, Clone)]
pub struct CombineOptions {
    /// `combination_type`.
    pub method: Method,
    /// One weight per adapter; negative weights subtract.
    pub weights: Vec<f64>,
    /// `svd_rank`: the rank of `svd`/`*_svd` results (default: the largest input rank).
    pub rank: Option<usize>,
    /// The fraction of elements kept by the pruning methods, in (0, 1].
    pub density: Option<f64>,
    /// `majority_sign_method` of the TIES methods.
    pub majority_sign: SignMethod,
    /// The seed of the DARE masks.
    pub seed: u64,
}

impl CombineOptions {
    /// Options for `method` with `weights` and PEFT's defaults otherwise (seed 0).
    pub fn new(method: Method, weights: Vec<f64>) -> Self {
        CombineOptions {
            method,
            weights,
            rank: None,
            density: None,
            majority_sign: SignMethod::Total,
            seed: 0,
        }
    }
}

/// What [`combine`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CombineReport {
    /// The method applied (`linear` when a single adapter was given, as PEFT).
    pub method: String,
    /// The config's rank `r` (= `lora_alpha`).
    pub rank: usize,
    /// Module → rank, for every module written.
    pub module_ranks: BTreeMap<String, usize>,
    /// Notes worth telling the user (method changed, rsLoRA, ...).
    pub notes: Vec<String>,
}

fn refuse(reason: String) -> Error {
    Error::Algebra {
        op: "combine",
        reason,
    }
}

/// Combines `inputs` (`(name for messages, adapter)`) into a new adapter (see the module doc).
pub fn combine(
    inputs: &[(&str, &Adapter)],
    opts: &CombineOptions,
) -> Result<(Adapter, CombineReport)> {
    check_options(inputs, opts)?;
    check_configs(inputs)?;
    let mut notes = Vec::new();
    let method = if inputs.len() == 1 && opts.method != Method::Linear {
        notes.push(format!(
            "one adapter: PEFT combines a single adapter with `linear`, not `{}`",
            opts.method
        ));
        Method::Linear
    } else {
        opts.method
    };
    if inputs.iter().any(|(_, a)| a.config.use_rslora) {
        notes.push(
            "rsLoRA inputs: each input's scale α/√r is applied; the result is written with \
             use_rslora: false and scale 1 (PEFT would copy use_rslora and scale it by √r)"
                .into(),
        );
    }
    // PEFT's config-level ranks: r, or the largest of r and the rank_pattern values.
    let config_ranks: Vec<usize> = inputs
        .iter()
        .map(|(_, a)| {
            a.config
                .rank_pattern
                .values()
                .copied()
                .fold(a.config.r, usize::max)
        })
        .collect();
    let new_rank = match method {
        m if m.per_factor() => {
            if config_ranks.iter().any(|r| *r != config_ranks[0]) {
                return Err(refuse(format!(
                    "`{method}` needs adapters of the same r, got {} (PEFT: \"All adapters must \
                     have the same r value\"); use cat or svd",
                    list_ranks(inputs, &config_ranks)
                )));
            }
            config_ranks[0]
        }
        Method::Cat => config_ranks.iter().sum(),
        _ => opts
            .rank
            .unwrap_or_else(|| config_ranks.iter().copied().max().unwrap_or(1)),
    };
    let names: BTreeSet<&String> = inputs.iter().flat_map(|(_, a)| a.modules.keys()).collect();
    let mut rng = DareRng::new(opts.seed);
    let mut modules = BTreeMap::new();
    for name in names {
        let parts: Vec<Part> = inputs
            .iter()
            .zip(&opts.weights)
            .filter_map(|((label, a), w)| {
                a.modules.get(name).map(|m| {
                    Ok(Part {
                        label,
                        m,
                        weight: *w,
                        scale: a.scale_for(name)?,
                    })
                })
            })
            .collect::<Result<_>>()?;
        check_parts(name, &parts)?;
        let m = combine_module(name, &parts, method, new_rank, opts, &mut rng)?;
        modules.insert(name.clone(), m);
    }
    let config = new_config(inputs, new_rank, &modules)?;
    let adapter = Adapter {
        config,
        modules,
        ..Default::default()
    };
    for (name, m) in &adapter.modules {
        if !adapter.config.is_target(name, m.kind)? {
            return Err(refuse(format!(
                "module `{name}` is not targeted by its adapter's target_modules, so PEFT would \
                 not load it; fix the input adapter's config"
            )));
        }
    }
    let report = CombineReport {
        method: method.name().into(),
        rank: new_rank,
        module_ranks: adapter
            .modules
            .iter()
            .map(|(n, m)| (n.clone(), m.rank()))
            .collect(),
        notes,
    };
    Ok((adapter, report))
}

fn list_ranks(inputs: &[(&str, &Adapter)], ranks: &[usize]) -> String {
    inputs
        .iter()
        .zip(ranks)
        .map(|((n, _), r)| format!("{n}: {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_options(inputs: &[(&str, &Adapter)], opts: &CombineOptions) -> Result<()> {
    if inputs.is_empty() {
        return Err(refuse("no adapters given".into()));
    }
    if opts.weights.len() != inputs.len() {
        return Err(refuse(format!(
            "{} weights for {} adapters: give one weight per adapter",
            opts.weights.len(),
            inputs.len()
        )));
    }
    if let Some(w) = opts.weights.iter().find(|w| !w.is_finite()) {
        return Err(refuse(format!("weight {w} is not finite")));
    }
    let m = opts.method;
    match (m.needs_density(), opts.density) {
        (true, None) => {
            return Err(refuse(format!(
                "`{m}` prunes: give --density, the fraction of elements kept, in (0, 1]"
            )))
        }
        (true, Some(d)) if !(d > 0.0 && d <= 1.0) => {
            return Err(refuse(format!("--density {d} is outside (0, 1]")))
        }
        (false, Some(_)) => {
            return Err(refuse(format!(
                "--density applies to the pruning methods, not `{m}`"
            )))
        }
        _ => {}
    }
    match opts.rank {
        Some(_) if !m.is_svd() => Err(refuse(format!(
            "--rank applies to svd and the *_svd methods, not `{m}` (its rank follows the inputs)"
        ))),
        Some(0) => Err(refuse("--rank must be at least 1".into())),
        _ => Ok(()),
    }
}

/// Config fields that must agree, with PEFT's reason.
fn check_configs(inputs: &[(&str, &Adapter)]) -> Result<()> {
    for (label, a) in inputs {
        let c = &a.config;
        let why = if c.use_dora {
            Some("use_dora: DoRA adapters cannot be combined (PEFT would keep the new adapter's magnitude at the base weight's norm)")
        } else if c.lora_bias {
            Some("lora_bias: PEFT's combination drops lora_B's bias")
        } else if c.bias != Bias::None {
            Some("bias: trained base biases cannot be combined")
        } else if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            Some("modules_to_save: fully trained modules cannot be combined")
        } else if c.target_modules.is_none() {
            Some("target_modules is null (PEFT: \"Invalid type\")")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(refuse(format!("adapter {label}: {why}")));
        }
    }
    let (first, a0) = inputs[0];
    let c0 = &a0.config;
    let kind = |t: &Option<TargetModules>| match t {
        Some(TargetModules::List(_)) => "a list",
        Some(TargetModules::Regex(_)) => "a regex",
        Some(TargetModules::AllLinear) => "\"all-linear\"",
        None => "null",
    };
    for (label, a) in &inputs[1..] {
        let c = &a.config;
        let differs = |field: &str, x: String, y: String| {
            refuse(format!(
                "{field} differs between {first} ({x}) and {label} ({y}); PEFT would use the \
                 first adapter's for all and misplace the others' modules"
            ))
        };
        if kind(&c.target_modules) != kind(&c0.target_modules) {
            return Err(refuse(format!(
                "target_modules is {} in {first} but {} in {label} (PEFT: \"all adapter configs \
                 should follow the same target modules type\")",
                kind(&c0.target_modules),
                kind(&c.target_modules)
            )));
        }
        if c.use_rslora != c0.use_rslora {
            return Err(refuse(format!(
                "use_rslora is {} in {first} but {} in {label}: PEFT copies the first adapter's \
                 use_rslora to the result and scales every input by it, which is wrong for a mix",
                c0.use_rslora, c.use_rslora
            )));
        }
        if c.fan_in_fan_out != c0.fan_in_fan_out {
            return Err(differs(
                "fan_in_fan_out",
                c0.fan_in_fan_out.to_string(),
                c.fan_in_fan_out.to_string(),
            ));
        }
        if c.layers_to_transform != c0.layers_to_transform {
            return Err(differs(
                "layers_to_transform",
                format!("{:?}", c0.layers_to_transform),
                format!("{:?}", c.layers_to_transform),
            ));
        }
        if c.layers_pattern != c0.layers_pattern {
            return Err(differs(
                "layers_pattern",
                format!("{:?}", c0.layers_pattern),
                format!("{:?}", c.layers_pattern),
            ));
        }
        if c.exclude_modules != c0.exclude_modules {
            return Err(differs(
                "exclude_modules",
                format!("{:?}", c0.exclude_modules),
                format!("{:?}", c.exclude_modules),
            ));
        }
    }
    Ok(())
}

/// One adapter's factors of a module, with its weight and scale.
struct Part<'a> {
    label: &'a str,
    m: &'a ModuleAdapter,
    weight: f64,
    scale: f64,
}

impl Part<'_> {
    /// `(out, in…)`: B's rows and A's trailing dims.
    fn dims(&self) -> (usize, Vec<usize>) {
        (self.m.b.dims()[0], self.m.a.dims()[1..].to_vec())
    }
}

fn check_parts(name: &str, parts: &[Part]) -> Result<()> {
    let p0 = &parts[0];
    for p in &parts[1..] {
        if p.m.kind != p0.m.kind {
            return Err(refuse(format!(
                "module `{name}` is {:?} in {} but {:?} in {}",
                p0.m.kind, p0.label, p.m.kind, p.label
            )));
        }
        if p.dims() != p0.dims() {
            return Err(refuse(format!(
                "module `{name}` has base shape {:?} in {} but {:?} in {} (adapters of different models?)",
                p0.m.base_shape(false),
                p0.label,
                p.m.base_shape(false),
                p.label
            )));
        }
    }
    Ok(())
}

/// Flat f32 values of a factor.
fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// `B: [out, r]` as f32 rows (conv `[out, r, 1, 1]` flattened the same way).
fn b_matrix(m: &ModuleAdapter) -> Result<(Vec<f32>, usize, usize)> {
    let out = m.b.dims()[0];
    Ok((flat(&m.b)?, out, m.rank()))
}

/// `A: [r, in…]` flattened to `[r, cols]`.
fn a_matrix(m: &ModuleAdapter) -> Result<(Vec<f32>, usize, usize)> {
    let r = m.rank();
    let cols = m.a.elem_count() / r;
    Ok((flat(&m.a)?, r, cols))
}

/// A module from flat `B: [out, r]` and `A: [r, cols]`, shaped like `like`'s factors.
fn module_from(like: &ModuleAdapter, b: Vec<f32>, a: Vec<f32>, r: usize) -> Result<ModuleAdapter> {
    let mut b_shape = like.b.dims().to_vec();
    b_shape[1] = r;
    let mut a_shape = like.a.dims().to_vec();
    a_shape[0] = r;
    Ok(ModuleAdapter {
        kind: like.kind,
        a: Tensor::from_vec(a, a_shape, &Device::Cpu)?,
        b: Tensor::from_vec(b, b_shape, &Device::Cpu)?,
        magnitude: None,
    })
}

fn combine_module(
    name: &str,
    parts: &[Part],
    method: Method,
    new_rank: usize,
    opts: &CombineOptions,
    rng: &mut DareRng,
) -> Result<ModuleAdapter> {
    let like = parts[0].m;
    let density = opts.density.unwrap_or(1.0);
    let merge = |tasks: &[Vec<f32>], w: &[f32], rng: &mut DareRng| -> Vec<f32> {
        match method {
            Method::Linear | Method::Svd => tasks::task_arithmetic(tasks, w),
            Method::Ties | Method::TiesSvd => tasks::ties(tasks, w, density, opts.majority_sign),
            Method::DareLinear | Method::DareLinearSvd => {
                tasks::dare_linear(tasks, w, density, rng)
            }
            Method::DareTies | Method::DareTiesSvd => {
                tasks::dare_ties(tasks, w, density, opts.majority_sign, rng)
            }
            Method::MagnitudePrune | Method::MagnitudePruneSvd => {
                tasks::magnitude_prune(tasks, w, density)
            }
            Method::Cat => unreachable!("cat does not merge task tensors"),
        }
    };
    match method {
        Method::Cat => {
            // A = cat₀(wᵢ·sᵢ·Aᵢ), B = cat₁(Bᵢ).
            let (mut a, mut b_cols, mut r) = (Vec::new(), Vec::new(), 0);
            for p in parts {
                let (av, ri, _) = a_matrix(p.m)?;
                let f = (p.weight * p.scale) as f32;
                a.extend(av.iter().map(|v| v * f));
                b_cols.push(b_matrix(p.m)?);
                r += ri;
            }
            let out = b_cols[0].1;
            let mut b = Vec::with_capacity(out * r);
            for row in 0..out {
                for (bv, _, ri) in &b_cols {
                    b.extend_from_slice(&bv[row * ri..(row + 1) * ri]);
                }
            }
            module_from(like, b, a, r)
        }
        m if m.per_factor() => {
            let r = like.rank();
            if let Some(p) = parts.iter().find(|p| p.m.rank() != r) {
                return Err(refuse(format!(
                    "`{method}` needs equal ranks, but module `{name}` has rank {r} in {} and {} in {}",
                    parts[0].label,
                    p.m.rank(),
                    p.label
                )));
            }
            // A gets sgn(w·s)·√|w·s|, B gets √|w·s| (PEFT: the sign on one side only).
            let (mut wa, mut wb, mut ta, mut tb) = (vec![], vec![], vec![], vec![]);
            for p in parts {
                let ws = p.weight * p.scale;
                let root = ws.abs().sqrt();
                wa.push((if ws >= 0.0 { root } else { -root }) as f32);
                wb.push(root as f32);
                ta.push(a_matrix(p.m)?.0);
                tb.push(b_matrix(p.m)?.0);
            }
            let a = merge(&ta, &wa, rng);
            let b = merge(&tb, &wb, rng);
            module_from(like, b, a, r)
        }
        Method::Svd => {
            // ΔW = P·Q with P = [w₁s₁B₁ | w₂s₂B₂ | …] and Q = [A₁; A₂; …].
            let (out, _) = parts[0].dims();
            let total: usize = parts.iter().map(|p| p.m.rank()).sum();
            let cols = like.a.elem_count() / like.rank();
            check_rank(name, new_rank, out, cols)?;
            let mut p_mat = Mat::<f64>::zeros(out, total);
            let mut q_mat = Mat::<f64>::zeros(total, cols);
            let mut off = 0;
            for p in parts {
                let (bv, _, ri) = b_matrix(p.m)?;
                let (av, _, _) = a_matrix(p.m)?;
                let f = p.weight * p.scale;
                for i in 0..out {
                    for j in 0..ri {
                        p_mat[(i, off + j)] = bv[i * ri + j] as f64 * f;
                    }
                }
                for i in 0..ri {
                    for j in 0..cols {
                        q_mat[(off + i, j)] = av[i * cols + j] as f64;
                    }
                }
                off += ri;
            }
            let svd = super::svd_of_product(p_mat.as_ref(), q_mat.as_ref(), name)?;
            truncated(like, &svd, new_rank, out, cols)
        }
        _ => {
            // The merge of the ΔWᵢ = sᵢ·Bᵢ·Aᵢ, then the SVD.
            let (out, _) = parts[0].dims();
            let cols = like.a.elem_count() / like.rank();
            check_rank(name, new_rank, out, cols)?;
            let mut deltas = Vec::with_capacity(parts.len());
            for p in parts {
                let (bv, _, ri) = b_matrix(p.m)?;
                let (av, _, _) = a_matrix(p.m)?;
                let b = Tensor::from_vec(bv, (out, ri), &Device::Cpu)?;
                let a = Tensor::from_vec(av, (ri, cols), &Device::Cpu)?;
                deltas.push(flat(&(b.matmul(&a)? * p.scale)?)?);
            }
            let w: Vec<f32> = parts.iter().map(|p| p.weight as f32).collect();
            let dw = merge(&deltas, &w, rng);
            let svd = super::thin_svd(super::mat_from(&dw, out, cols).as_ref(), name)?;
            truncated(like, &svd, new_rank, out, cols)
        }
    }
}

/// PEFT slices `U[:, :r]` and `S[:r]` of an `out × cols` ΔW; a rank above `min(out, cols)` makes
/// its `U @ diag(S)` fail (or silently shrink), so it is refused.
fn check_rank(name: &str, rank: usize, out: usize, cols: usize) -> Result<()> {
    if rank > out.min(cols) {
        return Err(refuse(format!(
            "--rank {rank} exceeds module `{name}`'s largest possible rank min({out}, {cols}) = {}",
            out.min(cols)
        )));
    }
    Ok(())
}

/// `B = U_k·Σ_k` `[out, k]`, `A = V_kᵀ` `[k, cols]`, zero beyond the available components.
fn truncated(
    like: &ModuleAdapter,
    svd: &super::Svd,
    k: usize,
    out: usize,
    cols: usize,
) -> Result<ModuleAdapter> {
    let have = svd.s.len().min(k);
    let mut b = vec![0f32; out * k];
    let mut a = vec![0f32; k * cols];
    for c in 0..have {
        for i in 0..out {
            b[i * k + c] = (svd.u[(i, c)] * svd.s[c]) as f32;
        }
        for j in 0..cols {
            a[c * cols + j] = svd.v[(j, c)] as f32;
        }
    }
    module_from(like, b, a, k)
}

/// PEFT: `replace(first config, r=new_rank, lora_alpha=new_rank, target_modules=union,
/// alpha_pattern={}, rank_pattern={})`, plus `use_rslora: false` and patterns for the modules
/// whose rank is not `new_rank` (see the module doc).
fn new_config(
    inputs: &[(&str, &Adapter)],
    new_rank: usize,
    modules: &BTreeMap<String, ModuleAdapter>,
) -> Result<crate::LoraConfig> {
    let mut cfg = inputs[0].1.config.clone();
    cfg.r = new_rank;
    cfg.lora_alpha = new_rank as f64;
    cfg.use_rslora = false;
    cfg.rank_pattern.clear();
    cfg.alpha_pattern.clear();
    for (name, m) in modules {
        if m.rank() != new_rank {
            let key = super::exact_pattern_key(name);
            cfg.rank_pattern.insert(key.clone(), m.rank());
            cfg.alpha_pattern.insert(key, m.rank() as f64);
        }
    }
    cfg.target_modules = Some(match &cfg.target_modules {
        Some(TargetModules::List(_)) => {
            let mut all: Vec<String> = Vec::new();
            for (_, a) in inputs {
                if let Some(TargetModules::List(l)) = &a.config.target_modules {
                    for t in l {
                        if !all.contains(t) {
                            all.push(t.clone());
                        }
                    }
                }
            }
            TargetModules::List(all)
        }
        // PEFT: "|".join(f"({t})" for t in targets).
        Some(TargetModules::Regex(_)) => TargetModules::Regex(
            inputs
                .iter()
                .filter_map(|(_, a)| match &a.config.target_modules {
                    Some(TargetModules::Regex(r)) => Some(format!("({r})")),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("|"),
        ),
        Some(TargetModules::AllLinear) => TargetModules::AllLinear,
        None => return Err(refuse("target_modules is null".into())),
    });
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoraConfig, ModuleKind};

    /// An adapter with one linear module `m` of the given factors.
    fn adapter(r: usize, alpha: f64, b: &[f32], a: &[f32], out: usize, inp: usize) -> Adapter {
        let m = ModuleAdapter {
            kind: ModuleKind::Linear,
            a: Tensor::from_slice(a, (r, inp), &Device::Cpu).unwrap(),
            b: Tensor::from_slice(b, (out, r), &Device::Cpu).unwrap(),
            magnitude: None,
        };
        Adapter {
            config: LoraConfig::new(r, alpha, &["m"]),
            modules: BTreeMap::from([("m".to_string(), m)]),
            ..Default::default()
        }
    }

    fn delta(a: &Adapter) -> Vec<f32> {
        let m = &a.modules["m"];
        flat(&m.delta_weight(a.scale_for("m").unwrap(), false).unwrap()).unwrap()
    }

    fn seq(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * k).sin()).collect()
    }

    #[test]
    fn cat_and_svd_are_exact_weighted_sums_of_the_updates() {
        let x = adapter(2, 4.0, &seq(10, 0.3), &seq(12, 0.7), 5, 6);
        let y = adapter(3, 3.0, &seq(15, 1.1), &seq(18, 0.2), 5, 6);
        let want: Vec<f32> = delta(&x)
            .iter()
            .zip(delta(&y))
            .map(|(a, b)| 0.7 * a - 0.4 * b)
            .collect();
        for (method, rank) in [(Method::Cat, None), (Method::Svd, Some(5))] {
            let mut o = CombineOptions::new(method, vec![0.7, -0.4]);
            o.rank = rank;
            let (c, rep) = combine(&[("x", &x), ("y", &y)], &o).unwrap();
            assert_eq!(c.scale_for("m").unwrap(), 1.0);
            assert_eq!(rep.module_ranks["m"], 5);
            let got = delta(&c);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{method}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn linear_puts_the_sign_on_a_and_refuses_unequal_ranks() {
        let x = adapter(2, 2.0, &seq(6, 0.3), &seq(8, 0.7), 3, 4);
        let y = adapter(2, 8.0, &seq(6, 1.1), &seq(8, 0.2), 3, 4);
        let (c, _) = combine(
            &[("x", &x), ("y", &y)],
            &CombineOptions::new(Method::Linear, vec![0.5, -0.25]),
        )
        .unwrap();
        // s_x = 1, s_y = 4: w·s = 0.5 and -1.
        let (ax, ay) = (
            a_matrix(&x.modules["m"]).unwrap().0,
            a_matrix(&y.modules["m"]).unwrap().0,
        );
        let (bx, by) = (
            b_matrix(&x.modules["m"]).unwrap().0,
            b_matrix(&y.modules["m"]).unwrap().0,
        );
        let (ca, cb) = (
            a_matrix(&c.modules["m"]).unwrap().0,
            b_matrix(&c.modules["m"]).unwrap().0,
        );
        let r = 0.5f32.sqrt();
        for i in 0..8 {
            assert!((ca[i] - (r * ax[i] - ay[i])).abs() < 1e-6);
        }
        for i in 0..6 {
            assert!((cb[i] - (r * bx[i] + by[i])).abs() < 1e-6);
        }
        let z = adapter(3, 2.0, &seq(9, 0.3), &seq(12, 0.7), 3, 4);
        let e = combine(
            &[("x", &x), ("z", &z)],
            &CombineOptions::new(Method::Linear, vec![1.0, 1.0]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("same r") && e.contains("x: 2, z: 3"), "{e}");
    }

    #[test]
    fn rslora_inputs_are_scaled_exactly_and_the_output_has_scale_one() {
        let mut x = adapter(4, 4.0, &seq(12, 0.3), &seq(16, 0.7), 3, 4);
        x.config.use_rslora = true;
        let mut y = adapter(2, 4.0, &seq(6, 1.1), &seq(8, 0.2), 3, 4);
        y.config.use_rslora = true;
        let (c, rep) = combine(
            &[("x", &x), ("y", &y)],
            &CombineOptions::new(Method::Cat, vec![1.0, 1.0]),
        )
        .unwrap();
        assert!(!c.config.use_rslora && rep.notes.iter().any(|n| n.contains("rsLoRA")));
        // x's scale is 4/√4 = 2, y's 4/√2.
        assert_eq!(x.scale_for("m").unwrap(), 2.0);
        assert!((y.scale_for("m").unwrap() - 4.0 / 2f64.sqrt()).abs() < 1e-12);
        let want: Vec<f32> = delta(&x)
            .iter()
            .zip(delta(&y))
            .map(|(a, b)| a + b)
            .collect();
        for (g, w) in delta(&c).iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
    }

    #[test]
    fn a_mix_of_rslora_and_plain_adapters_is_refused() {
        let mut x = adapter(4, 4.0, &seq(12, 0.3), &seq(16, 0.7), 3, 4);
        x.config.use_rslora = true;
        let y = adapter(2, 4.0, &seq(6, 1.1), &seq(8, 0.2), 3, 4);
        let e = combine(
            &[("x", &x), ("y", &y)],
            &CombineOptions::new(Method::Cat, vec![1.0, 1.0]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("use_rslora is true in x but false in y"), "{e}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let x = adapter(2, 2.0, &seq(6, 0.3), &seq(8, 0.7), 3, 4);
        let mut y = adapter(2, 2.0, &seq(6, 1.1), &seq(8, 0.2), 3, 4);
        let err = |y: &Adapter, o: CombineOptions| {
            combine(&[("x", &x), ("y", y)], &o).unwrap_err().to_string()
        };
        let lin = || CombineOptions::new(Method::Linear, vec![1.0, 1.0]);
        let e = err(&y, CombineOptions::new(Method::Linear, vec![1.0]));
        assert!(e.contains("1 weights for 2 adapters"), "{e}");
        let e = err(&y, CombineOptions::new(Method::Ties, vec![1.0, 1.0]));
        assert!(e.contains("--density"), "{e}");
        let mut o = lin();
        o.rank = Some(2);
        assert!(err(&y, o).contains("--rank applies"));
        let mut o = CombineOptions::new(Method::Svd, vec![1.0, 1.0]);
        o.rank = Some(4);
        assert!(err(&y, o).contains("min(3, 4) = 3"));
        y.config.use_dora = true;
        assert!(err(&y, lin()).contains("adapter y: use_dora"));
        y.config.use_dora = false;
        y.config.fan_in_fan_out = true;
        assert!(err(&y, lin()).contains("fan_in_fan_out differs between x (false) and y (true)"));
        y.config.fan_in_fan_out = false;
        y.config.target_modules = Some(TargetModules::Regex("m".into()));
        assert!(err(&y, lin()).contains("a list in x but a regex in y"));
    }

    #[test]
    fn one_adapter_is_combined_linearly_as_peft_does() {
        let x = adapter(2, 2.0, &seq(6, 0.3), &seq(8, 0.7), 3, 4);
        let (c, rep) =
            combine(&[("x", &x)], &CombineOptions::new(Method::Cat, vec![-2.0])).unwrap();
        assert_eq!(rep.method, "linear");
        for (g, w) in delta(&c).iter().zip(delta(&x)) {
            assert!((g + 2.0 * w).abs() < 1e-5);
        }
    }
}
