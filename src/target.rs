//! PEFT's regex dialect and name-matching primitives, ported from
//! `tuners_utils.check_target_module_exists` and `utils.other.{match_target_against_key,
//! get_pattern_key}` (PEFT.md §2.8, §2.9). This module knows nothing of the config: the config
//! ([`crate::config::Targeting`]) compiles its patterns here once and applies these rules.
//!
//! - A string pattern is Python's `re.fullmatch`: the whole name must match. The dialect is
//!   `fancy-regex`, which has Python's look-around and backreferences (the `regex` crate has not).
//! - A list matches a name exactly, or as a dot-aligned suffix (`"q_proj"` matches
//!   `model.layers.0.self_attn.q_proj`, `"proj"` matches nothing).
//! - `rank_pattern` / `alpha_pattern` keys are PEFT's `re.match(rf"(.*\.)?({key})$", name)`.
//! - The layer index for `layers_to_transform` is the **first** `<pattern>.<idx>.` in the name.

use fancy_regex::Regex;

use crate::error::{Error, Result};

/// A compiled pattern, with the text it was written as.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    re: Regex,
}

impl Pattern {
    /// The pattern as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches `name` (as compiled: whole name, suffix or prefix form). A
    /// match that exceeds the backtracking limit counts as no match.
    pub fn is_match(&self, name: &str) -> bool {
        self.re.is_match(name).unwrap_or(false)
    }

    /// The first capture group's text, for the layer-index patterns.
    fn capture(&self, name: &str) -> Option<String> {
        let caps = self.re.captures(name).ok()??;
        Some(caps.get(1)?.as_str().to_string())
    }
}

/// Compiles `pattern` as Python's `re.fullmatch(pattern, name)`
/// (PEFT `utils/other.py` `match_target_against_key`).
pub fn full_regex(field: &'static str, pattern: &str) -> Result<Pattern> {
    compile(field, pattern, &format!(r"^(?:{pattern})\z"))
}

/// Compiles `pattern` as PEFT's `re.match(rf"(.*\.)?({key})$", name)`
/// (`utils/other.py` `get_pattern_key`): a regex matched against a dot-aligned suffix.
pub fn suffix_regex(field: &'static str, pattern: &str) -> Result<Pattern> {
    compile(field, pattern, &format!(r"^(?:.*\.)?(?:{pattern})\z"))
}

/// The layer-index regexes PEFT tries for `layers_to_transform`, in order
/// (`tuners_utils.py` `check_target_module_exists`): with no pattern (`None`, `""` or `[]`, all
/// of length 0 in Python) the generic `.*?\.[^.]*\.(\d+)\.`, else `(?:^|.*?\.){p}\.(\d+)\.`
/// for each `p`, matched at the start of the name.
pub fn layer_regexes(layers_pattern: &[&str]) -> Result<Vec<Pattern>> {
    if layers_pattern.is_empty() {
        return Ok(vec![compile(
            "layers_pattern",
            "",
            r"^.*?\.[^.]*\.(\d+)\.",
        )?]);
    }
    layers_pattern
        .iter()
        .map(|p| compile("layers_pattern", p, &format!(r"^(?:^|.*?\.){p}\.(\d+)\.")))
        .collect()
}

/// The layer index the first of `regexes` to match finds in `module`, if any.
pub fn layer_index(module: &str, regexes: &[Pattern]) -> Option<usize> {
    regexes
        .iter()
        .find_map(|re| re.capture(module))
        .and_then(|i| i.parse().ok())
}

fn compile(field: &'static str, pattern: &str, full: &str) -> Result<Pattern> {
    let re = Regex::new(full).map_err(|e| Error::BadRegex {
        field,
        pattern: pattern.to_string(),
        reason: e
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string(),
    })?;
    Ok(Pattern {
        source: pattern.to_string(),
        re,
    })
}

/// PEFT's list rule: `key in targets or any(key.endswith("." + t) for t in targets)`.
pub fn list_match(list: &[String], module: &str) -> bool {
    list.iter().any(|t| {
        module == t
            || (module.len() > t.len()
                && module.ends_with(t.as_str())
                && module.as_bytes()[module.len() - t.len() - 1] == b'.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fullmatch_needs_the_whole_name_and_allows_look_around() {
        let re = full_regex("target_modules", r".*\.(?!k_)[a-z]_proj").unwrap();
        assert!(re.is_match("model.layers.0.self_attn.q_proj"));
        assert!(!re.is_match("model.layers.0.self_attn.k_proj"));
        let re = full_regex("target_modules", "q_proj").unwrap();
        assert!(!re.is_match("model.layers.0.self_attn.q_proj"));
        assert!(re.is_match("q_proj"));
        // alternation binds inside the anchors, as in re.fullmatch
        let re = full_regex("target_modules", "a|b").unwrap();
        assert!(!re.is_match("ab"));
    }

    #[test]
    fn layer_index_takes_the_first_match() {
        let generic = layer_regexes(&[]).unwrap();
        assert_eq!(
            layer_index("model.layers.1.self_attn.q_proj", &generic),
            Some(1)
        );
        assert_eq!(
            layer_index("model.layers.3.mlp.experts.7.up", &generic),
            Some(3)
        );
        let experts = layer_regexes(&["experts"]).unwrap();
        assert_eq!(
            layer_index("model.layers.3.mlp.experts.7.up", &experts),
            Some(7)
        );
        assert_eq!(layer_index("lm_head", &generic), None);
        // PEFT's `(?:^|.*?\.)`: the layer list may be the first component.
        let h = layer_regexes(&["h"]).unwrap();
        assert_eq!(layer_index("h.2.attn.c_attn", &h), Some(2));
    }
}
