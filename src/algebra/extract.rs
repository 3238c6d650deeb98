//! `extract`: a LoRA adapter from a full fine-tune, by truncated SVD of each weight's change.
//!
//! For every 2-D `<module>.weight` that differs between the base and the tuned checkpoint,
//! `D = W_tuned − W_base` (`[out, in]`, f32, decomposed in f64) has the SVD `D = U·Σ·Vᵀ`; keeping the `k`
//! largest singular values gives the best rank-`k` approximation (Eckart–Young) as a LoRA
//!
//! `B = U_k·√Σ_k` `[out, k]`, `A = √Σ_k·V_kᵀ` `[k, in]`, `lora_alpha = k` (scale 1),
//!
//! so `B·A = U_k·Σ_k·V_kᵀ`, and merging the adapter into the base gives `W_base + U_k·Σ_k·V_kᵀ`,
//! which is `W_tuned` at full rank `k = min(out, in)`. Each module reports its kept energy
//! `Σ_{i<k} σᵢ² / Σ σᵢ²` (the fraction of `‖D‖_F²` kept).
//!
//! The rank is a number (capped at `min(out, in)`), or `auto:f`: per module the smallest `k`
//! whose kept energy is at least `f`. Modules whose rank differs from the config's `r` (the most
//! common rank) get `rank_pattern` and `alpha_pattern` entries, as PEFT configs express
//! per-module ranks.
//!
//! Embeddings (the last name component is one of [`EMBEDDING_NAMES`]) are written as PEFT's
//! `lora_embedding_A: [k, vocab]`, `lora_embedding_B: [dim, k]` from the SVD of `Dᵀ`, since PEFT
//! applies `(B·A)ᵀ` to an embedding's `[vocab, dim]` table.
//!
//! Tensors a LoRA cannot express are left out and listed in the report: changed tensors that
//! are not 2-D weights (norms, biases, conv kernels), tensors in only one checkpoint or with
//! different shapes, and changed 2-D weights outside `target_modules`. With `strict` any of
//! them is an error instead. (PEFT could carry norms in `modules_to_save` and biases with
//! `bias: "all"`, but this library's loader does not read either yet, so they are not
//! written.) The SVDs are faer's, one module per rayon task: a full SVD of every changed weight,
//! O(out·in·min(out, in)) each, holding about five `out × in` f64 matrices per task.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::adapter::{Adapter, ModuleAdapter};
use crate::config::{LoraConfig, ModuleKind, TargetModules};
use crate::error::{Error, Result};
use crate::model_weights::Checkpoint;

/// Module names (the last dotted component) treated as `nn.Embedding`, as transformers names
/// them; every other 2-D weight is a linear layer's.
pub const EMBEDDING_NAMES: &[&str] = &[
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "shared",
];

/// The rank to keep per module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankSpec {
    /// This rank, capped at `min(out, in)`.
    Fixed(usize),
    /// The smallest rank keeping at least this fraction of `Σ σ²` (in (0, 1]).
    Energy(f64),
}

impl FromStr for RankSpec {
    type Err = Error;
    /// `"16"` or `"auto:0.9"`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Algebra {
            op: "extract",
            reason: format!("--rank `{s}`: {why} (a rank like 16, or auto:0.9)"),
        };
        if let Some(f) = s.strip_prefix("auto:") {
            let f: f64 = f.parse().map_err(|_| bad("not a number after auto:"))?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(bad("the energy fraction must be in (0, 1]"));
            }
            return Ok(RankSpec::Energy(f));
        }
        match s.parse::<usize>() {
            Ok(0) => Err(bad("the rank must be at least 1")),
            Ok(n) => Ok(RankSpec::Fixed(n)),
            Err(_) => Err(bad("not a rank")),
        }
    }
}

/// The options of [`extract`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The rank per module.
    pub rank: RankSpec,
    /// Only modules matching these names (PEFT's list rule: exact, or a dot-aligned suffix).
    pub target_modules: Option<Vec<String>>,
    /// Refuse instead of leaving out changed tensors a LoRA cannot express.
    pub strict: bool,
}

