//! [`LoraConfig`] is `adapter_config.json`: PEFT's field names and defaults, read and written
//! with serde. Keys this library does not model are kept in [`LoraConfig::extra`], so a config
//! read and written back loses nothing.
//!
//! Strings become enums at the serde boundary ([`TargetModules`], [`Bias`], [`InitLoraWeights`]);
//! [`LoraConfig::validate`] checks the rest once (rank, dropout, regexes) and returns a typed error.
//!
//! ```
//! use lora::LoraConfig;
//! let cfg: LoraConfig = serde_json::from_str(
//!     r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]}"#,
//! ).unwrap();
//! cfg.validate().unwrap();
//! assert_eq!(cfg.scaling_for("blocks.0.q"), 2.0);
//! assert!(cfg.is_target("blocks.0.q", lora::ModuleKind::Linear).unwrap());
//! assert!(!cfg.is_target("blocks.0.k", lora::ModuleKind::Linear).unwrap());
//! ```

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::target::{self, Pattern};

/// The name of the config file in an adapter directory, as PEFT writes it.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Which modules get a LoRA adapter (`target_modules` / `exclude_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Names matched exactly or as a dot-aligned suffix (`"q_proj"` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regular expression that must match the whole module name (Python's `re.fullmatch`).
    /// As `target_modules`, any casing of `"all-linear"` is the wildcard, as in PEFT.
    Regex(String),
    /// Every linear layer except the output head (`lm_head`), as PEFT's `"all-linear"`. As
    /// `exclude_modules` it is a plain regex, which in PEFT excludes nothing.
    AllLinear,
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            TargetModules::List(v) => v.serialize(s),
            TargetModules::Regex(r) => r.serialize(s),
            TargetModules::AllLinear => "all-linear".serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            Str(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::List(v) => TargetModules::List(v),
            Raw::Str(s) if s == "all-linear" => TargetModules::AllLinear,
            Raw::Str(s) => TargetModules::Regex(s),
        })
    }
}

/// `bias`: which existing biases are trained and saved with the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias is trained (PEFT's default).
    #[default]
    None,
    /// Every bias in the model is trained.
    All,
    /// Only the biases of LoRA-wrapped layers are trained.
    LoraOnly,
}

/// `init_lora_weights`: how A and B start.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform (a = √5), B zeros (embedding: A zeros, B ~ N(0, 1)).
    #[default]
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B zeros.
    Gaussian,
    /// `false`: both random, so the adapter changes outputs from the start (for tests).
    Random,
    /// Another PEFT method (`"pissa"`, `"olora"`, `"loftq"`, ...), kept verbatim but not
    /// implemented: building layers with it is an error.
    Other(String),
}

impl InitLoraWeights {
    /// Whether this method rewrites the base weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA), in
    /// which case an adapter saved without conversion only makes sense on the rewritten base.
    pub fn mutates_base(&self) -> bool {
        match self {
            InitLoraWeights::Other(s) => ["pissa", "olora", "loftq", "corda", "lora_ga"]
                .iter()
                .any(|m| s.starts_with(m)),
            _ => false,
        }
    }
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Default => true.serialize(s),
            InitLoraWeights::Random => false.serialize(s),
            InitLoraWeights::Gaussian => "gaussian".serialize(s),
            InitLoraWeights::Other(o) => o.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Bool(true) => InitLoraWeights::Default,
            Raw::Bool(false) => InitLoraWeights::Random,
            Raw::Str(s) if s == "gaussian" => InitLoraWeights::Gaussian,
            Raw::Str(s) => InitLoraWeights::Other(s),
        })
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single index.
    One(usize),
    /// Several indices.
    Many(Vec<usize>),
}

impl LayerIndices {
    /// Whether `idx` is selected.
    pub fn contains(&self, idx: usize) -> bool {
        match self {
            LayerIndices::One(i) => *i == idx,
            LayerIndices::Many(v) => v.contains(&idx),
        }
    }
    /// Whether no index is given (an empty list means "all layers" in PEFT).
    pub fn is_empty(&self) -> bool {
        matches!(self, LayerIndices::Many(v) if v.is_empty())
    }
}

/// `layers_pattern`: the name(s) of the layer list (`"layers"`, `"h"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One name.
    One(String),
    /// Names tried in order.
    Many(Vec<String>),
}

