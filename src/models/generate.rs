//! Text generation with the KV cache: greedy, or temperature and top-p (nucleus) sampling as
//! transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper` do it.
//!
//! ```text
//! greedy (T = 0):  next = argmax(logits)
//! sampling:        p = softmax(logits / T); keep the most likely tokens until their total
//!                  reaches top_p (at least one); draw from the kept ones, renormalised
//! ```
//!
//! ```
//! use lora::models::{Sampler, Sampling};
//! let mut greedy = Sampler::new(Sampling::default()).unwrap();
//! assert_eq!(greedy.sample(&[0.1, 3.0, -1.0]).unwrap(), 1);
//! // top_p so small that only the most likely token is kept: sampling is greedy too.
//! let mut s = Sampler::new(Sampling { temperature: 1.0, top_p: 1e-6, seed: 7 }).unwrap();
//! assert_eq!(s.sample(&[0.1, 3.0, -1.0]).unwrap(), 1);
//! ```

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::llama::{Cache, Llama};
use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits; 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Seed of the sampling random source.
    pub seed: u64,
}

impl Default for Sampling {
    /// Greedy decoding.
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks next tokens from logits (see the module doc); seeded, so runs repeat.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler; errors on a negative or non-finite temperature or a top_p outside (0, 1].
    pub fn new(cfg: Sampling) -> Result<Self> {
        if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
            return Err(Error::State(format!(
                "temperature must be a finite number ≥ 0, got {}",
                cfg.temperature
            )));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(Error::State(format!(
                "top_p must be in (0, 1], got {}",
                cfg.top_p
            )));
        }
        Ok(Sampler {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        })
    }

    /// The next token for one row of logits `[V]`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() || logits.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                key: "logits".into(),
                what: "sampling the next token (empty or NaN/inf logits)".into(),
            });
        }
        if self.cfg.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let t = self.cfg.temperature;
        let max = logits.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp()))
            .collect();
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1;
            if mass >= self.cfg.top_p {
                break;
            }
        }
        let mut u = self.rng.random::<f64>() * mass;
        for p in &probs[..kept] {
            if u < p.1 {
                return Ok(p.0);
            }
            u -= p.1;
        }
        Ok(probs[kept - 1].0)
    }
}

/// The index of the largest value (the first one on ties).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new token as
/// it comes; stops early at any id in `stop` (which is neither passed on nor returned).
/// Returns the new tokens. The prompt runs as one batch, then one token per step through the
/// KV cache.
pub fn generate<E: From<Error>>(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<u32>, E> {
    if prompt.is_empty() {
        return Err(Error::State("generation needs at least one prompt token".into()).into());
    }
    let dev = device_of(model);
    let mut cache = Cache::new(model);
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new_tokens {
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), &dev).map_err(Error::from)?;
        let logits = model.forward_with_cache(&ids, &mut cache)?; // [1, t, V]
        let last = last_row(&logits)?;
        let next = sampler.sample(&last)?;
        if stop.contains(&next) {
            break;
        }
        on_token(next)?;
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}

fn device_of(model: &Llama) -> Device {
    model.builder().device().clone()
}

/// The logits of the last position of `[1, t, V]`, as a vector.
fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let (_, t, _) = logits.dims3()?;
    Ok(logits.get(0)?.get(t - 1)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, -2.0]).unwrap(), 1);
    }

    #[test]
    fn sampling_frequencies_follow_softmax_over_temperature() {
        // logits ln(1), ln(3) at T = 1 → p = [0.25, 0.75].
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 1,
        })
        .unwrap();
        let logits = [0.0f32, 3f32.ln()];
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits).unwrap() == 1).count();
        let f = ones as f64 / n as f64;
        // Binomial std ≈ 0.003; 5σ.
        assert!((f - 0.75).abs() < 0.015, "{f}");
    }

    #[test]
    fn top_p_drops_the_unlikely_tail() {
        // p = [0.6, 0.3, 0.1]; top_p 0.8 keeps tokens 0 and 1 (0.6 < 0.8 ≤ 0.9).
        let p = [0.6f32, 0.3, 0.1];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.8,
            seed: 3,
        })
        .unwrap();
        let draws: Vec<u32> = (0..3000).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(!draws.contains(&2));
        let f0 = draws.iter().filter(|&&d| d == 0).count() as f64 / 3000.0;
        assert!((f0 - 2.0 / 3.0).abs() < 0.05, "{f0}");
    }

    #[test]
    fn bad_settings_and_nan_logits_are_errors() {
        let bad_t = Sampling {
            temperature: -1.0,
            ..Sampling::default()
        };
        assert!(Sampler::new(bad_t).is_err());
        let bad_p = Sampling {
            top_p: 0.0,
            ..Sampling::default()
        };
        assert!(Sampler::new(bad_p).is_err());
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
    }
}
