//! An adapter on disk: `adapter_config.json` + `adapter_model.safetensors`, PEFT's layout.
//!
//! [`Adapter::load`] validates everything it can without the base model: the config, every key
//! (PEFT's grammar, with or without the `base_model.model.` prefix), that each module has both
//! factors with agreeing ranks, no empty tensors (the usual symptom of an unsharded ZeRO-3/FSDP
//! export) and no NaN or infinity. The per-module rank is read from the tensor shapes.
//! [`Adapter::save`] writes what PEFT writes: sorted keys, f32 tensors, `{"format": "pt"}`
//! metadata, and a config with PEFT's full field set; each file atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::{LoraConfig, ModuleKind, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::keys::{self, Factor};
use crate::tensor_file::{self, SafeFile};

/// The weights file name PEFT writes.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT version whose `adapter_config.json` field set [`Adapter::save`] writes.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// The two factors of one adapted module.
#[derive(Debug, Clone)]
pub struct ModuleAdapter {
    /// Linear, embedding or conv, from the key names and A's rank.
    pub kind: ModuleKind,
    /// `lora_A` (`[r, in]`, `[r, vocab]` or `[r, in, kh, kw]`).
    pub a: Tensor,
    /// `lora_B` (`[out, r]`, `[dim, r]` or `[out, r, 1, 1]`).
    pub b: Tensor,
    /// DoRA's `lora_magnitude_vector` m (`[out]`, `[dim]` or `[1, out, 1, 1]`), present exactly
    /// when the config has `use_dora: true`.
    pub magnitude: Option<Tensor>,
}

impl ModuleAdapter {
    /// The rank, from A's shape.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// Trainable parameter count (|A| + |B| (+ |m|)).
    pub fn num_params(&self) -> usize {
        self.a.elem_count()
            + self.b.elem_count()
            + self.magnitude.as_ref().map_or(0, Tensor::elem_count)
    }

    /// The axis of the base weight that DoRA's magnitude runs along (see
    /// [`crate::layers::dora`]): rows of a linear or conv weight, columns of an embedding table
    /// or of a `fan_in_fan_out` weight `[in, out]`.
    pub fn dora_axis(&self, fan_in_fan_out: bool) -> crate::layers::dora::NormAxis {
        use crate::layers::dora::NormAxis;
        match self.kind {
            ModuleKind::Linear if fan_in_fan_out => NormAxis::Last,
            ModuleKind::Embedding => NormAxis::Last,
            _ => NormAxis::First,
        }
    }

    /// The merged weight in f32: `base + ΔW`, or with DoRA `k ⊙ (base + ΔW)`,
    /// `k = m/‖base + ΔW‖` ([`crate::layers::dora::merged_weight`]).
    pub fn merged_weight(&self, base: &Tensor, scale: f64, fan_in_fan_out: bool) -> Result<Tensor> {
        let delta = self.delta_weight(scale, fan_in_fan_out)?;
        match &self.magnitude {
            None => Ok((base.to_dtype(DType::F32)? + delta)?),
            Some(m) => Ok(crate::layers::dora::merged_weight(
                base,
                &delta,
                m,
                self.dora_axis(fan_in_fan_out),
            )?
            .0),
        }
    }

    /// The weight update in the base weight's layout, f32: linear `s·B·A` `[out, in]`
    /// (transposed to `[in, out]` when `fan_in_fan_out`), embedding `s·(B·A)ᵀ` `[vocab, dim]`,
    /// conv `s·einsum(or,rikl->oikl)` `[out, in, kh, kw]`.
    pub fn delta_weight(&self, scale: f64, fan_in_fan_out: bool) -> Result<Tensor> {
        let a = self.a.to_dtype(DType::F32)?;
        let b = self.b.to_dtype(DType::F32)?;
        let d = match self.kind {
            ModuleKind::Linear => {
                let d = b.matmul(&a)?;
                if fan_in_fan_out {
                    d.t()?.contiguous()?
                } else {
                    d
                }
            }
            ModuleKind::Embedding => b.matmul(&a)?.t()?.contiguous()?,
            ModuleKind::Conv2d => {
                let (r, i, kh, kw) = a.dims4()?;
                let o = b.dim(0)?;
                b.reshape((o, r))?
                    .matmul(&a.reshape((r, i * kh * kw))?)?
                    .reshape((o, i, kh, kw))?
            }
        };
        Ok((d * scale)?)
    }