impl LayersPattern {
    /// The names, in order. `""` gives none: Python's `len("") == 0`, so PEFT falls back to
    /// its generic layer regex (`tuners_utils.py` `check_target_module_exists`).
    pub fn names(&self) -> Vec<&str> {
        match self {
            LayersPattern::One(s) if s.is_empty() => vec![],
            LayersPattern::One(s) => vec![s.as_str()],
            LayersPattern::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// The kind of layer a module is, for `all-linear` and for building the right LoRA layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear` (or a GPT-2 `Conv1D` with `fan_in_fan_out`).
    Linear,
    /// `nn.Embedding`.
    Embedding,
    /// `nn.Conv2d`.
    Conv2d,
}

/// A LoRA configuration, field for field PEFT's `LoraConfig` as saved in `adapter_config.json`.
///
/// Read → write is lossless: numbers keep the form they were written in (`16` stays `16`,
/// `16.0` stays `16.0`, `alpha_pattern` ints stay ints), unknown keys are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct LoraConfig {
    /// Always `"LORA"`; the only key PEFT requires.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// `CAUSAL_LM`, `SEQ_CLS`, ... or null.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Where the base model comes from (a hub id or a local path).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The rank `r` (default 8). Per-module ranks come from `rank_pattern` and the tensor shapes.
    #[serde(default = "default_r")]
    pub r: usize,
    /// The scaling numerator α (default 8).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout probability on the LoRA branch input (default 0).
    #[serde(default)]
    pub lora_dropout: f64,
    /// rsLoRA: scale by α/√r instead of α/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which modules to adapt; `None` means the architecture's default (Llama: `q_proj`, `v_proj`).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted, checked before `target_modules`.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Adapt only these layer indices (with a list `target_modules`).
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list that `layers_to_transform` indexes.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank overrides, regex → rank, tried in order.
    #[serde(default)]
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module alpha overrides, regex → alpha, tried in order.
    #[serde(default)]
    pub alpha_pattern: IndexMap<String, f64>,
    /// The base weight is stored `[in, out]` (GPT-2 `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// How A and B are initialised.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Which existing biases are trained.
    #[serde(default)]
    pub bias: Bias,
    /// A trainable bias on `lora_B` (not supported yet: refused).
    #[serde(default)]
    pub lora_bias: bool,
    /// Whole modules trained in full and saved with the adapter (PEFT's suffix match on module
    /// names; `SEQ_CLS` adds `classifier` and `score`, see [`crate::adapter::modules_to_save`]).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// DoRA (not supported yet: refused).
    #[serde(default)]
    pub use_dora: bool,
    /// Loaded frozen when true; PEFT always writes true.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other key, kept verbatim so that read → write loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Kept by the library, not part of the file's meaning: how the file wrote its numbers
    /// (so they are written back the same way) and the compiled targeting. Build configs with
    /// `..Default::default()` or `..LoraConfig::new(..)` to fill it.
    #[serde(skip)]
    #[doc(hidden)]
    pub internal: ConfigInternal,
}

/// See [`LoraConfig::internal`]. Compares equal always, so it does not take part in a
/// config's equality.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct ConfigInternal {
    /// How the file wrote its float fields.
    number_style: NumberStyle,
    /// The compiled targeting, built on first use and rebuilt if the fields it came from change.
    targeting: TargetingCache,
}

impl PartialEq for ConfigInternal {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Which float fields a file wrote in the other form than [`LoraConfig`] writes by default
/// (whole `lora_alpha` / `alpha_pattern` values as ints, `lora_dropout` as a float, as Python's
/// json writes PEFT's defaults).
#[derive(Debug, Clone, Default, PartialEq)]
struct NumberStyle {
    alpha_float: bool,
    dropout_int: bool,
    alpha_pattern_floats: BTreeSet<String>,
}

impl<'de> Deserialize<'de> for LoraConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = Value::deserialize(d)?;
        let is_float = |v: Option<&Value>| v.is_some_and(|n| n.is_f64());
        let style = NumberStyle {
            alpha_float: is_float(v.get("lora_alpha")),
            dropout_int: v
                .get("lora_dropout")
                .is_some_and(|n| n.is_i64() || n.is_u64()),
            alpha_pattern_floats: v
                .get("alpha_pattern")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter(|(_, n)| n.is_f64())
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default(),
        };
        let mut cfg = LoraConfig::deserialize(v).map_err(D::Error::custom)?;
        cfg.internal.number_style = style;
        Ok(cfg)
    }
}

impl Serialize for LoraConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let mut v =
            LoraConfig::serialize(self, serde_json::value::Serializer).map_err(S::Error::custom)?;
        let style = &self.internal.number_style;
        if let Value::Object(m) = &mut v {
            m.insert(
                "lora_alpha".into(),
                number(self.lora_alpha, !style.alpha_float),
            );
            m.insert(
                "lora_dropout".into(),
                number(self.lora_dropout, style.dropout_int),
            );
            let pattern: Map<String, Value> = self
                .alpha_pattern
                .iter()
                .map(|(k, a)| {
                    (
                        k.clone(),
                        number(*a, !style.alpha_pattern_floats.contains(k)),
                    )
                })
                .collect();
            m.insert("alpha_pattern".into(), Value::Object(pattern));
        }
        v.serialize(s)
    }
}

