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

use std::path::Path;

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::target;

/// The name of the config file in an adapter directory, as PEFT writes it.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Which modules get a LoRA adapter (`target_modules` / `exclude_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Names matched exactly or as a dot-aligned suffix (`"q_proj"` matches `model.layers.0.self_attn.q_proj`).
    List(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// Every linear layer except the output head (`lm_head`), as PEFT's `"all-linear"`.
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
    /// The names, in order.
    pub fn names(&self) -> Vec<&str> {
        match self {
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(default = "default_alpha", serialize_with = "ser_number")]
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

/// Writes whole numbers as JSON integers (`16`, not `16.0`), as Python's json does for ints.
fn ser_number<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
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

    /// Reads and validates `adapter_config.json` (or the file `path` names).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: LoraConfig = serde_json::from_str(&text).map_err(|e| Error::BadJson {
            path: path.into(),
            reason: e.to_string(),
        })?;
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

    /// Checks values that serde cannot: the PEFT type, rank, alpha, dropout and every regex.
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
            target::suffix_regex("rank_pattern", k)?;
        }
        for (k, a) in &self.alpha_pattern {
            if !a.is_finite() {
                return Err(Error::Config(format!("alpha_pattern `{k}` is not finite")));
            }
            target::suffix_regex("alpha_pattern", k)?;
        }
        for (field, t) in [
            ("target_modules", &self.target_modules),
            ("exclude_modules", &self.exclude_modules),
        ] {
            if let Some(TargetModules::Regex(re)) = t {
                target::full_regex(field, re)?;
            }
        }
        if self.layers_to_transform.is_some()
            && matches!(self.target_modules, Some(TargetModules::Regex(_)))
        {
            return Err(Error::Config(
                "layers_to_transform needs target_modules to be a list, not a regex".into(),
            ));
        }
        Ok(())
    }

    /// Refuses PEFT features this library would otherwise apply wrongly (DoRA, `lora_bias`,
    /// trained biases, trainable tokens, base-rewriting inits, ...).
    pub fn check_supported(&self) -> Result<()> {
        let refuse = |feature: &str, detail: String| {
            Err(Error::UnsupportedFeature {
                feature: feature.into(),
                detail,
            })
        };
        if self.use_dora {
            return refuse("use_dora", "DoRA adapters (use_dora: true)".into());
        }
        if self.lora_bias {
            return refuse("lora_bias", "a bias on lora_B (lora_bias: true)".into());
        }
        if self.bias != Bias::None {
            return refuse(
                "bias",
                format!("trained base biases (bias: {:?})", self.bias),
            );
        }
        if self.init_lora_weights.mutates_base() {
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
    /// else `r`. (PEFT: `get_pattern_key` + `re.match(rf"(.*\.)?({key})$", name)`.)
    pub fn rank_for(&self, module: &str) -> usize {
        target::pattern_lookup(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module` (`alpha_pattern`, else `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        target::pattern_lookup(&self.alpha_pattern, module)
            .copied()
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
        target::is_target(self, module, kind)
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
        assert!(refused(r#"{"use_dora": true}"#).contains("use_dora"));
        assert!(refused(r#"{"lora_bias": true}"#).contains("lora_bias"));
        assert!(refused(r#"{"trainable_token_indices": [1, 2]}"#).contains("trainable_token"));
        assert!(refused(r#"{"init_lora_weights": "pissa"}"#).contains("pissa"));
        let ok: LoraConfig =
            serde_json::from_str(r#"{"trainable_token_indices": null, "loftq_config": {}}"#)
                .unwrap();
        ok.check_supported().unwrap();
    }
}
