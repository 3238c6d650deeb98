//! Model-free merging: fold an adapter into a checkpoint of any architecture, tensor by tensor.
//!
//! For every adapted module, `<module>.weight ± ΔW` with ΔW from [`crate::ModuleAdapter::delta_weight`]
//! (linear `s·B·A`, transposed when `fan_in_fan_out`; embedding `s·(B·A)ᵀ`; conv
//! `s·einsum(or,rikl->oikl)`), `s` per module from rsLoRA and the patterns, computed in f32 and
//! written in the base's dtype. The adapter's `modules_to_save` copies (a classifier head, say)
//! replace the base tensors of the same name, as PEFT's `merge_and_unload` keeps the trained
//! copy; such a merge cannot be undone, so unmerging an adapter that has them is refused. Every
//! other tensor is copied byte for byte. The base is
//! memory-mapped and only one tensor is held at a time; sharded checkpoints keep their shard
//! layout and index. Outputs are written to a temporary file or folder and renamed into place,
//! so an interrupted merge leaves nothing under the output name, and the base is only read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapter::Adapter;
use crate::checkpoint::{Checkpoint, INDEX_FILE, MODEL_FILE};
use crate::error::{Error, Result};
use crate::layers::check_finite;
use crate::st::{self, Entry};

/// Whether to add or subtract the adapter's update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `W + ΔW`.
    Merge,
    /// `W − ΔW` (the inverse, for a checkpoint merged earlier).
    Unmerge,
}

impl Direction {
    fn sign(self) -> f64 {
        match self {
            Direction::Merge => 1.0,
            Direction::Unmerge => -1.0,
        }
    }
}

/// Files copied beside the weights when merging a model directory.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// What a merge did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    /// Modules whose weight changed.
    pub modules_merged: usize,
    /// Tensors written in total.
    pub tensors_written: usize,
    /// Weight files written.
    pub files: Vec<PathBuf>,
    /// With verification: max |written − (base ± ΔW)| over the adapted weights, in f32.
    pub verify_max_abs_diff: Option<f32>,
}

/// Options for [`merge_checkpoint`].
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    /// Add or subtract.
    pub direction: Direction,
    /// Re-read what was written and report the largest deviation.
    pub verify: bool,
    /// Replace an existing non-empty output.
    pub force: bool,
}

/// Merges `adapter` into the checkpoint at `base` (a `.safetensors` file or a model folder)
/// and writes the result to `out` (a file for a file base, a folder for a folder base).
pub fn merge_checkpoint(
    base: &Path,
    adapter: &Adapter,
    out: &Path,
    opts: MergeOptions,
) -> Result<MergeReport> {
    let ckpt = Checkpoint::open(base)?;
    let weights_file = if base.is_file() {
        base.to_path_buf()
    } else {
        ckpt.shards()[0].path().to_path_buf()
    };
    adapter.check_fits(&ckpt.shapes()?, &weights_file)?;
    if opts.direction == Direction::Unmerge && !adapter.saved.is_empty() {
        return Err(Error::UnsupportedFeature {
            feature: "modules_to_save".into(),
            detail: "unmerging an adapter with modules_to_save: the merge replaced those \
                     modules, so their base values are gone"
                .into(),
        });
    }
    check_output(base, out, opts.force)?;
    let deltas = Deltas {
        adapter,
        direction: opts.direction,
    };
    let mut report = if base.is_file() {
        let n = write_shard(&ckpt, 0, out, &deltas)?;
        MergeReport {
            modules_merged: adapter.modules.len(),
            tensors_written: n,
            files: vec![out.into()],
            verify_max_abs_diff: None,
        }
    } else {
        write_dir(&ckpt, out, &deltas, opts.force)?
    };
    if opts.verify {
        report.verify_max_abs_diff = Some(verify(&ckpt, adapter, out, opts.direction)?);
    }
    Ok(report)
}

struct Deltas<'a> {
    adapter: &'a Adapter,
    direction: Direction,
}

impl Deltas<'_> {
    /// The module a weight name belongs to, if adapted.
    fn module_of<'n>(&self, name: &'n str) -> Option<&'n str> {
        name.strip_suffix(".weight")
            .filter(|m| self.adapter.modules.contains_key(*m))
    }

    /// `base ± ΔW` in f32.
    fn apply(&self, module: &str, base: &Tensor) -> Result<Tensor> {
        let m = &self.adapter.modules[module];
        let delta = m.delta_weight(
            self.adapter.scale_for(module)?,
            self.adapter.config.fan_in_fan_out,
        )?;
        let out = (base.to_dtype(DType::F32)? + (delta * self.direction.sign())?)?;
        check_finite(&out, module, "merging the adapter into the base weight")?;
        Ok(out)
    }
}

fn check_output(base: &Path, out: &Path, force: bool) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(base, out)
        || (base.is_dir()
            && out.parent().is_some_and(|p| same(p, base))
            && out.file_name() == Some(MODEL_FILE.as_ref()))
    {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: "is the base model: refusing to overwrite an input".into(),
        });
    }
    if base.is_dir() && out.is_file() {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: "is a file, but the base is a model folder: give a folder".into(),
        });
    }
    if out.is_dir() && base.is_file() {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: "is a folder, but the base is a single file: give a file path".into(),
        });
    }
    let non_empty = out.is_dir()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
    if !force && (out.is_file() || non_empty) {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: "already exists (use --force to replace it)".into(),
        });
    }
    Ok(())
}