/// One extracted module.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractedModule {
    /// The module name (the weight's name without `.weight`).
    pub module: String,
    /// `"linear"` or `"embedding"`.
    pub kind: String,
    /// The weight's shape.
    pub shape: Vec<usize>,
    /// The kept rank.
    pub rank: usize,
    /// `min(out, in)`: the rank that reproduces the change exactly.
    pub full_rank: usize,
    /// `Σ_kept σ² / Σ σ²`.
    pub kept_energy: f64,
    /// `‖D‖_F`, the size of the change.
    pub change_norm: f64,
}

/// A changed or unmatched tensor that the adapter does not carry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeftOut {
    /// The tensor name.
    pub tensor: String,
    /// Why it is not in the adapter.
    pub reason: String,
}

/// What [`extract`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractReport {
    /// The modules written, sorted by name.
    pub modules: Vec<ExtractedModule>,
    /// Tensors left out, with reasons.
    pub left_out: Vec<LeftOut>,
    /// How many tensors are identical in both checkpoints.
    pub unchanged: usize,
    /// The config's `r` (= `lora_alpha`).
    pub rank: usize,
    /// The adapter's parameter count.
    pub params: usize,
    /// The parameter count of the changed weights it replaces.
    pub replaced_params: usize,
}

fn refuse(reason: String) -> Error {
    Error::Algebra {
        op: "extract",
        reason,
    }
}

/// Whether `module` matches a PEFT target list (exact, or a dot-aligned suffix).
fn list_match(list: &[String], module: &str) -> bool {
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::List(list.to_vec())),
        ..Default::default()
    };
    cfg.is_target(module, ModuleKind::Linear).unwrap_or(false)
}

fn kind_of(module: &str) -> ModuleKind {
    let last = module.rsplit('.').next().unwrap_or(module);
    if EMBEDDING_NAMES.contains(&last) {
        ModuleKind::Embedding
    } else {
        ModuleKind::Linear
    }
}

