//! [`LoraBuilder`]: builds a model's layers by their full module name, giving each one a LoRA
//! adapter exactly where the [`LoraConfig`] targets it (PEFT's matching rules).
//!
//! Model code asks for `vb.pp("self_attn").pp("q_proj").linear(64, 64, false)` as it would with
//! candle's `VarBuilder`; the builder knows the name `model.layers.0.self_attn.q_proj`, loads the
//! frozen base weight from the checkpoint, and returns a [`LoraLinear`] that is plain or adapted.
//! The adapter's `A`/`B` variables are recorded, so [`LoraBuilder::adapter`] can snapshot them in
//! PEFT's format at any time (after training, say) and [`LoraBuilder::trainable_vars`] gives the
//! optimizer exactly those.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use lora::{builder::{LoraBuilder, MapSource}, LoraConfig};
//! # fn main() -> lora::Result<()> {
//! let dev = Device::Cpu;
//! let mut weights = std::collections::BTreeMap::new();
//! weights.insert("blocks.0.q.weight".to_string(), Tensor::ones((16, 16), DType::F32, &dev)?);
//! weights.insert("blocks.0.k.weight".to_string(), Tensor::ones((16, 16), DType::F32, &dev)?);
//! let vb = LoraBuilder::new(MapSource::new(weights), DType::F32, dev)
//!     .with_config(LoraConfig::new(4, 8.0, &["q"]))?;
//! let q = vb.pp("blocks.0.q").linear(16, 16, false)?;
//! let k = vb.pp("blocks.0.k").linear(16, 16, false)?;
//! assert!(q.lora().is_some() && k.lora().is_none());
//! assert_eq!(vb.trainable_vars().len(), 2);
//! vb.finish()?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::{Adapter, ModuleAdapter};
use crate::config::{Bias, LoraConfig, ModuleKind, TargetModules};
use crate::error::{Error, Result};
use crate::layers::{Conv2dGeometry, LoraConv2d, LoraEmbedding, LoraLinear, LoraRng, LoraSpec};
use crate::model_weights::Checkpoint;

/// Where frozen base tensors come from.
pub trait TensorSource: Send + Sync {
    /// The tensor `name` in its stored dtype, or `None` if absent.
    fn get(&self, name: &str, dev: &Device) -> Result<Option<Tensor>>;
    /// A description for messages (a path).
    fn describe(&self) -> String;
    /// Whether the tensor `name` exists (the default loads it to find out).
    fn contains(&self, name: &str) -> bool {
        self.get(name, &Device::Cpu).is_ok_and(|t| t.is_some())
    }
}

