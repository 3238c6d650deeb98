//! PEFT's task-merging functions (`peft/utils/merge_utils.py`, 0.21.2), ported one for one on
//! flat f32 tensors of equal length ("task tensors": the same factor or ΔW of each adapter).
//!
//! With task tensors `x_t` (t = 1…T) and weights `w_t`:
//! - [`task_arithmetic`]: `Σ_t w_t·x_t`.
//! - [`magnitude_prune`]: the same sum after [`prune_magnitude`] of each `x_t`.
//! - [`ties`]: prune each `x_t` by magnitude, elect the majority sign per element from the
//!   pruned, **unweighted** tensors ([`majority_sign_mask`]), then [`disjoint_merge`] of the
//!   weighted ones: `Σ_t w_t·x_t·[sign x_t = elected] / max(1, #{t: sign x_t = elected})`.
//! - [`dare_linear`] / [`dare_ties`]: as `task_arithmetic` / `ties`, with [`prune_random`]
//!   (keep each element with probability `density`, divide the kept ones by `density`) instead
//!   of magnitude pruning.
//!
//! `density ≥ 1` prunes nothing (PEFT warns and returns the tensor); PEFT's random mask comes
//! from torch's RNG, ours from a seeded ChaCha8 stream ([`DareRng`]), so `dare_*` results are
//! reproducible by seed but not equal to PEFT's draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the majority sign is elected (`majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignMethod {
    /// By the sign of `Σ_t x_t` (PEFT's default, `"total"`).
    #[default]
    Total,
    /// By the sign of `Σ_t sign(x_t)` (`"frequency"`).
    Frequency,
}

/// The random source of DARE's Bernoulli masks: one ChaCha8 stream, consumed element by element.
pub struct DareRng(ChaCha8Rng);

impl DareRng {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        DareRng(ChaCha8Rng::seed_from_u64(seed))
    }
}

/// PEFT `magnitude_based_pruning`: keeps the `k = ⌊density·n⌋` elements of largest |x| and zeroes
/// the rest (`density ≥ 1` keeps everything). Ties in |x| at the threshold are kept in index
/// order (torch's `topk` leaves that order unspecified).
pub fn prune_magnitude(x: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let k = (density * x.len() as f64) as usize;
    let mut out = vec![0f32; x.len()];
    if k == 0 {
        return out;
    }
    let mut idx: Vec<usize> = (0..x.len()).collect();
    // Largest |x| first; equal magnitudes by index, so the choice is deterministic.
    let by_mag = |a: &usize, b: &usize| x[*b].abs().total_cmp(&x[*a].abs()).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by_mag);
    for &i in &idx[..k] {
        out[i] = x[i];
    }
    out
}

/// PEFT `random_pruning` with `rescale=True`: each element is kept with probability `density`
/// (a Bernoulli draw) and the kept ones are divided by `density`; `density ≥ 1` keeps everything.
pub fn prune_random(x: &[f32], density: f64, rng: &mut DareRng) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let d = density as f32;
    x.iter()
        .map(|&v| {
            if rng.0.random_bool(density) {
                v / d
            } else {
                0.0
            }
        })
        .collect()
}

/// PEFT `calculate_majority_sign_mask`: for each element, whether `sign(x_t)` equals the elected
/// sign (`+1` where the vote `≥ 0`, else `−1`). Zeros never match. Returns one mask per task.
pub fn majority_sign_mask(tasks: &[Vec<f32>], method: SignMethod) -> Vec<Vec<bool>> {
    let n = tasks.first().map_or(0, Vec::len);
    let sign = |v: f32| {
        if v > 0.0 {
            1.0f32
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let elected: Vec<f32> = (0..n)
        .map(|i| {
            let vote: f32 = match method {
                SignMethod::Total => tasks.iter().map(|t| t[i]).sum(),
                SignMethod::Frequency => tasks.iter().map(|t| sign(t[i])).sum(),
            };
            if vote >= 0.0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    tasks
        .iter()
        .map(|t| {
            t.iter()
                .zip(&elected)
                .map(|(&v, &e)| sign(v) == e)
                .collect()
        })
        .collect()
}

/// PEFT `disjoint_merge`: `Σ_t x_t·mask_t / max(1, Σ_t mask_t)` per element.
pub fn disjoint_merge(weighted: &[Vec<f32>], mask: &[Vec<bool>]) -> Vec<f32> {
    let n = weighted.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let mut sum = 0f32;
            let mut count = 0f32;
            for (t, m) in weighted.iter().zip(mask) {
                if m[i] {
                    sum += t[i];
                    count += 1.0;
                }
            }
            sum / count.max(1.0)
        })
        .collect()
}

/// `w_t·x_t` for each task.
fn weighted(tasks: &[Vec<f32>], weights: &[f32]) -> Vec<Vec<f32>> {
    tasks
        .iter()
        .zip(weights)
        .map(|(t, &w)| t.iter().map(|&v| v * w).collect())
        .collect()
}

/// `Σ_t x_t`.
fn sum(tasks: &[Vec<f32>]) -> Vec<f32> {
    let n = tasks.first().map_or(0, Vec::len);
    (0..n).map(|i| tasks.iter().map(|t| t[i]).sum()).collect()
}

/// PEFT `task_arithmetic`: `Σ_t w_t·x_t`.
pub fn task_arithmetic(tasks: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    sum(&weighted(tasks, weights))
}

/// PEFT `magnitude_prune`: `Σ_t w_t·prune_magnitude(x_t)`.
pub fn magnitude_prune(tasks: &[Vec<f32>], weights: &[f32], density: f64) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tasks.iter().map(|t| prune_magnitude(t, density)).collect();
    task_arithmetic(&pruned, weights)
}

/// PEFT `ties`: magnitude pruning, sign election on the pruned tensors, disjoint merge of the
/// weighted ones.
pub fn ties(tasks: &[Vec<f32>], weights: &[f32], density: f64, method: SignMethod) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tasks.iter().map(|t| prune_magnitude(t, density)).collect();
    let mask = majority_sign_mask(&pruned, method);
    disjoint_merge(&weighted(&pruned, weights), &mask)
}