/// Extracts an adapter from `tuned − base` (see the module doc).
pub fn extract(
    base: &Checkpoint,
    tuned: &Checkpoint,
    opts: &ExtractOptions,
) -> Result<(Adapter, ExtractReport)> {
    if let Some(t) = &opts.target_modules {
        if t.is_empty() {
            return Err(refuse("--target-modules is empty".into()));
        }
    }
    let names: BTreeSet<String> = base.names().into_iter().chain(tuned.names()).collect();
    let mut left_out = Vec::new();
    let mut unchanged = 0;
    let mut todo = Vec::new();
    let mut all_2d = Vec::new();
    for name in &names {
        let (b, t) = (base.contains(name), tuned.contains(name));
        if !b || !t {
            left_out.push(LeftOut {
                tensor: name.clone(),
                reason: format!(
                    "only in the {} checkpoint",
                    if b { "base" } else { "tuned" }
                ),
            });
            continue;
        }
        let (bd, bs) = base.info(name)?;
        let (td, ts) = tuned.info(name)?;
        if bs != ts {
            left_out.push(LeftOut {
                tensor: name.clone(),
                reason: format!("shape {bs:?} in the base but {ts:?} in the tuned checkpoint"),
            });
            continue;
        }
        let module = name.strip_suffix(".weight").filter(|_| bs.len() == 2);
        if let Some(m) = module {
            all_2d.push(m.to_string());
        }
        if bd == td && base.shard_of(name)?.bytes(name)? == tuned.shard_of(name)?.bytes(name)? {
            unchanged += 1;
            continue;
        }
        let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64);
        if !float(bd) || !float(td) {
            left_out.push(LeftOut {
                tensor: name.clone(),
                reason: format!("changed {bd:?}/{td:?} tensor (not floating point)"),
            });
            continue;
        }
        match module {
            None => left_out.push(LeftOut {
                tensor: name.clone(),
                reason: format!(
                    "changed {}-D tensor: a LoRA adapts 2-D weights only",
                    bs.len()
                ),
            }),
            Some(m)
                if opts
                    .target_modules
                    .as_ref()
                    .is_some_and(|t| !list_match(t, m)) =>
            {
                left_out.push(LeftOut {
                    tensor: name.clone(),
                    reason: "changed, but not in --target-modules".into(),
                })
            }
            Some(m) => todo.push(m.to_string()),
        }
    }
    if opts.strict {
        if let Some(l) = left_out.first() {
            return Err(refuse(format!(
                "`{}`: {} ({} tensor(s) a LoRA cannot carry; without --strict they are left out)",
                l.tensor,
                l.reason,
                left_out.len()
            )));
        }
    }
    let results: Vec<Option<(ModuleAdapter, ExtractedModule)>> = todo
        .par_iter()
        .map(|m| extract_module(base, tuned, m, opts.rank))
        .collect::<Result<_>>()?;
    let mut modules = BTreeMap::new();
    let mut report_modules = Vec::new();
    for (name, r) in todo.iter().zip(results) {
        match r {
            Some((m, e)) => {
                modules.insert(name.clone(), m);
                report_modules.push(e);
            }
            // Differs only in bytes (e.g. -0.0 vs 0.0, or a dtype change without a value change).
            None => unchanged += 1,
        }
    }
    if modules.is_empty() {
        return Err(refuse(format!(
            "no 2-D weight differs between the checkpoints{}",
            if opts.target_modules.is_some() {
                " within --target-modules"
            } else {
                ""
            }
        )));
    }
    let config = config_for(&modules, &all_2d)?;
    let adapter = Adapter {
        config,
        modules,
        ..Default::default()
    };
    let replaced_params = report_modules
        .iter()
        .map(|m| m.shape.iter().product::<usize>())
        .sum();
    let report = ExtractReport {
        modules: report_modules,
        left_out,
        unchanged,
        rank: adapter.config.r,
        params: adapter.num_params(),
        replaced_params,
    };
    Ok((adapter, report))
}

/// The smallest `k ≥ 1` with `Σ_{i<k} σᵢ² ≥ f·Σ σᵢ²` (all of them when round-off keeps the sum
/// just short of `f`).
pub fn rank_for_energy(s: &[f64], f: f64) -> usize {
    let total: f64 = s.iter().map(|x| x * x).sum();
    let mut cum = 0.0;
    for (i, x) in s.iter().enumerate() {
        cum += x * x;
        if cum >= f * total {
            return i + 1;
        }
    }
    s.len().max(1)
}

fn extract_module(
    base: &Checkpoint,
    tuned: &Checkpoint,
    module: &str,
    rank: RankSpec,
) -> Result<Option<(ModuleAdapter, ExtractedModule)>> {
    let name = format!("{module}.weight");
    let load = |c: &Checkpoint| -> Result<Tensor> {
        Ok(c.tensor(&name, &Device::Cpu)?.to_dtype(DType::F32)?)
    };
    // In f32: exact for f16/bf16 checkpoints, within half an ulp of D for f32 ones.
    let d = (load(tuned)? - load(base)?)?;
    crate::layers::check_finite(&d, &name, "tuned − base")?;
    let kind = kind_of(module);
    let shape = d.dims().to_vec();
    // The B·A form: [out, in] for a linear, Dᵀ = [dim, vocab] for an embedding.
    let d = if kind == ModuleKind::Embedding {
        d.t()?.contiguous()?
    } else {
        d
    };
    let (rows, cols) = d.dims2()?;
    let v: Vec<f32> = d.flatten_all()?.to_vec1()?;
    drop(d);
    if v.iter().all(|x| *x == 0.0) {
        return Ok(None);
    }
    let m = super::mat_from(&v, rows, cols);
    drop(v);
    let svd = super::thin_svd(m.as_ref(), &name)?;
    drop(m);
    let full = svd.s.len();
    let k = match rank {
        RankSpec::Fixed(n) => n.min(full),
        RankSpec::Energy(f) => rank_for_energy(&svd.s, f),
    };
    let total: f64 = svd.s.iter().map(|x| x * x).sum();
    let kept: f64 = svd.s[..k].iter().map(|x| x * x).sum();
    let mut b = vec![0f32; rows * k];
    let mut a = vec![0f32; k * cols];
    for c in 0..k {
        let root = svd.s[c].sqrt();
        for i in 0..rows {
            b[i * k + c] = (svd.u[(i, c)] * root) as f32;
        }
        for j in 0..cols {
            a[c * cols + j] = (root * svd.v[(j, c)]) as f32;
        }
    }
    let m = ModuleAdapter {
        kind,
        a: Tensor::from_vec(a, (k, cols), &Device::Cpu)?,
        b: Tensor::from_vec(b, (rows, k), &Device::Cpu)?,
        magnitude: None,
    };
    let e = ExtractedModule {
        module: module.to_string(),
        kind: match kind {
            ModuleKind::Embedding => "embedding",
            _ => "linear",
        }
        .into(),
        shape,
        rank: k,
        full_rank: full,
        kept_energy: kept / total,
        change_norm: total.sqrt(),
    };
    Ok(Some((m, e)))
}

