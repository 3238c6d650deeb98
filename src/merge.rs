//! Model-free merging: fold an adapter into a checkpoint of any architecture, tensor by tensor.
//!
//! For every adapted module, `<module>.weight ± ΔW` with ΔW from [`crate::ModuleAdapter::delta_weight`]
//! (linear `s·B·A`, transposed when `fan_in_fan_out`; embedding `s·(B·A)ᵀ`; conv
//! `s·einsum(or,rikl->oikl)`), `s` per module from rsLoRA and the patterns, computed in f32 and
//! rounded to the base's dtype as PEFT rounds it (unmerge and embeddings round ΔW first).
//! Only the modules the adapter's config targets are merged ([`Adapter::load`] keeps those).
//! DoRA adapters merge as `k ⊙ (W + ΔW)`, `k = m/‖W + ΔW‖` ([`crate::layers::dora`]); they
//! cannot be unmerged from a merged checkpoint, because the norm needs the original `W`
//! (refused with a one-line error). The adapter's `modules_to_save` copies (a classifier head,
//! say) replace the base tensors of the same name, as PEFT's `merge_and_unload` keeps the trained
//! copy; such a merge cannot be undone, so unmerging an adapter that has them is refused. Every
//! other tensor is copied byte for byte. The base is
//! memory-mapped and only one tensor is held at a time; sharded checkpoints keep their shard
//! layout and index. Outputs are written to a temporary file or folder and renamed into place,
//! so an interrupted merge leaves nothing under the output name, and the base is only read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapter::Adapter;
use crate::config::ModuleKind;
use crate::error::{Error, Result};
use crate::layers::{apply_delta, check_finite};
use crate::model_weights::{Checkpoint, INDEX_FILE, MODEL_FILE};
use crate::tensor_file::{self, Entry};

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
    if opts.direction == Direction::Unmerge && adapter.config.use_dora {
        return Err(Error::State(
            "a DoRA adapter (use_dora: true) cannot be unmerged: the merged weight \
             m·(W+ΔW)/‖W+ΔW‖ cannot be inverted without the original W (its row norms are lost); \
             keep the base checkpoint instead"
                .into(),
        ));
    }
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

    /// The base weight of `module`: the adapter's `base_layer.weight` copy when it has one (PEFT
    /// loads that copy over the model's weight), in the checkpoint's dtype; else `stored`.
    fn base(&self, module: &str, stored: Tensor) -> Result<Tensor> {
        match self.adapter.base_layers.get(module) {
            Some(copy) => Ok(copy.to_dtype(stored.dtype())?),
            None => Ok(stored),
        }
    }

    /// `base ± ΔW` rounded to the base dtype as PEFT rounds it (see `layers::apply_delta`),
    /// returned in f32; DoRA: `k ⊙ (base + ΔW)` (merge only).
    fn apply(&self, module: &str, base: &Tensor) -> Result<Tensor> {
        let m = &self.adapter.modules[module];
        let fan_in_fan_out = m
            .fan_in_fan_out_for(base.dims(), self.adapter.config.fan_in_fan_out)
            .ok_or_else(|| Error::ShapeMismatch {
                key: module.to_string(),
                got: base.dims().to_vec(),
                what: format!("the adapter's factors {:?} / {:?}", m.a.dims(), m.b.dims()),
            })?;
        let delta = m.delta_weight(self.adapter.scale_for(module)?, fan_in_fan_out)?;
        if let (Some(mag), Direction::Merge) = (&m.magnitude, self.direction) {
            let axis = m.dora_axis(fan_in_fan_out);
            let (out, _) = crate::layers::dora::merged_weight(base, &delta, mag, axis)?;
            check_finite(&out, module, "merging the adapter into the base weight")?;
            return Ok(out);
        }
        let round_delta_first =
            self.direction == Direction::Unmerge || m.kind == ModuleKind::Embedding;
        let out = apply_delta(
            base,
            &delta,
            self.direction.sign(),
            round_delta_first,
            module,
        )?;
        Ok(out.to_dtype(DType::F32)?)
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
    tensor_file::write_streaming(out, entries, &shard.metadata(), |e| {
        if let Some(t) = d.adapter.saved.get(&e.name) {
            return tensor_file::tensor_bytes(&t.to_dtype(e.dtype)?);
        }
        match d.module_of(&e.name) {
            Some(module) => {
                let merged = d.apply(
                    module,
                    &d.base(module, shard.tensor(&e.name, &Device::Cpu)?)?,
                )?;
                tensor_file::tensor_bytes(&merged.to_dtype(e.dtype)?)
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
    tensor_file::remove_stale_temps(parent, &leaf);
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
        let want = d.apply(module, &d.base(module, ckpt.tensor(&name, &Device::Cpu)?)?)?;
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
                magnitude_shape: m.magnitude.as_ref().map(|t| t.dims().to_vec()),
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
    /// |A| + |B| (+ |m| with DoRA).
    pub params: usize,
    /// Shape of DoRA's magnitude vector m, when the adapter uses DoRA.
    pub magnitude_shape: Option<Vec<usize>>,
}

/// The base tensors' names and shapes, for error hints.
pub fn base_shapes(base: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    Checkpoint::open(base)?.shapes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ModuleAdapter;
    use crate::config::LoraConfig;
    use half::bf16;

    /// Values k/64 (|k| ≤ 127): products of two and their sums over r = 2 are exact in f32, so
    /// ΔW has one exact value, and it needs more bits than bf16 keeps.
    fn dyadic(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 + seed * 11) % 255) as f32 / 64.0 - 127.0 / 64.0)
            .collect()
    }

    struct Case {
        dir: tempfile::TempDir,
        adapter: Adapter,
        base: BTreeMap<String, Vec<f32>>,
        delta: BTreeMap<String, Vec<f32>>,
    }

    /// A bf16 base with `lin.weight` [4, 6] and `emb.weight` [6, 4]; an adapter of r = 2,
    /// α = 16 (s = 8) on both, and its exact ΔW.
    fn case() -> Case {
        let dev = Device::Cpu;
        let (r, s) = (2, 8.0f32);
        let mut base = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        let mut modules = BTreeMap::new();
        let mut delta = BTreeMap::new();
        for (name, kind, rows, cols) in [
            ("lin", ModuleKind::Linear, 4, 6),
            ("emb", ModuleKind::Embedding, 6, 4),
        ] {
            let w: Vec<f32> = dyadic(rows * cols, 3)
                .iter()
                .map(|x| bf16::from_f32(x * 1.37).to_f32())
                .collect();
            let t = Tensor::from_vec(w.clone(), (rows, cols), &dev).unwrap();
            tensors.insert(format!("{name}.weight"), t.to_dtype(DType::BF16).unwrap());
            base.insert(name.to_string(), w);
            // ΔW [rows, cols] = s·B·A (linear: B [rows, r], A [r, cols]);
            // embedding ΔE = s·(B·A)ᵀ with B [cols, r], A [r, rows].
            let (out, inn) = if kind == ModuleKind::Linear {
                (rows, cols)
            } else {
                (cols, rows)
            };
            let (a, b) = (dyadic(r * inn, 1), dyadic(out * r, 2));
            let mut d = vec![0f32; rows * cols];
            for o in 0..out {
                for i in 0..inn {
                    let v = s * (0..r).map(|k| b[o * r + k] * a[k * inn + i]).sum::<f32>();
                    let at = if kind == ModuleKind::Linear {
                        o * cols + i
                    } else {
                        i * cols + o
                    };
                    d[at] = v;
                }
            }
            delta.insert(name.to_string(), d);
            let m = ModuleAdapter {
                kind,
                a: Tensor::from_vec(a, (r, inn), &dev).unwrap(),
                b: Tensor::from_vec(b, (out, r), &dev).unwrap(),
                magnitude: None,
            };
            modules.insert(name.to_string(), m);
        }
        let dir = tempfile::tempdir().unwrap();
        tensor_file::save(
            &dir.path().join("base.safetensors"),
            &tensors,
            &tensor_file::pt_metadata(),
        )
        .unwrap();
        let adapter = Adapter {
            config: LoraConfig::new(r, 16.0, &["lin", "emb"]),
            modules,
            ..Default::default()
        };
        Case {
            dir,
            adapter,
            base,
            delta,
        }
    }

    fn run(c: &Case, direction: Direction) -> BTreeMap<String, Vec<f32>> {
        let out = c.dir.path().join(format!("{direction:?}.safetensors"));
        let opts = MergeOptions {
            direction,
            verify: false,
            force: true,
        };
        merge_checkpoint(
            &c.dir.path().join("base.safetensors"),
            &c.adapter,
            &out,
            opts,
        )
        .unwrap();
        let f = tensor_file::SafeFile::open(&out).unwrap();
        ["lin", "emb"]
            .iter()
            .map(|m| {
                let t = f.tensor(&format!("{m}.weight"), &Device::Cpu).unwrap();
                assert_eq!(t.dtype(), DType::BF16);
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (m.to_string(), v.to_vec1::<f32>().unwrap())
            })
            .collect()
    }

    /// Issue 13 item 10, against an exact reference written with `half`: PEFT's Linear merge
    /// rounds `W + ΔW` once (`weight.data += delta_weight`); its unmerge and the Embedding merge
    /// round ΔW to bf16 first (`delta_weight.to(orig_dtype)`), then round the sum.
    #[test]
    fn bf16_rounding_is_peft_bit_for_bit() {
        let c = case();
        let once = |w: f32, d: f32| bf16::from_f32(w + d).to_f32();
        let twice = |w: f32, d: f32| bf16::from_f32(w + bf16::from_f32(d).to_f32()).to_f32();
        let want = |m: &str, sign: f32, f: &dyn Fn(f32, f32) -> f32| -> Vec<f32> {
            c.base[m]
                .iter()
                .zip(&c.delta[m])
                .map(|(w, d)| f(*w, sign * d))
                .collect()
        };
        let merged = run(&c, Direction::Merge);
        assert_eq!(merged["lin"], want("lin", 1.0, &once));
        assert_eq!(merged["emb"], want("emb", 1.0, &twice));
        let unmerged = run(&c, Direction::Unmerge);
        assert_eq!(unmerged["lin"], want("lin", -1.0, &twice));
        assert_eq!(unmerged["emb"], want("emb", -1.0, &twice));
        // The two roundings differ on this input, so each assertion above can fail.
        for (m, sign) in [("lin", -1.0), ("emb", 1.0)] {
            assert_ne!(want(m, sign, &once), want(m, sign, &twice), "{m}");
        }
    }

    /// Issue 13 item 3: PEFT forces `fan_in_fan_out` to False on `nn.Linear`; a config saying
    /// true merges a `[out, in]` weight exactly as one saying false.
    #[test]
    fn fan_in_fan_out_follows_the_layer_not_the_config() {
        let mut c = case();
        let plain = run(&c, Direction::Merge);
        c.adapter.config.fan_in_fan_out = true;
        assert_eq!(run(&c, Direction::Merge), plain);
        // A `[in, out]` (GPT-2 Conv1D) weight of the same module takes the transposed ΔW.
        let m = &c.adapter.modules["lin"];
        assert_eq!(m.fan_in_fan_out_for(&[4, 6], false), Some(false));
        assert_eq!(m.fan_in_fan_out_for(&[6, 4], false), Some(true));
        assert_eq!(m.fan_in_fan_out_for(&[5, 4], true), None);
    }

    /// Issue 13 item 4: PEFT loads `<emb>.base_layer.weight` over the base weight, so the merge
    /// starts from the file's copy, not the checkpoint's weight.
    #[test]
    fn an_embedding_copy_in_the_file_replaces_the_base_weight() {
        let mut c = case();
        let copy: Vec<f32> = c.base["emb"].iter().map(|w| -w).collect();
        let t = Tensor::from_vec(copy.clone(), (6, 4), &Device::Cpu).unwrap();
        c.adapter.base_layers.insert("emb".into(), t);
        let merged = run(&c, Direction::Merge);
        let want: Vec<f32> = copy
            .iter()
            .zip(&c.delta["emb"])
            .map(|(w, d)| bf16::from_f32(w + bf16::from_f32(*d).to_f32()).to_f32())
            .collect();
        assert_eq!(merged["emb"], want);
        // A copy of another shape is refused by name.
        let bad = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        c.adapter.base_layers.insert("emb".into(), bad);
        let out = c.dir.path().join("bad.safetensors");
        let opts = MergeOptions {
            direction: Direction::Merge,
            verify: false,
            force: true,
        };
        let e = merge_checkpoint(
            &c.dir.path().join("base.safetensors"),
            &c.adapter,
            &out,
            opts,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("emb.base_layer.weight"), "{e}");
        assert!(!out.exists());
    }
}