    /// PEFT's keys for this module's factors, `[A, B]`.
    pub fn keys(&self, module: &str) -> [String; 2] {
        let (fa, fb) = match self.kind {
            ModuleKind::Embedding => (Factor::EmbeddingA, Factor::EmbeddingB),
            _ => (Factor::A, Factor::B),
        };
        [keys::format(module, fa), keys::format(module, fb)]
    }

    /// Whether the base weight of shape `base` is stored `[in, out]`, decided per layer as PEFT
    /// does (`tuners/lora/layer.py` `dispatch_default`: `fan_in_fan_out` is forced to False for
    /// `nn.Linear`, `[out, in]`, and to True for GPT-2's `Conv1D`, `[in, out]`). Without the
    /// model the shape tells the two apart; only a square weight falls back to the config's
    /// `fan_in_fan_out`. `None` when neither orientation fits. Embedding and conv: `false`.
    pub fn fan_in_fan_out_for(&self, base: &[usize], config_flag: bool) -> Option<bool> {
        if self.kind != ModuleKind::Linear {
            return (base == self.base_shape(false).as_slice()).then_some(false);
        }
        let linear = base == self.base_shape(false).as_slice();
        let conv1d = base == self.base_shape(true).as_slice();
        match (linear, conv1d) {
            (true, true) => Some(config_flag),
            (true, false) => Some(false),
            (false, true) => Some(true),
            (false, false) => None,
        }
    }

    /// The shape of the base weight this adapter fits.
    pub fn base_shape(&self, fan_in_fan_out: bool) -> Vec<usize> {
        let (a, b) = (self.a.dims(), self.b.dims());
        match self.kind {
            ModuleKind::Linear if fan_in_fan_out => vec![a[1], b[0]],
            ModuleKind::Linear => vec![b[0], a[1]],
            ModuleKind::Embedding => vec![a[1], b[0]],
            ModuleKind::Conv2d => vec![b[0], a[1], a[2], a[3]],
        }
    }
}

/// A LoRA adapter: its config, the factors of every adapted module, keyed by module name
/// (without the `base_model.model.` prefix), and the full copies of its `modules_to_save`.
#[derive(Debug, Clone, Default)]
pub struct Adapter {
    /// The adapter's config.
    pub config: LoraConfig,
    /// Module name → factors, sorted.
    pub modules: BTreeMap<String, ModuleAdapter>,
    /// Module name → the copy of its base weight saved as `<module>.base_layer.weight` (PEFT's
    /// `save_embedding_layers`, for the embedding layers `embed_tokens` / `lm_head`). PEFT loads
    /// it into the model's base weight, so merging and building use it in place of the
    /// checkpoint's weight.
    pub base_layers: BTreeMap<String, Tensor>,
    /// `modules_to_save`: tensor name (`classifier.weight`, without the prefix) → its trained
    /// full value, which replaces the base tensor. PEFT saves them under the module's own name
    /// (`base_model.model.classifier.weight`), not under `.modules_to_save.default.`.
    pub saved: BTreeMap<String, Tensor>,
}

/// The modules PEFT trains in full and saves: the config's `modules_to_save`, plus `classifier`
/// and `score` for `task_type: "SEQ_CLS"`, as `PeftModelForSequenceClassification` adds them.
pub fn modules_to_save(cfg: &LoraConfig) -> Vec<String> {
    let mut v = cfg.modules_to_save.clone().unwrap_or_default();
    if cfg.task_type.as_deref() == Some("SEQ_CLS") {
        for m in ["classifier", "score"] {
            if !v.iter().any(|x| x == m) {
                v.push(m.to_string());
            }
        }
    }
    v
}

/// Whether `module` (a full dotted name) is one of `list` by PEFT's rule (`_set_trainable`:
/// the name ends with a listed string).
pub fn is_saved_module(list: &[String], module: &str) -> bool {
    !module.is_empty()
        && list
            .iter()
            .any(|m| !m.is_empty() && module.ends_with(m.as_str()))
}

impl Adapter {
    /// The scale of `module`: α (from `alpha_pattern`) over r read from the tensor shapes
    /// (√r with rsLoRA).
    pub fn scale_for(&self, module: &str) -> Result<f64> {
        let m = self.modules.get(module).ok_or_else(|| Error::Module {
            module: module.to_string(),
            reason: "has no adapter".into(),
        })?;
        Ok(self.config.scaling(self.config.alpha_for(module), m.rank()))
    }

    /// Total trainable parameter count (factors and `modules_to_save` copies).
    pub fn num_params(&self) -> usize {
        self.modules
            .values()
            .map(ModuleAdapter::num_params)
            .sum::<usize>()
            + self.saved.values().map(Tensor::elem_count).sum::<usize>()
    }

