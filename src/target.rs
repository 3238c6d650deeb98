//! PEFT's module-matching rules, ported from `tuners_utils.check_target_module_exists` and
//! `utils.other.get_pattern_key` (PEFT.md §2.8, §2.9):
//!
//! 1. `exclude_modules` first: excluded modules are never adapted.
//! 2. A string `target_modules` is a regex that must match the **whole** module name.
//! 3. A list matches a name exactly, or as a dot-aligned suffix (`"q_proj"` matches
//!    `model.layers.0.self_attn.q_proj`, `"proj"` matches nothing).
//! 4. `layers_to_transform` (list targets only) keeps a suffix match only when the first
//!    `<layers_pattern>.<idx>.` in the name has an index in the set.
//! 5. `"all-linear"` is every linear layer except the output head `lm_head`.
//!
//! `rank_pattern` / `alpha_pattern` keys are tried in order with `(.*\.)?(key)$` anchored at
//! the start: a regex matched against a dot-aligned suffix.

use indexmap::IndexMap;
use regex::Regex;

use crate::config::{LoraConfig, ModuleKind, TargetModules};
use crate::error::{Error, Result};

/// Compiles `pattern` as a whole-string match (Python's `re.fullmatch`).
pub(crate) fn full_regex(field: &'static str, pattern: &str) -> Result<Regex> {
    compile(field, pattern, &format!("^(?:{pattern})$"))
}

/// Compiles `pattern` as PEFT's pattern-key match `(.*\.)?(pattern)$` at the start.
pub(crate) fn suffix_regex(field: &'static str, pattern: &str) -> Result<Regex> {
    compile(field, pattern, &format!(r"^(?:.*\.)?(?:{pattern})$"))
}

fn compile(field: &'static str, pattern: &str, full: &str) -> Result<Regex> {
    Regex::new(full).map_err(|e| Error::BadRegex {
        field,
        pattern: pattern.to_string(),
        reason: e
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string(),
    })
}

/// The value of the first key of `patterns` that matches `module` (dict order, as PEFT).
/// Keys that fail to compile never match; [`LoraConfig::validate`] reports them.
pub(crate) fn pattern_lookup<'a, T>(
    patterns: &'a IndexMap<String, T>,
    module: &str,
) -> Option<&'a T> {
    patterns.iter().find_map(|(k, v)| {
        suffix_regex("pattern", k)
            .ok()
            .filter(|re| re.is_match(module))
            .map(|_| v)
    })
}

/// Exact or dot-aligned suffix match of `module` against a list of names.
fn list_match(list: &[String], module: &str) -> bool {
    list.iter().any(|t| {
        module == t
            || (module.len() > t.len()
                && module.ends_with(t.as_str())
                && module.as_bytes()[module.len() - t.len() - 1] == b'.')
    })
}

fn matches(field: &'static str, t: &TargetModules, module: &str, kind: ModuleKind) -> Result<bool> {
    Ok(match t {
        TargetModules::Regex(re) => full_regex(field, re)?.is_match(module),
        TargetModules::List(list) => list_match(list, module),
        TargetModules::AllLinear => {
            kind == ModuleKind::Linear && module.rsplit('.').next() != Some("lm_head")
        }
    })
}

/// The layer index PEFT reads from `module` for `layers_to_transform`, if any.
pub fn layer_index(module: &str, layers_pattern: Option<&[&str]>) -> Option<usize> {
    let patterns: Vec<String> = match layers_pattern {
        Some(p) if !p.is_empty() => p.iter().map(|p| format!(r"^.*?\.{}\.(\d+)\.", p)).collect(),
        _ => vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()],
    };
    patterns.iter().find_map(|p| {
        Regex::new(p)
            .ok()?
            .captures(module)?
            .get(1)?
            .as_str()
            .parse()
            .ok()
    })
}

/// Whether `cfg` puts an adapter on `module` of kind `kind` (see the module doc).
pub fn is_target(cfg: &LoraConfig, module: &str, kind: ModuleKind) -> Result<bool> {
    if let Some(ex) = &cfg.exclude_modules {
        if matches("exclude_modules", ex, module, kind)? {
            return Ok(false);
        }
    }
    let Some(targets) = &cfg.target_modules else {
        return Ok(false);
    };
    let found = matches("target_modules", targets, module, kind)?;
    let TargetModules::List(list) = targets else {
        return Ok(found);
    };
    let Some(layers) = cfg.layers_to_transform.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(found);
    };
    // PEFT: an exact name match skips the layer filter; a suffix match goes through it.
    if !found || list.iter().any(|t| t == module) {
        return Ok(found);
    }
    let names = cfg.layers_pattern.as_ref().map(|p| p.names());
    Ok(layer_index(module, names.as_deref()).is_some_and(|i| layers.contains(i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LayerIndices, LayersPattern};

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
            .filter(|(n, k)| is_target(c, n, *k).unwrap())
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
    fn layer_index_takes_the_first_match() {
        assert_eq!(layer_index(Q1, None), Some(1));
        assert_eq!(
            layer_index("model.layers.3.mlp.experts.7.up", None),
            Some(3)
        );
        assert_eq!(
            layer_index("model.layers.3.mlp.experts.7.up", Some(&["experts"])),
            Some(7)
        );
        assert_eq!(layer_index("lm_head", None), None);
    }

    #[test]
    fn pattern_order_is_respected_in_lookup() {
        let mut m = IndexMap::new();
        m.insert("v_proj".to_string(), 1);
        m.insert(r".*\.1\..*".to_string(), 2);
        assert_eq!(
            pattern_lookup(&m, "model.layers.1.self_attn.v_proj"),
            Some(&1)
        );
        assert_eq!(
            pattern_lookup(&m, "model.layers.1.self_attn.q_proj"),
            Some(&2)
        );
        assert_eq!(pattern_lookup(&m, "model.layers.0.self_attn.q_proj"), None);
    }

    #[test]
    fn layers_pattern_list_is_tried_in_order() {
        let mut c = cfg(r#"{"target_modules": ["q_proj"], "layers_to_transform": [0]}"#);
        c.layers_pattern = Some(LayersPattern::Many(vec!["h".into(), "layers".into()]));
        assert!(is_target(&c, Q0, ModuleKind::Linear).unwrap());
        c.layers_to_transform = Some(LayerIndices::Many(vec![5]));
        assert!(!is_target(&c, Q0, ModuleKind::Linear).unwrap());
    }
}