impl TensorSource for Checkpoint {
    fn get(&self, name: &str, dev: &Device) -> Result<Option<Tensor>> {
        if !self.contains(name) {
            return Ok(None);
        }
        self.tensor(name, dev).map(Some)
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
}

/// Tensors held in memory, by name.
#[derive(Debug, Clone, Default)]
pub struct MapSource(BTreeMap<String, Tensor>);

impl MapSource {
    /// Wraps a name → tensor map.
    pub fn new(map: BTreeMap<String, Tensor>) -> Self {
        MapSource(map)
    }
}

impl TensorSource for MapSource {
    fn get(&self, name: &str, _dev: &Device) -> Result<Option<Tensor>> {
        Ok(self.0.get(name).cloned())
    }
    fn describe(&self) -> String {
        "in-memory weights".into()
    }
}

#[derive(Debug, Clone)]
struct Registered {
    kind: ModuleKind,
    a: Var,
    b: Var,
    /// The frozen base weight of an embedding layer (`embed_tokens`, `lm_head`), which PEFT
    /// saves as `<module>.base_layer.weight` when the config targets one.
    base: Option<Tensor>,
    /// DoRA's magnitude vector m.
    magnitude: Option<Var>,
}

/// PEFT's `EMBEDDING_LAYER_NAMES` (`utils/constants.py`).
const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// PEFT's `save_embedding_layers="auto"` rule (`utils/save_and_load.py`
/// `get_peft_model_state_dict`): a list naming `embed_tokens` or `lm_head` exactly, or a regex
/// (not "all-linear") that fully matches a module whose name ends in one of them.
fn embedding_is_targeted(cfg: &LoraConfig, modules: &BTreeSet<String>) -> bool {
    match &cfg.target_modules {
        Some(TargetModules::List(l)) => l
            .iter()
            .any(|t| EMBEDDING_LAYER_NAMES.contains(&t.as_str())),
        Some(TargetModules::Regex(r)) if r != "all-linear" => {
            let Ok(re) = crate::target::full_regex("target_modules", r) else {
                return false;
            };
            modules.iter().any(|m| {
                let leaf = m.rsplit('.').next().unwrap_or(m);
                EMBEDDING_LAYER_NAMES.contains(&leaf) && re.is_match(m)
            })
        }
        _ => false,
    }
}

#[derive(Default)]
struct State {
    adapters: BTreeMap<String, Registered>,
    trainable: Vec<(String, Var)>,
    modules: BTreeSet<String>,
    /// Modules that hold tensors but are no LoRA-able layer (norms, ...), by name.
    other_modules: BTreeSet<String>,
    /// `modules_to_save` copies: tensor name (`classifier.weight`) → its trainable variable.
    saved: BTreeMap<String, Var>,
    /// Bytes of every base tensor loaded so far (in the builder's dtype).
    loaded_bytes: usize,
}

struct Inner {
    source: Box<dyn TensorSource>,
    dtype: DType,
    device: Device,
    config: Option<LoraConfig>,
    init_from: Option<Adapter>,
    full: bool,
    rng: LoraRng,
    state: Mutex<State>,
}

/// Builds layers by module name, plain or with LoRA (see the module doc).
#[derive(Clone)]
pub struct LoraBuilder {
    inner: Arc<Inner>,
    path: Vec<String>,
}

impl LoraBuilder {
    /// A builder over `source` that loads weights as `dtype` on `device`; no adapters yet.
    pub fn new(source: impl TensorSource + 'static, dtype: DType, device: Device) -> Self {
        LoraBuilder {
            inner: Arc::new(Inner {
                source: Box::new(source),
                dtype,
                device,
                config: None,
                init_from: None,
                full: false,
                rng: LoraRng::new(0),
                state: Mutex::new(State::default()),
            }),
            path: vec![],
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Result<Self> {
        let inner = Arc::get_mut(&mut self.inner)
            .ok_or_else(|| Error::State("configure the builder before building layers".into()))?;
        f(inner);
        Ok(self)
    }

    /// Adds new adapters where `config` targets (initialised by `config.init_lora_weights`).
    /// Modules in `modules_to_save` (with `classifier` and `score` added for `SEQ_CLS`, as PEFT
    /// does, also in the saved config) become trainable full copies.
    pub fn with_config(self, mut config: LoraConfig) -> Result<Self> {
        config.validate()?;
        config.check_supported()?;
        let saved = crate::adapter::modules_to_save(&config);
        if !saved.is_empty() {
            config.modules_to_save = Some(saved);
        }
        self.edit(|i| i.config = Some(config))
    }

    /// Puts the given adapter's tensors on the modules it names (its config decides the scale).
    /// Its values become trainable variables, so training can continue from it.
    pub fn with_adapter(self, adapter: Adapter) -> Result<Self> {
        let cfg = adapter.config.clone();
        self.with_config(cfg)?.edit(|i| i.init_from = Some(adapter))
    }

    /// Full fine-tuning: every weight is a trainable variable and no adapter is added.
    pub fn full_finetune(self) -> Result<Self> {
        self.edit(|i| i.full = true)
    }

    /// Seeds the random source of every init and dropout mask.
    pub fn with_seed(self, seed: u64) -> Result<Self> {
        self.edit(|i| i.rng = LoraRng::new(seed))
    }

    /// The shared random source (its state goes into training checkpoints).
    pub fn rng(&self) -> &LoraRng {
        &self.inner.rng
    }

    /// The device weights load onto.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The dtype weights load as.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// The LoRA config, if any.
    pub fn config(&self) -> Option<&LoraConfig> {
        self.inner.config.as_ref()
    }

    /// A builder one level down: `pp("self_attn")`.
    pub fn pp(&self, s: impl ToString) -> Self {
        let mut path = self.path.clone();
        path.push(s.to_string());
        LoraBuilder {
            inner: self.inner.clone(),
            path,
        }
    }

    /// The current module's full dotted name.
    pub fn name(&self) -> String {
        self.path.join(".")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the source has the tensor `<name>.<leaf>` (for optional parts and layouts).
    pub fn contains(&self, leaf: &str) -> bool {
        let key = if self.path.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.name())
        };
        self.inner.source.contains(&key)
    }

    /// Loads `<name>.<leaf>` with the expected shape, as the builder's dtype.
    fn load(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        let key = if self.path.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.name())
        };
        let t = self
            .inner
            .source
            .get(&key, &self.inner.device)?
            .ok_or_else(|| Error::MissingTensor {
                key: key.clone(),
                file: Some(self.inner.source.describe().into()),
            })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                key,
                got: t.dims().to_vec(),
                what: format!("the model (expected {shape:?})"),
            });
        }
        let t = t.to_dtype(self.inner.dtype)?;
        self.state().loaded_bytes += t.elem_count() * t.dtype().size_in_bytes();
        Ok(t)
    }

    /// Whether the source holds the tensor `name` (a full name, not under this builder's path).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.inner
            .source
            .get(name, &Device::Cpu)
            .is_ok_and(|t| t.is_some())
    }

    /// Whether the current module is one of the config's `modules_to_save` (PEFT's suffix
    /// rule), so that it is built as a trainable full copy.
    fn is_saved(&self) -> bool {
        !self.inner.full
            && self.inner.config.as_ref().is_some_and(|c| {
                crate::adapter::is_saved_module(
                    c.modules_to_save.as_deref().unwrap_or(&[]),
                    &self.name(),
                )
            })
    }

    /// Loads `<name>.<leaf>` for a `modules_to_save` module: the loaded adapter's copy when it
    /// has one (same shape), else the base tensor.
    fn load_saved(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        let base = self.load(leaf, shape)?;
        let key = format!("{}.{leaf}", self.name());
        let Some(t) = self
            .inner
            .init_from
            .as_ref()
            .and_then(|a| a.saved.get(&key))
        else {
            return Ok(base);
        };
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                key: format!("{}{key}", crate::keys::PREFIX),
                got: t.dims().to_vec(),
                what: format!("the model's `{key}` (expected {shape:?})"),
            });
        }
        Ok(t.to_dtype(self.inner.dtype)?)
    }

    /// Records trainable `modules_to_save` variables under `<name>.<leaf>`.
    fn register_saved(&self, leaves: &[&str], vars: Vec<Var>) {
        let name = self.name();
        let mut st = self.state();
        st.modules.insert(name.clone());
        for (leaf, v) in leaves.iter().zip(vars) {
            let key = format!("{name}.{leaf}");
            st.trainable.push((key.clone(), v.clone()));
            st.saved.insert(key, v);
        }
    }

    /// A tensor that is not part of a LoRA-able layer (a norm weight, say): frozen, or a
    /// trainable variable under full fine-tuning or when its module is in `modules_to_save`.
    pub fn tensor(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        if self.is_saved() {
            let v = Var::from_tensor(&self.load_saved(leaf, shape)?)?;
            self.register_saved(&[leaf], vec![v.clone()]);
            return Ok(v.as_tensor().clone());
        }
        if !self.path.is_empty() {
            self.state().other_modules.insert(self.name());
        }
        if leaf == "bias" {
            self.check_bias(false)?;
        }
        let t = self.load(leaf, shape)?;
        if !self.inner.full {
            return Ok(t);
        }
        let v = Var::from_tensor(&t)?;
        let name = if self.path.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.name())
        };
        self.state().trainable.push((name, v.clone()));
        Ok(v.as_tensor().clone())
    }

    /// Decides whether the current module gets an adapter; returns its spec and any loaded
    /// tensors.
    fn plan(&self, kind: ModuleKind) -> Result<Option<(LoraSpec, Option<ModuleAdapter>)>> {
        let name = self.name();
        self.state().modules.insert(name.clone());
        let Some(cfg) = &self.inner.config else {
            return Ok(None);
        };
        let targeted = cfg.is_target(&name, kind)?;
        let loaded = self
            .inner
            .init_from
            .as_ref()
            .and_then(|a| a.modules.get(&name).cloned());
        match (&self.inner.init_from, targeted, &loaded) {
            (Some(_), true, None) => {
                return Err(Error::MissingTensor {
                    key: crate::keys::format(&name, crate::keys::Factor::A),
                    file: Some("the adapter (its config targets this module)".into()),
                })
            }
            (Some(_), false, Some(_)) => {
                return Err(Error::Module {
                    module: name,
                    reason: "has adapter tensors but the adapter's config does not target it"
                        .into(),
                })
            }
            (_, false, _) => return Ok(None),
            _ => {}
        }
        if let Some(m) = &loaded {
            if m.kind != kind {
                return Err(Error::Module {
                    module: name,
                    reason: format!(
                        "adapter holds {:?} factors but the module is {kind:?}",
                        m.kind
                    ),
                });
            }
        }
        // PEFT builds the layer with the config's rank (`tuners/lora/model.py`
        // `_create_and_replace`: `rank_pattern`, else `r`) and then loads the file into it, so a
        // tensor of another rank is a size-mismatch error there.
        let r = cfg.rank_for(&name);
        if let Some(m) = loaded.as_ref().filter(|m| m.rank() != r) {
            return Err(Error::ShapeMismatch {
                key: crate::keys::format(&name, crate::keys::Factor::A),
                got: m.a.dims().to_vec(),
                what: format!("the config's rank {r} for `{name}` (r / rank_pattern)"),
            });
        }
        let spec = LoraSpec {
            r,
            alpha: cfg.alpha_for(&name),
            use_rslora: cfg.use_rslora,
            dropout: cfg.lora_dropout as f32,
            init: cfg.init_lora_weights.clone(),
            use_dora: cfg.use_dora,
        };
        Ok(Some((spec, loaded)))
    }

    /// Records an adapter's variables: A, B and (DoRA) m, named `<module>.lora_A`,
    /// `<module>.lora_B`, `<module>.lora_magnitude_vector`, and (embedding layers) the frozen
    /// base weight PEFT saves as `<module>.base_layer.weight`.
    fn register(&self, kind: ModuleKind, lora: Option<&crate::layers::LowRank>, base: &Tensor) {
        let Some(l) = lora else { return };
        let name = self.name();
        let leaf = self.path.last().map_or("", String::as_str);
        let base = EMBEDDING_LAYER_NAMES.contains(&leaf).then(|| base.clone());
        let mut st = self.state();
        st.adapters.insert(
            name.clone(),
            Registered {
                kind,
                a: l.a.clone(),
                b: l.b.clone(),
                base,
                magnitude: l.magnitude.clone(),
            },
        );
        st.trainable.push((format!("{name}.lora_A"), l.a.clone()));
        st.trainable.push((format!("{name}.lora_B"), l.b.clone()));
        if let Some(m) = &l.magnitude {
            st.trainable
                .push((format!("{name}.lora_magnitude_vector"), m.clone()));
        }
    }

    fn register_full(&self, vars: Vec<Var>) {
        let name = self.name();
        let mut st = self.state();
        for (i, v) in vars.into_iter().enumerate() {
            st.trainable.push((
                format!("{name}.{}", if i == 0 { "weight" } else { "bias" }),
                v,
            ));
        }
    }

    /// Refuses `bias: "all"` / `"lora_only"` where they would train a bias this library does
    /// not train: any bias for `"all"`, a targeted layer's bias for `"lora_only"`. Elsewhere
    /// PEFT's result equals `bias: "none"` (`tuners_utils.py`
    /// `_mark_only_adapters_as_trainable`, `_get_learnable_bias_state_dict`).
    fn check_bias(&self, targeted: bool) -> Result<()> {
        let Some(cfg) = &self.inner.config else {
            return Ok(());
        };
        if self.inner.full || cfg.bias == Bias::None || (cfg.bias == Bias::LoraOnly && !targeted) {
            return Ok(());
        }
        Err(Error::UnsupportedFeature {
            feature: "bias".into(),
            detail: format!(
                "bias: {:?} trains the bias of `{}` (PEFT trains {}); use bias: \"none\"",
                cfg.bias,
                self.name(),
                if cfg.bias == Bias::All {
                    "every `*.bias` of the model"
                } else {
                    "the biases of LoRA-wrapped layers"
                }
            ),
        })
    }

    /// A linear layer `[out, in]` (with bias if `bias`), adapted where targeted.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<LoraLinear> {
        if self.is_saved() {
            let w = self.load_saved("weight", &[out_dim, in_dim])?;
            let b = bias
                .then(|| self.load_saved("bias", &[out_dim]))
                .transpose()?;
            let l = LoraLinear::trainable(&w, b.as_ref())?;
            self.register_saved(&["weight", "bias"], l.trainable_vars());
            return Ok(l);
        }
        let w = self.load("weight", &[out_dim, in_dim])?;
        let b = bias.then(|| self.load("bias", &[out_dim])).transpose()?;
        self.linear_with(w, b)
    }

    /// A linear layer over a given frozen weight `[out, in]`, adapted where targeted: the output
    /// head of a model with tied embeddings, whose weight is the embedding table. PEFT wraps
    /// such a head like any `nn.Linear` (its base weight stays the shared table).
    pub fn tied_linear(&self, weight: Tensor) -> Result<LoraLinear> {
        self.linear_with(weight.to_dtype(self.inner.dtype)?, None)
    }

    /// The loaded adapter's `base_layer.weight` copy for this module in place of `w`, as PEFT
    /// loads it over the base weight; `w` when there is none.
    fn base_copy(&self, w: Tensor) -> Result<Tensor> {
        let name = self.name();
        let Some(copy) = self
            .inner
            .init_from
            .as_ref()
            .and_then(|a| a.base_layers.get(&name))
        else {
            return Ok(w);
        };
        if copy.dims() != w.dims() {
            return Err(Error::ShapeMismatch {
                key: crate::keys::format(&name, crate::keys::Factor::BaseWeight),
                got: copy.dims().to_vec(),
                what: format!("the model's `{name}.weight` {:?}", w.dims()),
            });
        }
        Ok(copy.to_dtype(self.inner.dtype)?)
    }

    fn linear_with(&self, w: Tensor, b: Option<Tensor>) -> Result<LoraLinear> {
        if self.inner.full {
            self.state().modules.insert(self.name());
            let l = LoraLinear::trainable(&w, b.as_ref())?;
            self.register_full(l.trainable_vars());
            return Ok(l);
        }
        let plan = self.plan(ModuleKind::Linear)?;
        if b.is_some() {
            self.check_bias(plan.is_some())?;
        }
        let w = if plan.is_some() {
            self.base_copy(w)?
        } else {
            w
        };
        let base = w.clone();
        let layer = match plan {
            None => LoraLinear::frozen(w, b),
            Some((spec, None)) => LoraLinear::new(w, b, &spec, &self.inner.rng, &self.name())?,
            Some((spec, Some(m))) => {
                let l = LoraLinear::from_adapter(
                    w,
                    b,
                    m.a,
                    m.b,
                    spec.scale(),
                    spec.dropout,
                    &self.name(),
                    &self.inner.rng,
                )?;
                if spec.use_dora {
                    l.with_dora(m.magnitude)?
                } else {
                    l
                }
            }
        };
        self.register(ModuleKind::Linear, layer.lora(), &base);
        Ok(layer)
    }

    /// An embedding table `[vocab, dim]`, adapted where targeted, or a trainable full copy when
    /// in `modules_to_save`.
    pub fn embedding(&self, vocab: usize, dim: usize) -> Result<LoraEmbedding> {
        if self.is_saved() {
            let e = LoraEmbedding::trainable(&self.load_saved("weight", &[vocab, dim])?)?;
            self.register_saved(&["weight"], e.trainable_vars());
            return Ok(e);
        }
        let t = self.load("weight", &[vocab, dim])?;
        if self.inner.full {
            self.state().modules.insert(self.name());
            let e = LoraEmbedding::trainable(&t)?;
            self.register_full(e.trainable_vars());
            return Ok(e);
        }
        let plan = self.plan(ModuleKind::Embedding)?;
        let t = if plan.is_some() {
            self.base_copy(t)?
        } else {
            t
        };
        let base = t.clone();
        let layer = match plan {
            None => LoraEmbedding::frozen(t),
            Some((spec, None)) => LoraEmbedding::new(t, &spec, &self.inner.rng, &self.name())?,
            Some((spec, Some(m))) => {
                let e = LoraEmbedding::from_adapter(t, m.a, m.b, spec.scale(), &self.name())?;
                if spec.use_dora {
                    e.with_dora(m.magnitude)?
                } else {
                    e
                }
            }
        };
        self.register(ModuleKind::Embedding, layer.lora(), &base);
        Ok(layer)
    }

    /// A square-kernel 2-D conv `[out, in, k, k]`, adapted where targeted.
    pub fn conv2d(
        &self,
        in_c: usize,
        out_c: usize,
        k: usize,
        geom: Conv2dGeometry,
        bias: bool,
    ) -> Result<LoraConv2d> {
        let w = self.load("weight", &[out_c, in_c, k, k])?;
        let b = bias.then(|| self.load("bias", &[out_c])).transpose()?;
        let plan = self.plan(ModuleKind::Conv2d)?;
        let w_base = w.clone();
        if b.is_some() {
            self.check_bias(plan.is_some())?;
        }
        let layer = match plan {
            None => LoraConv2d::frozen(w, b, geom),
            Some((spec, None)) => {
                LoraConv2d::new(w, b, geom, &spec, &self.inner.rng, &self.name())?
            }
            Some((spec, Some(m))) => {
                let c = LoraConv2d::from_adapter(
                    w,
                    b,
                    geom,
                    m.a,
                    m.b,
                    spec.scale(),
                    spec.dropout,
                    &self.name(),
                    &self.inner.rng,
                )?;
                if spec.use_dora {
                    c.with_dora(m.magnitude)?
                } else {
                    c
                }
            }
        };
        self.register(ModuleKind::Conv2d, layer.lora(), &w_base);
        Ok(layer)
    }

    /// Every trainable variable, in build order: the adapters' A and B (or every weight under
    /// full fine-tuning). Give exactly these to the optimizer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.state()
            .trainable
            .iter()
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Trainable variables with their names (`<module>.lora_A`, `<module>.weight`, ...).
    pub fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        self.state().trainable.clone()
    }

    /// Bytes of the base tensors loaded so far, in the builder's dtype: the frozen weights
    /// (and, under full fine-tuning, the initial values of the trainable ones).
    pub fn loaded_bytes(&self) -> usize {
        self.state().loaded_bytes
    }

    /// Names of every module built so far, sorted.
    pub fn module_names(&self) -> Vec<String> {
        self.state().modules.iter().cloned().collect()
    }

    /// Names of the `modules_to_save` tensors built as trainable copies (`classifier.weight`).
    pub fn saved_tensors(&self) -> Vec<String> {
        self.state().saved.keys().cloned().collect()
    }

    /// Names of the modules that got an adapter.
    pub fn adapted_modules(&self) -> Vec<String> {
        self.state().adapters.keys().cloned().collect()
    }

    /// The adapters' current values in PEFT's form, with the builder's config.
    pub fn adapter(&self) -> Result<Adapter> {
        let config = self
            .inner
            .config
            .clone()
            .ok_or_else(|| Error::State("the builder has no LoRA config".into()))?;
        let st = self.state();
        let save_copies = embedding_is_targeted(&config, &st.modules);
        let base_layers = st
            .adapters
            .iter()
            .filter(|_| save_copies)
            .filter_map(|(n, r)| Some((n.clone(), r.base.clone()?)))
            .collect();
        let modules = st
            .adapters
            .iter()
            .map(|(n, r)| {
                let m = ModuleAdapter {
                    kind: r.kind,
                    a: r.a.as_tensor().copy()?,
                    b: r.b.as_tensor().copy()?,
                    magnitude: r
                        .magnitude
                        .as_ref()
                        .map(|m| m.as_tensor().copy())
                        .transpose()?,
                };
                Ok((n.clone(), m))
            })
            .collect::<Result<_>>()?;
        let saved = st
            .saved
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Adapter {
            config,
            modules,
            base_layers,
            saved,
        })
    }

    /// Checks, once the model is built, that the config matched something and that every module
    /// of a loaded adapter exists in the model.
    pub fn finish(&self) -> Result<()> {
        let st = self.state();
        if let Some(a) = &self.inner.init_from {
            if let Some(name) = a.modules.keys().find(|n| !st.modules.contains(*n)) {
                return Err(Error::UnusedTensor {
                    key: crate::keys::format(name, crate::keys::Factor::A),
                    file: "the adapter".into(),
                    hint: format!(
                        "the model has no module `{name}`: is this an adapter for another model?"
                    ),
                });
            }
            if let Some(name) = a.saved.keys().find(|n| !st.saved.contains_key(*n)) {
                return Err(Error::UnusedTensor {
                    key: format!("{}{name}", crate::keys::PREFIX),
                    file: "the adapter".into(),
                    hint: "a modules_to_save tensor the model does not have: is this an adapter for another model?".into(),
                });
            }
        }
        if let Some(cfg) = self.inner.config.as_ref().filter(|_| !self.inner.full) {
            // PEFT visits every module (`named_modules`), containers included, and raises for a
            // targeted one it cannot wrap (`tuners/lora/model.py` `_create_new_module`).
            let t = cfg.targeting()?;
            let mut others: BTreeSet<&str> = st.other_modules.iter().map(String::as_str).collect();
            for m in st.modules.iter().chain(st.other_modules.iter()) {
                others.extend(m.match_indices('.').map(|(i, _)| &m[..i]));
            }
            if let Some(m) = others
                .into_iter()
                .find(|m| !st.modules.contains(*m) && t.is_target(m, None))
            {
                return Err(Error::Config(format!(
                    "target_modules {} matches `{m}`, which is not a Linear, Embedding or Conv2d: \
                     PEFT raises \"Target module ... is not supported\" for it",
                    describe_targets(cfg.target_modules.clone())
                )));
            }
        }
        if self.inner.config.is_some()
            && st.adapters.is_empty()
            && st.saved.is_empty()
            && !self.inner.full
        {
            let cfg = self.inner.config.as_ref().map(|c| c.target_modules.clone());
            return Err(Error::Config(format!(
                "target_modules {} matched no module of the model; its modules include: {}",
                describe_targets(cfg.flatten()),
                close_names(&st.modules)
            )));
        }
        Ok(())
    }
}