    /// Loads and validates an adapter directory onto `dev` (tensors in their stored dtype).
    /// Only the modules its config targets are kept, as PEFT's loader does; see
    /// [`Adapter::load_report`] for the keys left out.
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        Self::load_report(dir, dev).map(|(a, _)| a)
    }

    /// [`Adapter::load`], also returning the keys PEFT would not load: tensors of modules the
    /// config does not target (after `exclude_modules` and `layers_to_transform`). PEFT builds
    /// LoRA layers only where the config targets (`tuners_utils.py` `inject_adapter`) and then
    /// loads the file non-strictly (`utils/save_and_load.py` `set_peft_model_state_dict`), so
    /// such tensors have no effect there. A targeted module's rank must be the config's
    /// (`r` / `rank_pattern`): PEFT's layer has that shape and refuses another.
    pub fn load_report(dir: &Path, dev: &Device) -> Result<(Self, Vec<String>)> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter directory not found"),
            ));
        }
        let config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
        config.check_supported()?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Unsupported {
                path: dir.join("adapter_model.bin"),
                reason: "pickled PyTorch weights are refused (they can run code when loaded); \
                         re-save the adapter with safe_serialization=True to get adapter_model.safetensors"
                    .into(),
            });
        }
        let file = SafeFile::open(&weights)?;
        let (all, copies, saved) = read_modules(&file, &modules_to_save(&config), dev)?;
        if all.is_empty() && saved.is_empty() {
            return Err(Error::MissingTensor {
                key: "lora_A/lora_B".into(),
                file: Some(weights),
            });
        }
        let targeting = config.targeting()?;
        let mut modules = BTreeMap::new();
        let mut ignored = vec![];
        for (name, m) in all {
            if !targeting.is_target(&name, Some(m.kind)) {
                ignored.extend(m.keys(&name));
                continue;
            }
            let r = config.rank_for(&name);
            if m.rank() != r {
                return Err(Error::ShapeMismatch {
                    key: m.keys(&name)[0].clone(),
                    got: m.a.dims().to_vec(),
                    what: format!(
                        "the config's rank {r} for `{name}` (r / rank_pattern; PEFT refuses \
                         a factor of another shape) in {}",
                        weights.display()
                    ),
                });
            }
            modules.insert(name, m);
        }
        let mut base_layers = BTreeMap::new();
        for (name, t) in copies {
            if modules.contains_key(&name) {
                base_layers.insert(name, t);
            } else {
                ignored.push(keys::format(&name, Factor::BaseWeight));
            }
        }
        for (name, m) in &modules {
            match (config.use_dora, m.magnitude.is_some()) {
                (true, false) => {
                    return Err(Error::MissingTensor {
                        key: keys::format(name, Factor::Magnitude),
                        file: Some(weights),
                    })
                }
                (false, true) => {
                    return Err(Error::UnusedTensor {
                        key: keys::format(name, Factor::Magnitude),
                        file: weights,
                        hint: "a DoRA magnitude, but the config has use_dora: false".into(),
                    })
                }
                _ => {}
            }
        }
        if modules.is_empty() && saved.is_empty() {
            return Err(Error::Config(format!(
                "{}: target_modules matches none of the {} modules in {}, so PEFT would load nothing",
                dir.join(CONFIG_FILE).display(),
                ignored.len() / 2,
                weights.display()
            )));
        }
        Ok((
            Adapter {
                config,
                modules,
                base_layers,
                saved,
            },
            ignored,
        ))
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if
    /// needed), tensors in f32, atomically per file. `inference_mode` is written true, as PEFT.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = BTreeMap::new();
        for (name, m) in &self.modules {
            let (fa, fb) = match m.kind {
                ModuleKind::Embedding => (Factor::EmbeddingA, Factor::EmbeddingB),
                _ => (Factor::A, Factor::B),
            };
            tensors.insert(keys::format(name, fa), m.a.to_dtype(DType::F32)?);
            tensors.insert(keys::format(name, fb), m.b.to_dtype(DType::F32)?);
            if let Some(mag) = &m.magnitude {
                tensors.insert(
                    keys::format(name, Factor::Magnitude),
                    mag.to_dtype(DType::F32)?,
                );
            }
        }
        for (name, t) in &self.base_layers {
            tensors.insert(
                keys::format(name, Factor::BaseWeight),
                t.to_dtype(DType::F32)?,
            );
        }
        for (name, t) in &self.saved {
            tensors.insert(format!("{}{name}", keys::PREFIX), t.to_dtype(DType::F32)?);
        }
        tensor_file::save(
            &dir.join(WEIGHTS_FILE),
            &tensors,
            &tensor_file::pt_metadata(),
        )?;
        let mut cfg = self.config.clone();
        cfg.inference_mode = true;
        fill_peft_fields(&mut cfg);
        tensor_file::write_text_atomic(&dir.join(CONFIG_FILE), &cfg.to_json()?)
    }

    /// Checks the adapter against the base weights' shapes (`name → shape` of each
    /// `<module>.weight`): every module must exist with a fitting shape.
    pub fn check_fits(
        &self,
        base_shapes: &BTreeMap<String, Vec<usize>>,
        file: &Path,
    ) -> Result<()> {
        for (name, t) in &self.saved {
            match base_shapes.get(name) {
                None => {
                    return Err(Error::UnusedTensor {
                        key: format!("{}{name}", keys::PREFIX),
                        file: file.to_path_buf(),
                        hint: format!(
                            "a modules_to_save copy, but the base has no `{name}`: is this an adapter for another model?"
                        ),
                    })
                }
                Some(shape) if shape.as_slice() != t.dims() => {
                    return Err(Error::ShapeMismatch {
                        key: name.clone(),
                        got: t.dims().to_vec(),
                        what: format!("the base tensor `{name}` of shape {shape:?}"),
                    })
                }
                _ => {}
            }
        }
        for (name, m) in &self.modules {
            let key = format!("{name}.weight");
            let Some(shape) = base_shapes.get(&key) else {
                return Err(Error::UnusedTensor {
                    key: keys::format(
                        name,
                        if m.kind == ModuleKind::Embedding {
                            Factor::EmbeddingA
                        } else {
                            Factor::A
                        },
                    ),
                    file: file.to_path_buf(),
                    hint: format!("the base has no `{key}`: is this an adapter for another model?"),
                });
            };
            if let Some(copy) = self.base_layers.get(name).filter(|c| c.dims() != shape) {
                return Err(Error::ShapeMismatch {
                    key: keys::format(name, Factor::BaseWeight),
                    got: copy.dims().to_vec(),
                    what: format!("the base weight `{key}` of shape {shape:?}"),
                });
            }
            let want = m.base_shape(self.config.fan_in_fan_out);
            if m.fan_in_fan_out_for(shape, self.config.fan_in_fan_out)
                .is_none()
            {
                return Err(Error::ShapeMismatch {
                    key: name.clone(),
                    got: want,
                    what: format!(
                        "the base weight `{key}` of shape {shape:?} (adapter for another model?)"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A `modules_to_save` tensor name (`classifier.weight`) for `key`, if it is one: the prefix is
/// optional and the in-memory form `classifier.modules_to_save.<adapter>.weight` is accepted.
fn saved_name(key: &str, saved: &[String]) -> Option<String> {
    let path = key.strip_prefix(keys::PREFIX).unwrap_or(key);
    let path = match path.split_once(".modules_to_save.") {
        Some((head, rest)) => format!("{head}.{}", rest.split_once('.')?.1),
        None => path.to_string(),
    };
    let (module, _leaf) = path.rsplit_once('.')?;
    is_saved_module(saved, module).then_some(path)
}

type Modules = BTreeMap<String, ModuleAdapter>;

/// The adapter's modules, its base-weight copies and its `modules_to_save` tensors.
type Contents = (Modules, BTreeMap<String, Tensor>, BTreeMap<String, Tensor>);

/// Groups the file's keys into modules and validates each; base-weight copies apart; keys of
/// `saved` modules (see [`is_saved_module`]) are full tensors.
fn read_modules(file: &SafeFile, saved: &[String], dev: &Device) -> Result<Contents> {
    let path = file.path();
    let mut parts: BTreeMap<String, BTreeMap<Factor, Tensor>> = BTreeMap::new();
    let mut full = BTreeMap::new();
    let mut copies = BTreeMap::new();
    for key in file.names() {
        let (module, factor) = match keys::parse(&key, path) {
            Ok(p) => p,
            Err(e) => match saved_name(&key, saved) {
                Some(name) => {
                    let t = file.tensor(&key, dev)?;
                    crate::layers::check_finite(&t, &key, "loading the adapter")?;
                    if full.insert(name, t).is_some() {
                        return Err(Error::BadSafetensors {
                            path: path.into(),
                            reason: format!("modules_to_save tensor `{key}` appears twice"),
                        });
                    }
                    continue;
                }
                None => return Err(e),
            },
        };
        if factor == Factor::BaseWeight {
            let t = file.tensor(&key, dev)?;
            crate::layers::check_finite(&t, &key, "loading the adapter")?;
            copies.insert(module, t);
            continue;
        }
        let (_, shape) = file.info(&key)?;
        if shape.contains(&0) || shape.is_empty() {
            return Err(Error::ShapeMismatch {
                key,
                got: shape,
                what: "a LoRA factor: it is empty (an unsharded ZeRO-3/FSDP export?)".into(),
            });
        }
        let t = file.tensor(&key, dev)?;
        crate::layers::check_finite(&t, &key, "loading the adapter")?;
        if parts.entry(module).or_default().insert(factor, t).is_some() {
            return Err(Error::BadSafetensors {
                path: path.into(),
                reason: format!("tensor `{key}` appears twice"),
            });
        }
    }
    let modules: Modules = parts
        .into_iter()
        .map(|(name, f)| Ok((name.clone(), module_from_parts(name, f, path)?)))
        .collect::<Result<_>>()?;
    if let Some(name) = copies.keys().find(|n| !modules.contains_key(*n)) {
        return Err(Error::UnusedTensor {
            key: keys::format(name, Factor::BaseWeight),
            file: path.into(),
            hint: "a base-weight copy of a module with no LoRA factors".into(),
        });
    }
    Ok((modules, copies, full))
}

fn module_from_parts(
    name: String,
    mut f: BTreeMap<Factor, Tensor>,
    path: &Path,
) -> Result<ModuleAdapter> {
    let missing = |factor| Error::MissingTensor {
        key: keys::format(&name, factor),
        file: Some(path.into()),
    };
    let magnitude = f.remove(&Factor::Magnitude);
    let (kind, a, b) = if f.contains_key(&Factor::EmbeddingA) || f.contains_key(&Factor::EmbeddingB)
    {
        let a = f
            .remove(&Factor::EmbeddingA)
            .ok_or_else(|| missing(Factor::EmbeddingA))?;
        let b = f
            .remove(&Factor::EmbeddingB)
            .ok_or_else(|| missing(Factor::EmbeddingB))?;
        (ModuleKind::Embedding, a, b)
    } else {
        let a = f.remove(&Factor::A).ok_or_else(|| missing(Factor::A))?;
        let b = f.remove(&Factor::B).ok_or_else(|| missing(Factor::B))?;
        let kind = match a.rank() {
            2 => ModuleKind::Linear,
            4 => ModuleKind::Conv2d,
            n => {
                return Err(Error::UnsupportedFeature {
                    feature: format!("{n}-D lora_A"),
                    detail: format!(
                        "module `{name}` (only Linear, Embedding and Conv2d are supported)"
                    ),
                })
            }
        };
        (kind, a, b)
    };
    if let Some((extra, _)) = f.into_iter().next() {
        return Err(Error::UnusedTensor {
            key: keys::format(&name, extra),
            file: path.into(),
            hint: "mixes embedding and linear factors".into(),
        });
    }
    let r = a.dims()[0];
    let b_rank = match kind {
        ModuleKind::Conv2d if b.rank() == 4 && b.dims()[2..] == [1, 1] => b.dims()[1],
        ModuleKind::Linear | ModuleKind::Embedding if b.rank() == 2 => b.dims()[1],
        _ => usize::MAX,
    };
    if b_rank != r {
        return Err(Error::ShapeMismatch {
            key: name,
            got: b.dims().to_vec(),
            what: format!("lora_B for lora_A of shape {:?} (rank {r})", a.dims()),
        });
    }
    if let Some(m) = &magnitude {
        let out = b.dims()[0];
        let want: &[usize] = match kind {
            ModuleKind::Conv2d => &[1, out, 1, 1],
            _ => &[out],
        };
        if m.dims() != want {
            return Err(Error::ShapeMismatch {
                key: keys::format(&name, Factor::Magnitude),
                got: m.dims().to_vec(),
                what: format!(
                    "DoRA's magnitude for lora_B of shape {:?} (expected {want:?})",
                    b.dims()
                ),
            });
        }
    }
    Ok(ModuleAdapter {
        kind,
        a,
        b,
        magnitude,
    })
}

/// PEFT 0.21.2 writes every field of its `LoraConfig`; fill those the config lacks with PEFT's
/// defaults so that a saved config has exactly PEFT's field set.
fn fill_peft_fields(cfg: &mut LoraConfig) {
    let defaults: [(&str, Value); 21] = [
        ("alora_invocation_tokens", Value::Null),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", Value::Bool(false)),
        ("eva_config", Value::Null),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("loftq_config", Value::Object(Default::default())),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", Value::from("megatron.core")),
        ("monteclora_config", Value::Null),
        ("peft_version", Value::from(PEFT_FORMAT_VERSION)),
        ("qalora_group_size", Value::from(16)),
        ("revision", Value::Null),
        ("target_parameters", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_qalora", Value::Bool(false)),
        ("velora_config", Value::Null),
    ];
    for (k, v) in defaults {
        cfg.extra.entry(k.to_string()).or_insert(v);
    }
}

/// The adapter directory's weights file.
pub fn weights_path(dir: &Path) -> PathBuf {
    dir.join(WEIGHTS_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tinynet_linear/adapter")
    }

    #[test]
    fn loads_peft_adapter_with_ranks_from_shapes() {
        let a = Adapter::load(&fixture(), &Device::Cpu).unwrap();
        let names: Vec<_> = a.modules.keys().cloned().collect();
        assert_eq!(
            names,
            ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"]
        );
        for m in a.modules.values() {
            assert_eq!((m.kind, m.rank()), (ModuleKind::Linear, 4));
            assert_eq!(m.a.dims(), &[4, 16]);
        }
        assert_eq!(a.scale_for("blocks.0.q").unwrap(), 2.0);
        assert_eq!(a.num_params(), 4 * (4 * 16 + 16 * 4));
    }

    #[test]
    fn save_writes_peft_keys_and_fields_and_loads_back_bit_identical() {
        let a = Adapter::load(&fixture(), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let ours = SafeFile::open(&dir.path().join(WEIGHTS_FILE)).unwrap();
        let theirs = SafeFile::open(&fixture().join(WEIGHTS_FILE)).unwrap();
        assert_eq!(ours.names(), theirs.names());
        assert_eq!(ours.metadata(), theirs.metadata());
        for k in theirs.names() {
            assert_eq!(ours.info(&k).unwrap(), theirs.info(&k).unwrap(), "{k}");
            assert_eq!(ours.bytes(&k).unwrap(), theirs.bytes(&k).unwrap(), "{k}");
        }
        let read = |p: &Path| -> serde_json::Map<String, Value> {
            serde_json::from_str(&std::fs::read_to_string(p.join(CONFIG_FILE)).unwrap()).unwrap()
        };
        let (ours, theirs) = (read(dir.path()), read(&fixture()));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        assert_eq!(
            ours, theirs,
            "a loaded PEFT config is written back unchanged"
        );
    }

    /// A copy of the TinyNet fixture adapter with its config edited by `edit`.
    fn edited(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture().join(WEIGHTS_FILE), dir.path().join(WEIGHTS_FILE)).unwrap();
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture().join(CONFIG_FILE)).unwrap())
                .unwrap();
        edit(&mut v);
        std::fs::write(dir.path().join(CONFIG_FILE), v.to_string()).unwrap();
        dir
    }

    /// Issue 13 items 2 and 9: only what PEFT's loader would load is kept, the rank comes from
    /// the config, and `bias: "all"` on a file with no bias tensors loads as PEFT's does.
    #[test]
    fn load_keeps_what_peft_loads_and_takes_the_rank_from_the_config() {
        let dir = edited(|v| v["exclude_modules"] = serde_json::json!(["v"]));
        let (a, ignored) = Adapter::load_report(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(
            a.modules.keys().collect::<Vec<_>>(),
            ["blocks.0.q", "blocks.1.q"]
        );
        assert_eq!(
            ignored,
            [
                "base_model.model.blocks.0.v.lora_A.weight",
                "base_model.model.blocks.0.v.lora_B.weight",
                "base_model.model.blocks.1.v.lora_A.weight",
                "base_model.model.blocks.1.v.lora_B.weight"
            ]
        );
        let dir = edited(|v| v["rank_pattern"] = serde_json::json!({"blocks\\.1\\.q": 2}));
        let e = Adapter::load(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks.1.q.lora_A.weight") && e.contains("rank 2"),
            "{e}"
        );
        let dir = edited(|v| v["bias"] = serde_json::json!("all"));
        assert_eq!(
            Adapter::load(dir.path(), &Device::Cpu)
                .unwrap()
                .modules
                .len(),
            4
        );
    }
}
