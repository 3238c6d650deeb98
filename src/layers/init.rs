//! Initialisers and the seeded random source that LoRA layers draw from (init and dropout).

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::Result;

/// A seeded, shareable random source (ChaCha8). Layers built by one builder share one, so a
/// seed fixes every init and every dropout mask. Its position can be saved and restored, so a
/// resumed run draws exactly what an uninterrupted one would.
#[derive(Debug, Clone)]
pub struct LoraRng(Arc<Mutex<ChaCha8Rng>>);

impl LoraRng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        LoraRng(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut ChaCha8Rng) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-draw; the state is still valid.
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// `(seed, word position)`: enough to restore the stream with [`LoraRng::restore`].
    pub fn state(&self) -> ([u8; 32], u128) {
        self.with(|r| (r.get_seed(), r.get_word_pos()))
    }

    /// Restores a state taken with [`LoraRng::state`].
    pub fn restore(&self, seed: [u8; 32], word_pos: u128) {
        self.with(|r| {
            *r = ChaCha8Rng::from_seed(seed);
            r.set_word_pos(word_pos);
        })
    }

    /// `n` uniform values in `[-bound, bound)`.
    pub fn uniform(&self, n: usize, bound: f32) -> Vec<f32> {
        self.with(|r| (0..n).map(|_| r.random_range(-bound..bound)).collect())
    }

    /// `n` values from N(0, std²).
    pub fn normal(&self, n: usize, std: f32) -> Vec<f32> {
        let dist = Normal::new(0.0f32, std.max(0.0))
            .unwrap_or_else(|_| Normal::new(0.0, 1.0).expect("N(0,1)"));
        self.with(|r| (0..n).map(|_| dist.sample(r)).collect())
    }

    /// The same draws as [`LoraRng::keep_mask`], as keep flags: 1 kept, 0 dropped.
    pub fn keep_flags(&self, n: usize, p: f32) -> Vec<u8> {
        self.with(|r| (0..n).map(|_| u8::from(r.random::<f32>() >= p)).collect())
    }

    /// An inverted-dropout mask: 0 with probability `p`, else `1/(1-p)`.
    pub fn keep_mask(&self, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        self.with(|r| {
            (0..n)
                .map(|_| if r.random::<f32>() < p { 0.0 } else { keep })
                .collect()
        })
    }
}

/// PyTorch's `kaiming_uniform_(a=√5)` (nn.Linear's default init): U(-1/√fan_in, 1/√fan_in).
pub fn kaiming_uniform(
    shape: &[usize],
    fan_in: usize,
    rng: &LoraRng,
    dev: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.uniform(n, bound), shape, dev)?)
}

/// N(0, std²) of the given shape.
pub fn normal(shape: &[usize], std: f32, rng: &LoraRng, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.normal(n, std), shape, dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_bound_is_one_over_sqrt_fan_in() {
        let rng = LoraRng::new(0);
        let t = kaiming_uniform(&[8, 768], 768, &rng, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bound = 1.0 / 768f32.sqrt();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            max <= bound && max > 0.95 * bound,
            "max {max} bound {bound}"
        );
    }

    #[test]
    fn same_seed_same_draws_and_state_restores() {
        let (a, b) = (LoraRng::new(7), LoraRng::new(7));
        assert_eq!(a.uniform(10, 1.0), b.uniform(10, 1.0));
        let (seed, pos) = a.state();
        let next = a.normal(5, 1.0);
        let c = LoraRng::new(99);
        c.restore(seed, pos);
        assert_eq!(c.normal(5, 1.0), next);
    }

    #[test]
    fn dropout_mask_keeps_about_one_minus_p_and_rescales() {
        let m = LoraRng::new(1).keep_mask(100_000, 0.1);
        let kept = m.iter().filter(|&&x| x > 0.0).count() as f32 / 1e5;
        assert!((kept - 0.9).abs() < 0.01, "{kept}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
    }
}