/// `v` as a JSON int when `as_int` and whole, else as a float (`16.0`).
fn number(v: f64, as_int: bool) -> Value {
    if as_int && v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// The compiled form of a config's targeting fields: every regex compiled once (PEFT.md §2.8,
/// §2.9). [`LoraConfig::targeting`] builds it and keeps it with the config.
#[derive(Debug)]
pub struct Targeting {
    source: TargetingSource,
    target: Option<Matcher>,
    exclude: Option<Matcher>,
    layers: Option<LayerIndices>,
    layer_res: Vec<Pattern>,
    rank: Vec<(Pattern, usize)>,
    alpha: Vec<(Pattern, f64)>,
}

/// The fields a [`Targeting`] was compiled from.
#[derive(Debug, Clone, PartialEq)]
struct TargetingSource {
    target_modules: Option<TargetModules>,
    exclude_modules: Option<TargetModules>,
    layers_to_transform: Option<LayerIndices>,
    layers_pattern: Option<LayersPattern>,
    rank_pattern: IndexMap<String, usize>,
    alpha_pattern: IndexMap<String, f64>,
}

#[derive(Debug)]
enum Matcher {
    List(Vec<String>),
    Regex(Pattern),
    AllLinear,
}

impl Matcher {
    fn is_match(&self, module: &str, kind: Option<ModuleKind>) -> bool {
        match self {
            Matcher::List(l) => target::list_match(l, module),
            Matcher::Regex(re) => re.is_match(module),
            Matcher::AllLinear => {
                kind == Some(ModuleKind::Linear) && module.rsplit('.').next() != Some("lm_head")
            }
        }
    }
}

impl Targeting {
    fn compile(source: TargetingSource) -> Result<Self> {
        // tuners_utils.py `_maybe_include_all_linear_layers`: `target_modules.lower() ==
        // "all-linear"` is the wildcard; `exclude_modules` has no such rule, so there
        // "all-linear" is a `re.fullmatch` pattern like any other string.
        let target = match &source.target_modules {
            None => None,
            Some(TargetModules::AllLinear) => Some(Matcher::AllLinear),
            Some(TargetModules::Regex(r)) if r.to_lowercase() == "all-linear" => {
                Some(Matcher::AllLinear)
            }
            Some(TargetModules::Regex(r)) => {
                Some(Matcher::Regex(target::full_regex("target_modules", r)?))
            }
            Some(TargetModules::List(l)) => Some(Matcher::List(l.clone())),
        };
        let exclude = match &source.exclude_modules {
            None => None,
            Some(TargetModules::AllLinear) => Some(Matcher::Regex(target::full_regex(
                "exclude_modules",
                "all-linear",
            )?)),
            Some(TargetModules::Regex(r)) => {
                Some(Matcher::Regex(target::full_regex("exclude_modules", r)?))
            }
            Some(TargetModules::List(l)) => Some(Matcher::List(l.clone())),
        };
        let names = source
            .layers_pattern
            .as_ref()
            .map(|p| p.names())
            .unwrap_or_default();
        let layer_res = target::layer_regexes(&names)?;
        let rank = source
            .rank_pattern
            .iter()
            .map(|(k, r)| Ok((target::suffix_regex("rank_pattern", k)?, *r)))
            .collect::<Result<_>>()?;
        let alpha = source
            .alpha_pattern
            .iter()
            .map(|(k, a)| Ok((target::suffix_regex("alpha_pattern", k)?, *a)))
            .collect::<Result<_>>()?;
        Ok(Targeting {
            layers: source.layers_to_transform.clone(),
            source,
            target,
            exclude,
            layer_res,
            rank,
            alpha,
        })
    }

    /// Whether PEFT puts an adapter on `module` (`tuners_utils.py`
    /// `check_target_module_exists`): exclusion first, then the string regex
    /// (`re.fullmatch`), or the list (exact or dot-aligned suffix) followed by the
    /// `layers_to_transform` filter. `kind` is `None` for a module that is not a Linear,
    /// Embedding or Conv2d (a norm, a decoder layer); `all-linear` never matches those.
    pub fn is_target(&self, module: &str, kind: Option<ModuleKind>) -> bool {
        if self
            .exclude
            .as_ref()
            .is_some_and(|e| e.is_match(module, kind))
        {
            return false;
        }
        let Some(targets) = &self.target else {
            return false;
        };
        let found = targets.is_match(module, kind);
        let Matcher::List(list) = targets else {
            return found;
        };
        // PEFT: `key in target_modules` skips the layer filter; a suffix match goes through it.
        let Some(layers) = self.layers.as_ref().filter(|l| !l.is_empty()) else {
            return found;
        };
        if !found || list.iter().any(|t| t == module) {
            return found;
        }
        target::layer_index(module, &self.layer_res).is_some_and(|i| layers.contains(i))
    }

    /// The `rank_pattern` rank of `module`, if a key matches (first in file order).
    pub fn rank_override(&self, module: &str) -> Option<usize> {
        self.rank
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map(|(_, r)| *r)
    }

    /// The `alpha_pattern` alpha of `module`, if a key matches (first in file order).
    pub fn alpha_override(&self, module: &str) -> Option<f64> {
        self.alpha
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map(|(_, a)| *a)
    }
}

/// The config's compiled [`Targeting`], shared by clones.
#[derive(Debug, Default)]
struct TargetingCache(Mutex<Option<Arc<Targeting>>>);

impl Clone for TargetingCache {
    fn clone(&self) -> Self {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        TargetingCache(Mutex::new(g.clone()))
    }
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: IndexMap::new(),
            alpha_pattern: IndexMap::new(),
            fan_in_fan_out: false,
            init_lora_weights: InitLoraWeights::Default,
            bias: Bias::None,
            lora_bias: false,
            modules_to_save: None,
            use_dora: false,
            inference_mode: false,
            extra: Map::new(),
            internal: ConfigInternal::default(),
        }
    }
}