/// PEFT `dare_linear`: `Σ_t w_t·prune_random(x_t)`.
pub fn dare_linear(
    tasks: &[Vec<f32>],
    weights: &[f32],
    density: f64,
    rng: &mut DareRng,
) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tasks
        .iter()
        .map(|t| prune_random(t, density, rng))
        .collect();
    task_arithmetic(&pruned, weights)
}

/// PEFT `dare_ties`: random pruning with rescaling, then sign election and disjoint merge.
pub fn dare_ties(
    tasks: &[Vec<f32>],
    weights: &[f32],
    density: f64,
    method: SignMethod,
    rng: &mut DareRng,
) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = tasks
        .iter()
        .map(|t| prune_random(t, density, rng))
        .collect();
    let mask = majority_sign_mask(&pruned, method);
    disjoint_merge(&weighted(&pruned, weights), &mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_pruning_keeps_the_floor_of_density_times_n_largest() {
        let x = [0.5f32, -3.0, 1.0, 0.0, -2.0, 4.0, 0.25];
        // k = floor(0.5 * 7) = 3: 4.0, -3.0, -2.0.
        assert_eq!(
            prune_magnitude(&x, 0.5),
            [0.0, -3.0, 0.0, 0.0, -2.0, 4.0, 0.0]
        );
        assert_eq!(prune_magnitude(&x, 0.1), [0.0; 7]); // k = 0
        assert_eq!(prune_magnitude(&x, 1.0), x);
    }

    #[test]
    fn ties_follows_peft_step_by_step() {
        // Two tasks of 4 elements, density 1 (no pruning) to see the election and the merge.
        let t = vec![vec![1.0f32, -2.0, 3.0, 0.0], vec![-3.0f32, -1.0, 1.0, 2.0]];
        // Votes (total): -2 → -1; -3 → -1; 4 → +1; 2 → +1.
        let mask = majority_sign_mask(&t, SignMethod::Total);
        assert_eq!(
            mask,
            [vec![false, true, true, false], vec![true, true, true, true]]
        );
        // Weights 0.5, -1: weighted [0.5, -1, 1.5, 0], [3, 1, -1, -2].
        let got = ties(&t, &[0.5, -1.0], 1.0, SignMethod::Total);
        assert_eq!(got, [3.0, 0.0, 0.25, -2.0]);
        // Frequency: votes 0 → +1, -2 → -1, 2 → +1, 1 → +1.
        let mask = majority_sign_mask(&t, SignMethod::Frequency);
        assert_eq!(
            mask,
            [vec![true, true, true, false], vec![false, true, true, true]]
        );
    }

    #[test]
    fn dare_keeps_about_density_and_rescales_exactly() {
        let n = 20_000;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
        let d = 0.3;
        let got = prune_random(&x, d, &mut DareRng::new(7));
        let kept = got.iter().filter(|v| **v != 0.0).count();
        for (g, v) in got.iter().zip(&x) {
            assert!(*g == 0.0 || *g == v / 0.3f32, "{g} from {v}");
        }
        // Binomial(n, 0.3): sd = sqrt(n·0.21) ≈ 65; 5 sd is 325 (fixed seed, so never flaky).
        let frac = kept as f64 / n as f64;
        assert!((frac - d).abs() < 325.0 / n as f64, "{frac}");
        // The same seed gives the same mask; another seed another one.
        assert_eq!(got, prune_random(&x, d, &mut DareRng::new(7)));
        assert_ne!(got, prune_random(&x, d, &mut DareRng::new(8)));
    }
}
