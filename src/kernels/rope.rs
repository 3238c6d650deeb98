//! Rotary position embedding (RoPE, the `rotate_half` form of Llama/GPT-NeoX) on token-major
//! projections, in place, forward or its transpose (the backward).
//!
//! Shapes: `x: [N, heads·d]` row-major with `N = b·t` (row `i` is position `i mod t`),
//! `cos, sin: [t, d]`. Per head, with halves `x = [x₁, x₂]`, `c = [c₁, c₂]`, `s = [s₁, s₂]`:
//!
//! ```text
//! forward   y = x ⊙ c + rotate_half(x) ⊙ s,  rotate_half([x₁, x₂]) = [−x₂, x₁]
//!           y₁ = x₁·c₁ − x₂·s₁,  y₂ = x₂·c₂ + x₁·s₂
//! backward  dx = dy ⊙ c + rotate_halfᵀ(dy ⊙ s)
//!           dx₁ = dy₁·c₁ + dy₂·s₂,  dx₂ = dy₂·c₂ − dy₁·s₁
//! ```
//!
//! With the usual tables (both halves equal) the backward is the rotation by −angle.

use rayon::prelude::*;

use super::{vectorised, Isa};

/// RoPE over every head of token-major `x: [N, heads·d]` in place (`d = cos.len() / t`), at
/// position `row mod t`; with `backward` its transpose (see the module doc).
pub(crate) fn rope_inplace(
    isa: Isa,
    x: &mut [f32],
    t: usize,
    heads: usize,
    cos: &[f32],
    sin: &[f32],
    backward: bool,
) {
    let d = cos.len() / t.max(1);
    let half = d / 2;
    if d == 0 || heads == 0 {
        return;
    }
    x.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(row, x)| {
            let ti = row % t;
            let (c, s) = (&cos[ti * d..][..d], &sin[ti * d..][..d]);
            let (c1, c2) = c.split_at(half);
            let (s1, s2) = s.split_at(half);
            vectorised(
                isa,
                #[inline(always)]
                || {
                    for head in x.chunks_exact_mut(d) {
                        let (x1, x2) = head.split_at_mut(half);
                        if backward {
                            for j in 0..half {
                                let (a, b) = (x1[j], x2[j]);
                                x1[j] = a * c1[j] + b * s2[j];
                                x2[j] = b * c2[j] - a * s1[j];
                            }
                        } else {
                            for j in 0..half {
                                let (a, b) = (x1[j], x2[j]);
                                x1[j] = a * c1[j] - b * s1[j];
                                x2[j] = b * c2[j] + a * s2[j];
                            }
                        }
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::values;

    /// Forward against the definition in f64, and the backward is its transpose
    /// (`⟨rope(x), y⟩ = ⟨x, ropeᵀ(y)⟩`), with tables whose halves differ; on every target.
    #[test]
    fn forward_matches_f64_and_backward_is_its_transpose() {
        let (b, t, heads, d) = (2, 5, 3, 8);
        let (cos, sin) = (values(t * d, 1), values(t * d, 2));
        let x = values(b * t * heads * d, 3);
        let y = values(b * t * heads * d, 4);
        for isa in Isa::supported() {
            let mut fx = x.clone();
            rope_inplace(isa, &mut fx, t, heads, &cos, &sin, false);
            let mut by = y.clone();
            rope_inplace(isa, &mut by, t, heads, &cos, &sin, true);
            for row in 0..b * t {
                let p = row % t;
                for hh in 0..heads {
                    let base = row * heads * d + hh * d;
                    for j in 0..d {
                        let rot = if j < d / 2 {
                            -(x[base + j + d / 2] as f64)
                        } else {
                            x[base + j - d / 2] as f64
                        };
                        let want = x[base + j] as f64 * cos[p * d + j] as f64
                            + rot * sin[p * d + j] as f64;
                        assert!((fx[base + j] as f64 - want).abs() <= 1e-6, "{isa}");
                    }
                }
            }
            let lhs: f64 = fx.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            let rhs: f64 = x.iter().zip(&by).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(
                (lhs - rhs).abs() <= 1e-5 * (1.0 + lhs.abs()),
                "{isa}: {lhs} vs {rhs}"
            );
        }
    }
}