/// `r` = `lora_alpha` = the most common rank (the larger on a tie), patterns for the rest;
/// `target_modules` the modules' last name components when those name exactly the extracted
/// modules among all 2-D weights (`all_2d`), else the full names.
fn config_for(modules: &BTreeMap<String, ModuleAdapter>, all_2d: &[String]) -> Result<LoraConfig> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for m in modules.values() {
        *counts.entry(m.rank()).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by_key(|(r, n)| (**n, **r))
        .map(|(r, _)| *r)
        .unwrap_or(1);
    let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
    let mut suffixes: Vec<String> = modules.keys().map(|m| last(m)).collect();
    suffixes.sort();
    suffixes.dedup();
    let compact = all_2d
        .iter()
        .filter(|m| suffixes.contains(&last(m)))
        .all(|m| modules.contains_key(m));
    let targets = if compact {
        suffixes
    } else {
        modules.keys().cloned().collect()
    };
    let mut cfg = LoraConfig::new(r, r as f64, &[]);
    cfg.target_modules = Some(TargetModules::List(targets));
    for (name, m) in modules {
        if m.rank() != r {
            let key = super::exact_pattern_key(name);
            cfg.rank_pattern.insert(key.clone(), m.rank());
            cfg.alpha_pattern.insert(key, m.rank() as f64);
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_spec_parses_numbers_and_energy_fractions() {
        assert_eq!("16".parse::<RankSpec>().unwrap(), RankSpec::Fixed(16));
        assert_eq!(
            "auto:0.9".parse::<RankSpec>().unwrap(),
            RankSpec::Energy(0.9)
        );
        for bad in ["0", "auto:0", "auto:1.5", "auto:x", "x", "-3"] {
            let e = bad.parse::<RankSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("--rank `{bad}`")), "{e}");
        }
    }

    #[test]
    fn energy_rank_is_the_smallest_keeping_the_fraction() {
        // σ² = 50, 30, 10, 6, 4 of 100: cumulative 0.5, 0.8, 0.9, 0.96, 1.
        let s: Vec<f64> = [50.0f64, 30.0, 10.0, 6.0, 4.0]
            .iter()
            .map(|x| x.sqrt())
            .collect();
        assert_eq!(rank_for_energy(&s, 0.49), 1);
        assert_eq!(rank_for_energy(&s, 0.51), 2);
        assert_eq!(rank_for_energy(&s, 0.85), 3);
        assert_eq!(rank_for_energy(&s, 0.95), 4);
        assert_eq!(rank_for_energy(&s, 0.97), 5);
        assert_eq!(rank_for_energy(&s, 1.0), 5);
    }
}
