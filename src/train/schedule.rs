//! Learning-rate schedules with linear warmup, as transformers' `get_*_schedule_with_warmup`.
//!
//! The learning rate of optimizer step `s` (0-based: the first update uses `s = 0`, as PyTorch's
//! `LambdaLR` before its first `scheduler.step()`) is `base_lr · λ(s)` with, for warmup `w` and
//! `T` total steps:
//!
//! ```text
//! s < w:     λ = s / max(1, w)                                   (all schedules)
//! constant:  λ = 1
//! linear:    λ = max(0, (T − s) / max(1, T − w))
//! cosine:    p = (s − w) / max(1, T − w);  λ = max(0, ½·(1 + cos(π·p)))   (num_cycles = ½)
//! ```
//!
//! So with warmup the first update has learning rate 0, exactly as in transformers' Trainer.

use std::str::FromStr;

use crate::error::{Error, Result};

/// The shape of the learning-rate curve after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after warmup (`get_constant_schedule_with_warmup`).
    Constant,
    /// Linear decay to 0 at the last step (`get_linear_schedule_with_warmup`).
    #[default]
    Linear,
    /// Half a cosine down to 0 (`get_cosine_schedule_with_warmup`, `num_cycles = 0.5`).
    Cosine,
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::Config(format!(
                "unknown schedule `{other}` (expected constant, linear or cosine)"
            ))),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        })
    }
}

impl Schedule {
    /// The multiplier `λ(step)` for `warmup` warmup steps out of `total` (see the module doc).
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of step `step`: `base_lr · λ(step)`.
    pub fn lr(self, base_lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
        base_lr * self.factor(step, warmup, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_constant() {
        let f = |s| Schedule::Constant.factor(s, 4, 10);
        assert!(close(f(0), 0.0) && close(f(1), 0.25) && close(f(3), 0.75));
        assert!(close(f(4), 1.0) && close(f(9), 1.0) && close(f(50), 1.0));
        // No warmup: the first step already has the full rate.
        assert!(close(Schedule::Constant.factor(0, 0, 10), 1.0));
    }

    #[test]
    fn warmup_then_linear_decay_to_zero() {
        // transformers: max(0, (T - s) / max(1, T - w)) with T = 10, w = 2.
        let f = |s| Schedule::Linear.factor(s, 2, 10);
        assert!(close(f(0), 0.0) && close(f(1), 0.5));
        assert!(close(f(2), 1.0));
        assert!(close(f(3), 7.0 / 8.0));
        assert!(close(f(6), 0.5));
        assert!(close(f(9), 1.0 / 8.0));
        assert!(close(f(10), 0.0) && close(f(12), 0.0));
        assert!(close(Schedule::Linear.factor(0, 0, 4), 1.0));
        assert!(close(Schedule::Linear.factor(3, 0, 4), 0.25));
        assert!(close(Schedule::Linear.lr(2e-4, 3, 0, 4), 5e-5));
    }

    #[test]
    fn warmup_then_half_cosine() {
        // p = (s - w)/(T - w), λ = ½(1 + cos πp), T = 12, w = 2.
        let f = |s| Schedule::Cosine.factor(s, 2, 12);
        assert!(close(f(1), 0.5));
        assert!(close(f(2), 1.0));
        assert!(close(f(7), 0.5)); // p = ½
        let p: f64 = 3.0 / 10.0;
        assert!(close(f(5), 0.5 * (1.0 + (std::f64::consts::PI * p).cos())));
        assert!(close(f(12), 0.0));
    }

    #[test]
    fn parses_names() {
        assert_eq!("cosine".parse::<Schedule>().unwrap(), Schedule::Cosine);
        let e = "step".parse::<Schedule>().unwrap_err().to_string();
        assert!(e.contains("`step`"), "{e}");
    }
}