/// Writes shard `i` of `ckpt` to `out`, merging adapted weights. Returns the tensor count.
fn write_shard(ckpt: &Checkpoint, i: usize, out: &Path, d: &Deltas) -> Result<usize> {
    let shard = &ckpt.shards()[i];
    let entries: Vec<Entry> = shard
        .names()
        .into_iter()
        .map(|name| {
            let (dtype, shape) = shard.info(&name)?;
            if (d.module_of(&name).is_some() || d.adapter.saved.contains_key(&name))
                && !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
            {
                return Err(Error::Module {
                    module: name,
                    reason: format!("weight dtype {dtype:?} cannot take a LoRA update"),
                });
            }
            Ok(Entry { name, dtype, shape })
        })
        .collect::<Result<_>>()?;
    let n = entries.len();
    st::write_streaming(out, entries, &shard.metadata(), |e| {
        if let Some(t) = d.adapter.saved.get(&e.name) {
            return st::tensor_bytes(&t.to_dtype(e.dtype)?);
        }
        match d.module_of(&e.name) {
            Some(module) => {
                let merged = d.apply(module, &shard.tensor(&e.name, &Device::Cpu)?)?;
                st::tensor_bytes(&merged.to_dtype(e.dtype)?)
            }
            None => Ok(shard.bytes(&e.name)?.to_vec()),
        }
    })?;
    Ok(n)
}

/// Writes a whole model folder into a temporary sibling folder, then renames it to `out`.
fn write_dir(ckpt: &Checkpoint, out: &Path, d: &Deltas, force: bool) -> Result<MergeReport> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let leaf = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "merged".into());
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    st::remove_stale_temps(parent, &leaf);
    let tmp = parent.join(format!(".{leaf}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let guard = TempDir(tmp.clone());
    let mut tensors = 0;
    let mut files = vec![];
    for (i, shard) in ckpt.shards().iter().enumerate() {
        let name = shard
            .path()
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| MODEL_FILE.into());
        tensors += write_shard(ckpt, i, &tmp.join(&name), d)?;
        files.push(out.join(name));
    }
    let mut side: Vec<&str> = SIDE_FILES.to_vec();
    if ckpt.index.is_some() {
        side.push(INDEX_FILE);
    }
    for f in side {
        let src = ckpt.dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    if out.exists() {
        if !force
            && std::fs::read_dir(out)
                .map(|mut r| r.next().is_some())
                .unwrap_or(true)
        {
            return Err(Error::BadOutput {
                path: out.into(),
                reason: "already exists (use --force to replace it)".into(),
            });
        }
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    std::mem::forget(guard);
    Ok(MergeReport {
        modules_merged: d.adapter.modules.len(),
        tensors_written: tensors,
        files,
        verify_max_abs_diff: None,
    })
}

/// Removes a temporary folder unless forgotten.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Re-reads `out` and returns max |written − (base ± ΔW)| over adapted weights (f32).
fn verify(ckpt: &Checkpoint, adapter: &Adapter, out: &Path, direction: Direction) -> Result<f32> {
    let written = Checkpoint::open(out)?;
    let d = Deltas { adapter, direction };
    let mut worst = 0f32;
    for module in adapter.modules.keys() {
        let name = format!("{module}.weight");
        let want = d.apply(module, &ckpt.tensor(&name, &Device::Cpu)?)?;
        let got = written.tensor(&name, &Device::Cpu)?.to_dtype(DType::F32)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(diff);
    }
    for (name, want) in &adapter.saved {
        let got = written.tensor(name, &Device::Cpu)?.to_dtype(DType::F32)?;
        let diff = (got - want.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(diff);
    }
    Ok(worst)
}

/// Per-module summary used by `lora inspect`: `(module, kind, A shape, B shape, rank, alpha, scale)`.
pub fn summary(adapter: &Adapter) -> Result<Vec<ModuleSummary>> {
    adapter
        .modules
        .iter()
        .map(|(name, m)| {
            Ok(ModuleSummary {
                module: name.clone(),
                kind: format!("{:?}", m.kind),
                a_shape: m.a.dims().to_vec(),
                b_shape: m.b.dims().to_vec(),
                rank: m.rank(),
                alpha: adapter.config.alpha_for(name),
                scale: adapter.scale_for(name)?,
                params: m.num_params(),
            })
        })
        .collect()
}

/// One adapted module, for display.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleSummary {
    /// Module name.
    pub module: String,
    /// Linear, Embedding or Conv2d.
    pub kind: String,
    /// Shape of A.
    pub a_shape: Vec<usize>,
    /// Shape of B.
    pub b_shape: Vec<usize>,
    /// Rank from the shapes.
    pub rank: usize,
    /// Alpha after `alpha_pattern`.
    pub alpha: f64,
    /// The scale s.
    pub scale: f64,
    /// |A| + |B|.
    pub params: usize,
}

/// The base tensors' names and shapes, for error hints.
pub fn base_shapes(base: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    Checkpoint::open(base)?.shapes()
}