/// Keys of `extra` that switch on PEFT features this library does not implement; a value other
/// than null / false / {} / [] is refused by [`LoraConfig::check_supported`].
const UNSUPPORTED_EXTRA: &[&str] = &[
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "target_parameters",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
];

impl LoraConfig {
    /// A config with rank `r`, alpha and list targets; other fields at PEFT's defaults.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Reads and validates `adapter_config.json` (or the file `path` names). Like PEFT's loader
    /// (`PeftConfig._get_peft_type` reads `loaded_attributes["peft_type"]`), a file without
    /// `peft_type` is refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::BadJson {
            path: path.into(),
            reason,
        };
        let raw: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if raw.get("peft_type").is_none() {
            return Err(Error::Config(format!(
                "{}: peft_type is missing: PEFT requires it in every adapter_config.json \
                 (MIN_EXPECTED_CONFIG_KEYS = {{\"peft_type\"}})",
                path.display()
            )));
        }
        let cfg: LoraConfig = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
        cfg.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(cfg)
    }

    /// The JSON PEFT would write: sorted keys, two-space indent, `peft_type` "LORA".
    pub fn to_json(&self) -> Result<String> {
        let v = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        let sorted = sort_keys(v);
        serde_json::to_string_pretty(&sorted).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks values that serde cannot: the PEFT type, rank, alpha, dropout, every regex, and
    /// the field combinations PEFT's `LoraConfig.__post_init__` rejects.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            return Err(Error::Config(format!(
                "peft_type is `{}`, only `LORA` adapters are supported",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(Error::Config(
                "r must be at least 1 (r = 0 is a plain linear layer, not an adapter)".into(),
            ));
        }
        if !self.lora_alpha.is_finite() {
            return Err(Error::Config("lora_alpha must be finite".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Config(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        for (k, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(Error::Config(format!("rank_pattern `{k}` gives rank 0")));
            }
        }
        for (k, a) in &self.alpha_pattern {
            if !a.is_finite() {
                return Err(Error::Config(format!("alpha_pattern `{k}` is not finite")));
            }
        }
        // tuners/lora/config.py `LoraConfig.__post_init__`, in its order.
        let string_targets = matches!(
            self.target_modules,
            Some(TargetModules::Regex(_) | TargetModules::AllLinear)
        );
        if string_targets && self.layers_to_transform.is_some() {
            return Err(Error::Config(
                "layers_to_transform needs target_modules to be a list: PEFT raises \
                 \"`layers_to_transform` cannot be used when `target_modules` is a str\""
                    .into(),
            ));
        }
        if string_targets && self.layers_pattern.is_some() {
            return Err(Error::Config(
                "layers_pattern needs target_modules to be a list: PEFT raises \
                 \"`layers_pattern` cannot be used when `target_modules` is a str\""
                    .into(),
            ));
        }
        let pattern_given = match &self.layers_pattern {
            Some(LayersPattern::One(s)) => !s.is_empty(),
            Some(LayersPattern::Many(v)) => !v.is_empty(),
            None => false,
        };
        if pattern_given && self.layers_to_transform.is_none() {
            return Err(Error::Config(
                "layers_pattern needs layers_to_transform: PEFT raises \"When `layers_pattern` \
                 is specified, `layers_to_transform` must also be specified\""
                    .into(),
            ));
        }
        self.targeting().map(|_| ())
    }

    /// The compiled targeting (every regex of the config compiled once, see [`Targeting`]). It
    /// is kept with the config and rebuilt only if the fields it came from were changed.
    pub fn targeting(&self) -> Result<Arc<Targeting>> {
        let source = TargetingSource {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
        };
        let mut cache = self
            .internal
            .targeting
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.as_ref().filter(|t| t.source == source) {
            return Ok(t.clone());
        }
        let t = Arc::new(Targeting::compile(source)?);
        *cache = Some(t.clone());
        Ok(t)
    }

    /// Refuses PEFT features this library would otherwise apply wrongly (DoRA, `lora_bias`,
    /// trainable tokens, base-rewriting inits, ...). Trained biases
    /// (`bias`) are refused by the builder, only where the model has such a bias.
    pub fn check_supported(&self) -> Result<()> {
        let refuse = |feature: &str, detail: String| {
            Err(Error::UnsupportedFeature {
                feature: feature.into(),
                detail,
            })
        };
        if self.use_dora && self.lora_bias {
            return refuse(
                "use_dora",
                "DoRA with lora_bias: true (PEFT refuses this combination too)".into(),
            );
        }
        if self.lora_bias {
            return refuse("lora_bias", "a bias on lora_B (lora_bias: true)".into());
        }
        // `bias: "all"` / `"lora_only"` are checked per layer by the builder: on a model whose
        // (targeted) layers have no bias PEFT trains nothing more and saves the same file as
        // `bias: "none"` (`tuners_utils.py` `_mark_only_adapters_as_trainable`,
        // `_get_learnable_bias_state_dict`).
        let implemented = |m: &InitLoraWeights| match m {
            InitLoraWeights::Other(s) => crate::layers::pissa::Method::parse(s).is_some(),
            _ => false,
        };
        if self.init_lora_weights.mutates_base() && !implemented(&self.init_lora_weights) {
            return refuse(
                "init_lora_weights",
                format!(
                    "{:?} rewrites the base weights; convert the adapter to plain LoRA first",
                    self.init_lora_weights
                ),
            );
        }
        for key in UNSUPPORTED_EXTRA {
            if let Some(v) = self.extra.get(*key) {
                let off = match v {
                    Value::Null | Value::Bool(false) => true,
                    Value::Object(m) => m.is_empty(),
                    Value::Array(a) => a.is_empty(),
                    _ => false,
                };
                if !off {
                    return refuse(key, format!("{key}: {v}"));
                }
            }
        }
        Ok(())
    }

    /// The rank PEFT gives `module`: the first `rank_pattern` key matching a dot-aligned suffix,
    /// else `r`. (PEFT `tuners/lora/model.py` `_create_and_replace`: `get_pattern_key` +
    /// `re.match(rf"(.*\.)?({key})$", name)`.) A config whose patterns do not compile gives `r`;
    /// [`LoraConfig::validate`] reports them.
    pub fn rank_for(&self, module: &str) -> usize {
        self.targeting()
            .ok()
            .and_then(|t| t.rank_override(module))
            .unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.targeting()
            .ok()
            .and_then(|t| t.alpha_override(module))
            .unwrap_or(self.lora_alpha)
    }

    /// The scale s for a module of rank `r`: α/r, or α/√r with rsLoRA.
    pub fn scaling(&self, alpha: f64, r: usize) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The scale of `module` with its pattern rank and alpha.
    pub fn scaling_for(&self, module: &str) -> f64 {
        self.scaling(self.alpha_for(module), self.rank_for(module))
    }

    /// Whether PEFT would put an adapter on `module` (full dotted name, without the
    /// `base_model.model.` prefix). `target_modules: None` matches nothing: callers that have an
    /// architecture default use [`LoraConfig::with_default_targets`] first.
    pub fn is_target(&self, module: &str, kind: ModuleKind) -> Result<bool> {
        Ok(self.targeting()?.is_target(module, Some(kind)))
    }

    /// Fills `target_modules` with `defaults` when it is unset (PEFT's per-architecture default).
    pub fn with_default_targets(mut self, defaults: &[&str]) -> Self {
        if self.target_modules.is_none() {
            self.target_modules = Some(TargetModules::List(
                defaults.iter().map(|s| s.to_string()).collect(),
            ));
        }
        self
    }
}

fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str =
        include_str!("../tests/fixtures/tinynet_linear/adapter/adapter_config.json");

    #[test]
    fn peft_config_reads_with_its_values_and_keeps_unknown_keys() {
        let cfg: LoraConfig = serde_json::from_str(FIXTURE).unwrap();
        assert_eq!(cfg.r, 4);
        assert_eq!(cfg.lora_alpha, 8.0);
        assert_eq!(cfg.init_lora_weights, InitLoraWeights::Random);
        assert_eq!(
            cfg.target_modules,
            Some(TargetModules::List(vec!["v".into(), "q".into()])) // PEFT writes a set: arbitrary order
        );
        assert_eq!(cfg.extra["peft_version"], Value::from("0.21.2"));
        assert_eq!(cfg.extra["qalora_group_size"], Value::from(16));
        cfg.validate().unwrap();
        cfg.check_supported().unwrap();
    }

    #[test]
    fn config_round_trips_without_loss() {
        let original: Value = serde_json::from_str(FIXTURE).unwrap();
        let cfg: LoraConfig = serde_json::from_str(FIXTURE).unwrap();
        let written: Value = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
        assert_eq!(written, original);
    }

    #[test]
    fn defaults_are_peft_defaults() {
        let cfg: LoraConfig = serde_json::from_str(r#"{"peft_type":"LORA"}"#).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha, cfg.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(cfg.bias, Bias::None);
        assert_eq!(cfg.init_lora_weights, InitLoraWeights::Default);
        assert!(!cfg.use_rslora && !cfg.fan_in_fan_out && !cfg.use_dora);
    }

    #[test]
    fn strings_become_enums() {
        let cfg: LoraConfig = serde_json::from_str(
            r#"{"target_modules":"all-linear","init_lora_weights":"gaussian","bias":"lora_only",
                "exclude_modules":".*head"}"#,
        )
        .unwrap();
        assert_eq!(cfg.target_modules, Some(TargetModules::AllLinear));
        assert_eq!(cfg.init_lora_weights, InitLoraWeights::Gaussian);
        assert_eq!(cfg.bias, Bias::LoraOnly);
        assert_eq!(
            cfg.exclude_modules,
            Some(TargetModules::Regex(".*head".into()))
        );
    }

    #[test]
    fn rslora_and_pattern_scaling() {
        let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
        assert_eq!(cfg.scaling_for("model.layers.0.self_attn.q_proj"), 2.0);
        cfg.use_rslora = true;
        assert_eq!(cfg.scaling_for("model.layers.0.self_attn.q_proj"), 4.0);
        cfg.use_rslora = false;
        // PEFT.md §2.8, verified against PEFT: ranks q=4, v=2, down=6.
        cfg.rank_pattern.insert("self_attn.v_proj".into(), 2);
        cfg.rank_pattern.insert(r"layers\.0\.mlp\..*".into(), 6);
        cfg.alpha_pattern.insert("v_proj".into(), 1.0);
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.v_proj"), 2);
        assert_eq!(cfg.rank_for("model.layers.0.mlp.down_proj"), 6);
        assert_eq!(cfg.rank_for("model.layers.1.mlp.down_proj"), 4);
        assert_eq!(cfg.scaling_for("model.layers.0.self_attn.v_proj"), 0.5);
        assert_eq!(cfg.scaling_for("model.layers.0.mlp.down_proj"), 8.0 / 6.0);
        cfg.use_rslora = true;
        assert_eq!(
            cfg.scaling_for("model.layers.0.mlp.down_proj"),
            8.0 / 6f64.sqrt()
        );
    }

    #[test]
    fn pattern_keys_are_tried_in_file_order() {
        let cfg: LoraConfig =
            serde_json::from_str(r#"{"rank_pattern": {"q_proj": 2, ".*proj": 16}}"#).unwrap();
        assert_eq!(cfg.rank_for("a.q_proj"), 2);
        let cfg: LoraConfig =
            serde_json::from_str(r#"{"rank_pattern": {".*proj": 16, "q_proj": 2}}"#).unwrap();
        assert_eq!(cfg.rank_for("a.q_proj"), 16);
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let bad = |json: &str| {
            let cfg: LoraConfig = serde_json::from_str(json).unwrap();
            cfg.validate().unwrap_err().to_string()
        };
        assert!(bad(r#"{"r": 0}"#).contains("r must be at least 1"));
        assert!(bad(r#"{"lora_dropout": 1.5}"#).contains("lora_dropout"));
        assert!(bad(r#"{"peft_type": "IA3"}"#).contains("IA3"));
        let e = bad(r#"{"target_modules": "q_proj("}"#);
        assert!(e.contains("target_modules") && e.contains("q_proj("), "{e}");
        let e = bad(r#"{"rank_pattern": {"(": 2}}"#);
        assert!(e.contains("rank_pattern"), "{e}");
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let refused = |json: &str| {
            let cfg: LoraConfig = serde_json::from_str(json).unwrap();
            cfg.check_supported().unwrap_err().to_string()
        };
        assert!(refused(r#"{"use_dora": true, "lora_bias": true}"#).contains("use_dora"));
        assert!(refused(r#"{"lora_bias": true}"#).contains("lora_bias"));
        assert!(refused(r#"{"trainable_token_indices": [1, 2]}"#).contains("trainable_token"));
        assert!(refused(r#"{"init_lora_weights": "loftq"}"#).contains("loftq"));
        let pissa: LoraConfig = serde_json::from_str(r#"{"init_lora_weights": "pissa"}"#).unwrap();
        pissa.check_supported().unwrap();
        let ok: LoraConfig =
            serde_json::from_str(r#"{"trainable_token_indices": null, "loftq_config": {}}"#)
                .unwrap();
        ok.check_supported().unwrap();
    }
}

/// PEFT's targeting rules and the fields it rejects (`tuners_utils.py`
/// `check_target_module_exists`, `tuners/lora/config.py` `__post_init__`), each with the minimal
/// input that used to differ (issue 13, items 6, 7, 8 and 11).
#[cfg(test)]
mod targeting_tests {
    use super::*;

    const Q0: &str = "model.layers.0.self_attn.q_proj";
    const K0: &str = "model.layers.0.self_attn.k_proj";
    const Q1: &str = "model.layers.1.self_attn.q_proj";
    const DOWN1: &str = "model.layers.1.mlp.down_proj";
    const HEAD: &str = "lm_head";
    const EMB: &str = "model.embed_tokens";

    fn cfg(json: &str) -> LoraConfig {
        let c: LoraConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        c
    }

    fn hits(c: &LoraConfig, names: &[(&str, ModuleKind)]) -> Vec<String> {
        names
            .iter()
            .filter(|(n, k)| c.is_target(n, *k).unwrap())
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// A table of PEFT's matching rules; each row is (config, names that must match).
    #[test]
    fn matching_rules_table() {
        use ModuleKind::*;
        let names = [
            (Q0, Linear),
            (K0, Linear),
            (Q1, Linear),
            (DOWN1, Linear),
            (HEAD, Linear),
            (EMB, Embedding),
        ];
        let table: &[(&str, &[&str])] = &[
            // list: exact or dot-aligned suffix
            (r#"{"target_modules": ["q_proj"]}"#, &[Q0, Q1]),
            (r#"{"target_modules": ["proj"]}"#, &[]),
            (r#"{"target_modules": ["self_attn.q_proj"]}"#, &[Q0, Q1]),
            (
                r#"{"target_modules": ["layers.1.mlp.down_proj"]}"#,
                &[DOWN1],
            ),
            (
                r#"{"target_modules": ["lm_head", "embed_tokens"]}"#,
                &[HEAD, EMB],
            ),
            // string: regex full match
            (r#"{"target_modules": "q_proj"}"#, &[]),
            (
                r#"{"target_modules": ".*\\.0\\.self_attn\\.(q|k)_proj"}"#,
                &[Q0, K0],
            ),
            (r#"{"target_modules": ".*_proj"}"#, &[Q0, K0, Q1, DOWN1]),
            // exclusion wins
            (
                r#"{"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["k_proj"]}"#,
                &[Q0, Q1],
            ),
            (
                r#"{"target_modules": ".*_proj", "exclude_modules": ".*layers\\.1\\..*"}"#,
                &[Q0, K0],
            ),
            // layers_to_transform
            (
                r#"{"target_modules": ["q_proj"], "layers_to_transform": [1]}"#,
                &[Q1],
            ),
            (
                r#"{"target_modules": ["q_proj"], "layers_to_transform": 0}"#,
                &[Q0],
            ),
            (
                r#"{"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}"#,
                &[Q0],
            ),
            (
                r#"{"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "h"}"#,
                &[],
            ),
            (
                r#"{"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": "h"}"#,
                &[Q0, Q1],
            ),
            // all-linear: every Linear but the output head
            (r#"{"target_modules": "all-linear"}"#, &[Q0, K0, Q1, DOWN1]),
            // no targets: nothing
            (r#"{}"#, &[]),
        ];
        for (json, want) in table {
            assert_eq!(hits(&cfg(json), &names), *want, "config {json}");
        }
    }

    #[test]
    fn layers_pattern_list_is_tried_in_order() {
        let mut c = cfg(r#"{"target_modules": ["q_proj"], "layers_to_transform": [0]}"#);
        c.layers_pattern = Some(LayersPattern::Many(vec!["h".into(), "layers".into()]));
        assert!(c.is_target(Q0, ModuleKind::Linear).unwrap());
        c.layers_to_transform = Some(LayerIndices::Many(vec![5]));
        assert!(!c.is_target(Q0, ModuleKind::Linear).unwrap());
    }

    #[test]
    fn regexes_are_python_fullmatch_with_look_around() {
        // Item 7: a negative look-ahead, legal in Python's `re`.
        let c = cfg(r#"{"target_modules": ".*\\.(?!k_)[a-z]_proj"}"#);
        assert!(c.is_target(Q0, ModuleKind::Linear).unwrap());
        assert!(!c.is_target(K0, ModuleKind::Linear).unwrap());
        let c =
            cfg(r#"{"target_modules": ["q_proj", "k_proj"], "exclude_modules": ".*(?<=k_proj)"}"#);
        assert!(c.is_target(Q0, ModuleKind::Linear).unwrap());
        assert!(!c.is_target(K0, ModuleKind::Linear).unwrap());
        let c = cfg(r#"{"rank_pattern": {".*(?<!k_)proj": 2}}"#);
        assert_eq!((c.rank_for(Q0), c.rank_for(K0)), (2, 8));
    }

    #[test]
    fn all_linear_is_case_insensitive_as_target_and_a_plain_regex_as_exclusion() {
        // Item 7: PEFT lower-cases `target_modules` before comparing with "all-linear" ...
        let c = cfg(r#"{"target_modules": "ALL-LINEAR"}"#);
        assert!(c.is_target(Q0, ModuleKind::Linear).unwrap());
        assert!(!c.is_target(HEAD, ModuleKind::Linear).unwrap());
        assert!(!c.is_target(EMB, ModuleKind::Embedding).unwrap());
        // ... and the original spelling is what is written back.
        assert!(c
            .to_json()
            .unwrap()
            .contains(r#""target_modules": "ALL-LINEAR""#));
        // ... but `exclude_modules: "all-linear"` is `re.fullmatch("all-linear", key)`: nothing.
        let c = cfg(r#"{"target_modules": ["q_proj"], "exclude_modules": "all-linear"}"#);
        assert!(c.is_target(Q0, ModuleKind::Linear).unwrap());
    }

    #[test]
    fn empty_layers_pattern_falls_back_to_the_generic_layer_regex() {
        // Item 8: `len("") == 0`, so PEFT uses `.*?\.[^.]*\.(\d+)\.`.
        let c = cfg(
            r#"{"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ""}"#,
        );
        assert!(!c.is_target(Q0, ModuleKind::Linear).unwrap());
        assert!(c.is_target(Q1, ModuleKind::Linear).unwrap());
        // PEFT's `(?:^|.*?\.)<pattern>`: the layer list may open the name.
        let c = cfg(
            r#"{"target_modules": ["attn.c_attn"], "layers_to_transform": [2], "layers_pattern": "h"}"#,
        );
        assert!(c.is_target("h.2.attn.c_attn", ModuleKind::Linear).unwrap());
        assert!(!c.is_target("h.1.attn.c_attn", ModuleKind::Linear).unwrap());
    }

    #[test]
    fn configs_peft_rejects_are_refused_with_the_field_and_rule() {
        // Item 6.
        let refused = |json: &str| {
            let c: LoraConfig = serde_json::from_str(json).unwrap();
            c.validate().unwrap_err().to_string()
        };
        for json in [
            r#"{"target_modules": ".*q_proj", "layers_to_transform": [0]}"#,
            r#"{"target_modules": "all-linear", "layers_to_transform": [0]}"#,
        ] {
            let e = refused(json);
            assert!(
                e.contains("layers_to_transform") && e.contains("is a str"),
                "{e}"
            );
        }
        let e = refused(r#"{"target_modules": ".*q_proj", "layers_pattern": "layers"}"#);
        assert!(
            e.contains("layers_pattern") && e.contains("is a str"),
            "{e}"
        );
        let e = refused(r#"{"target_modules": ["q_proj"], "layers_pattern": "layers"}"#);
        assert!(
            e.contains("layers_pattern needs layers_to_transform"),
            "{e}"
        );
        // PEFT's truthiness: an empty pattern without indices is fine.
        cfg(r#"{"target_modules": ["q_proj"], "layers_pattern": ""}"#);
    }

    #[test]
    fn a_file_without_peft_type_is_refused() {
        // Item 6: PEFT's loader reads `loaded_attributes["peft_type"]`.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CONFIG_FILE);
        std::fs::write(&p, r#"{"r": 4, "target_modules": ["q_proj"]}"#).unwrap();
        let e = LoraConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("peft_type is missing") && e.contains("adapter_config.json"),
            "{e}"
        );
        std::fs::write(
            &p,
            r#"{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}"#,
        )
        .unwrap();
        LoraConfig::from_file(&p).unwrap();
    }

    #[test]
    fn numbers_are_written_back_as_they_were_read() {
        // Item 11.
        for json in [
            r#"{"alpha_pattern": {"q_proj": 32, "v_proj": 4.5, "k_proj": 8.0}, "lora_alpha": 16.0, "lora_dropout": 0}"#,
            r#"{"alpha_pattern": {}, "lora_alpha": 16, "lora_dropout": 0.0}"#,
        ] {
            let original: Value = serde_json::from_str(json).unwrap();
            let c: LoraConfig = serde_json::from_str(json).unwrap();
            let written: Value = serde_json::from_str(&c.to_json().unwrap()).unwrap();
            for key in ["alpha_pattern", "lora_alpha", "lora_dropout"] {
                // Value equality tells 16 from 16.0.
                assert_eq!(written[key], original[key], "{key} in {json}");
            }
        }
        assert!(LoraConfig::new(4, 16.0, &["q"])
            .to_json()
            .unwrap()
            .contains(r#""lora_alpha": 16,"#));
    }

    #[test]
    fn targeting_is_compiled_once_and_rebuilt_when_its_fields_change() {
        let mut c = cfg(r#"{"target_modules": ".*_proj", "rank_pattern": {"v_proj": 2}}"#);
        let first = c.targeting().unwrap();
        assert!(Arc::ptr_eq(&first, &c.targeting().unwrap()));
        let _ = (c.rank_for(Q0), c.is_target(Q0, ModuleKind::Linear).unwrap());
        assert!(Arc::ptr_eq(&first, &c.targeting().unwrap()));
        c.rank_pattern.insert("q_proj".into(), 6);
        assert!(!Arc::ptr_eq(&first, &c.targeting().unwrap()));
        assert_eq!(c.rank_for(Q0), 6);
    }
}