fn describe_targets(t: Option<TargetModules>) -> String {
    match t {
        Some(TargetModules::List(l)) => format!("{l:?}"),
        Some(TargetModules::Regex(r)) => format!("regex `{r}`"),
        Some(TargetModules::AllLinear) => "all-linear".into(),
        None => "(unset)".into(),
    }
}

/// The distinct leaf names of the model's modules (`q_proj`, `self_attn.q_proj`, ...), so a
/// user can see what to target.
fn close_names(modules: &BTreeSet<String>) -> String {
    let leaves: BTreeSet<&str> = modules
        .iter()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    leaves.into_iter().collect::<Vec<_>>().join(", ")
}

/// PEFT's loader rules that the builder applies (issue 13, items 2, 6 and 9), each with its
/// minimal input.
#[cfg(test)]
mod tests {
    use super::*;

    /// `blocks.0.q` (with a bias), `blocks.0.k` (none) and a norm `blocks.0.norm`.
    fn weights() -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut w = BTreeMap::new();
        for name in ["blocks.0.q.weight", "blocks.0.k.weight"] {
            w.insert(name.into(), Tensor::ones((4, 4), DType::F32, &dev).unwrap());
        }
        w.insert(
            "blocks.0.q.bias".into(),
            Tensor::zeros(4, DType::F32, &dev).unwrap(),
        );
        w.insert(
            "blocks.0.norm.weight".into(),
            Tensor::ones(4, DType::F32, &dev).unwrap(),
        );
        w
    }

    /// Builds the three modules with `json` as the config; the error text on failure.
    fn build(json: &str) -> std::result::Result<Vec<String>, String> {
        let cfg: LoraConfig = serde_json::from_str(json).unwrap();
        let run = || -> Result<Vec<String>> {
            let vb = LoraBuilder::new(MapSource::new(weights()), DType::F32, Device::Cpu)
                .with_config(cfg)?;
            let b = vb.pp("blocks").pp(0);
            b.pp("q").linear(4, 4, true)?;
            b.pp("k").linear(4, 4, false)?;
            b.pp("norm").tensor("weight", &[4])?;
            vb.finish()?;
            Ok(vb.adapted_modules())
        };
        run().map_err(|e| e.to_string())
    }

    #[test]
    fn bias_all_or_lora_only_is_refused_only_where_a_bias_would_train() {
        // Item 9: on bias-free targets PEFT's file equals bias "none".
        assert_eq!(
            build(r#"{"target_modules": ["k"], "bias": "lora_only"}"#).unwrap(),
            ["blocks.0.k"]
        );
        let e = build(r#"{"target_modules": ["q"], "bias": "lora_only"}"#).unwrap_err();
        assert!(e.contains("bias") && e.contains("blocks.0.q"), "{e}");
        let e = build(r#"{"target_modules": ["k"], "bias": "all"}"#).unwrap_err();
        assert!(e.contains("bias") && e.contains("blocks.0.q"), "{e}");
    }

    #[test]
    fn a_target_that_is_no_lora_layer_is_refused() {
        // Item 6: PEFT raises "Target module ... is not supported".
        for json in [
            r#"{"target_modules": ["k", "norm"]}"#,
            r#"{"target_modules": "blocks\\.0(\\.k)?"}"#,
        ] {
            let e = build(json).unwrap_err();
            assert!(
                e.contains("is not a Linear") && e.contains("blocks.0"),
                "{json}: {e}"
            );
        }
        assert_eq!(
            build(r#"{"target_modules": "blocks\\.0\\.[qk]"}"#).unwrap(),
            ["blocks.0.k", "blocks.0.q"]
        );
    }

    #[test]
    fn a_loaded_factor_whose_rank_disagrees_with_the_config_is_an_error() {
        // Item 2: PEFT builds the layer with r / rank_pattern and then loads the file.
        let dev = Device::Cpu;
        let module = |r: usize| ModuleAdapter {
            kind: ModuleKind::Linear,
            a: Tensor::zeros((r, 4), DType::F32, &dev).unwrap(),
            b: Tensor::zeros((4, r), DType::F32, &dev).unwrap(),
            magnitude: None,
        };
        let adapter = |json: &str| Adapter {
            config: serde_json::from_str(json).unwrap(),
            modules: [("blocks.0.k".to_string(), module(2))].into(),
            ..Default::default()
        };
        let build_with = |a: Adapter| -> Result<()> {
            let vb = LoraBuilder::new(MapSource::new(weights()), DType::F32, dev.clone())
                .with_adapter(a)?;
            vb.pp("blocks.0.k").linear(4, 4, false)?;
            vb.finish()
        };
        build_with(adapter(r#"{"r": 2, "target_modules": ["k"]}"#)).unwrap();
        build_with(adapter(
            r#"{"r": 8, "rank_pattern": {"k": 2}, "target_modules": ["k"]}"#,
        ))
        .unwrap();
        let e = build_with(adapter(r#"{"r": 4, "target_modules": ["k"]}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.0.k") && e.contains("rank 4"), "{e}");
    }
}
