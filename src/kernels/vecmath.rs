//! Vectorised f32 slice math for the kernels: `exp`, sum / max / dot reductions. They are
//! written as plain loops and inlined into the callers' [`vectorised`](super::vectorised) closures, which compile
//! them for the chosen [`Isa`](super::Isa) (16, 8 or 4 lanes).
//!
//! Reductions keep 16 partial results (one AVX-512 register, two AVX2 ones, four SSE ones) so
//! the compiler can vectorise them; a plain `iter().sum()` must add in order and runs one element per
//! add latency. The order of additions differs from a sequential sum (rounding only).
//!
//! ## exp
//!
//! libm's `expf` is a scalar call per element: in a LoRA training step of the benchmark Llama
//! the softmaxes, SiLU and cross-entropy spent more time in it than in any op but the matrix
//! products. This is Cephes' `expf` (range reduction `x = n·ln 2 + r` with `ln 2` split in two,
//! a degree-6 polynomial for `e^r`, and `2^n` put into the exponent bits) written without
//! branches so the compiler vectorises it; loops over it inside [`vectorised`](super::vectorised) run as wide as
//! the target's vectors. Error ≤ 2 ulp against `f64::exp` (tested); results below
//! `−87.33` (where `e^x` is subnormal) are 0, above `88` `+∞`, NaN stays NaN.

/// Largest input with a finite, non-overflowing `2^n` scale.
const HI: f32 = 88.0;
/// `ln(f32::MIN_POSITIVE)`: below it the result would be subnormal; 0 is returned.
const LO: f32 = -87.336_55;

/// `e^x` of one value, branch-free (see the module doc); inside [`vectorised`](super::vectorised) loops it
/// compiles to the target's vectors.
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n through the exponent bits. n ∈ [−126, 127] after the clamp; adding 1.5·2²³ puts it
    // in the low mantissa bits, which keeps the whole loop in vector registers (a saturating
    // `as i32` cast would not vectorise).
    const MAGIC: f32 = 12_582_912.0;
    let k = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    let y = y * f32::from_bits(k.wrapping_add(127) << 23);
    let y = if x < LO { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Lanes of the partial reductions.
const LANES: usize = 16;

/// Folds `x` into `LANES` partial results with `f`, then folds those and the tail with `f`.
#[inline(always)]
fn reduce(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = f(*a, *v);
        }
    }
    let r = tail.iter().fold(init, |a, &v| f(a, v));
    acc.iter().fold(r, |a, &v| f(a, v))
}

/// `Σ x`.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |a, b| a + b)
}

/// `max x` (−∞ for an empty slice; NaN is ignored unless every value is NaN).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    reduce(x, f32::NEG_INFINITY, f32::max)
}

/// `Σ a·b·c` over the common length, in 16 partial sums like [`dot`].
#[inline(always)]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail: f32 = (n - n % LANES..n).map(|i| a[i] * b[i] * c[i]).sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((acc, x), y), z) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *acc += x * y * z;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a·b` over the common length.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::vectorised;
    use crate::kernels::Isa;

    /// `x ← e^x` as the kernels run it (inside [`vectorised`]).
    fn exp_inplace(isa: Isa, x: &mut [f32]) {
        vectorised(
            isa,
            #[inline(always)]
            || x.iter_mut().for_each(|v| *v = exp1(*v)),
        );
    }

    /// Within 2 ulp of the f64 result over the whole finite range, on every target and the
    /// scalar call.
    #[test]
    fn matches_f64_exp_within_two_ulp() {
        for isa in Isa::supported() {
            exp_within_two_ulp(isa);
        }
    }

    fn exp_within_two_ulp(isa: Isa) {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| LO + (HI - LO) * i as f32 / 200_000.0)
            .chain([0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5, 20.0])
            .collect();
        let mut vectorised = xs.clone();
        exp_inplace(isa, &mut vectorised);
        let scalar: Vec<f32> = xs.iter().map(|&x| exp1(x)).collect();
        for ((&x, &a), &b) in xs.iter().zip(&vectorised).zip(&scalar) {
            let want = (x as f64).exp();
            for got in [a, b] {
                let ulp = (want as f32).abs() * f32::EPSILON;
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 2.0 * ulp as f64,
                    "{isa}: exp({x}) = {got}, want {want}"
                );
            }
        }
        assert_eq!(exp1(0.0), 1.0);
    }

    /// Sum, max, dot and dot3 equal their f64 results for lengths around the lane count, on
    /// every target.
    #[test]
    fn reductions_match_f64() {
        for n in [0usize, 1, 5, 15, 16, 17, 33, 100, 1000] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 23) as f32 - 11.0) / 3.0)
                .collect();
            let s64: f64 = a.iter().map(|&x| x as f64).sum();
            let d64: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let t64: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| x as f64 * y as f64 * x as f64)
                .sum();
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for isa in Isa::supported() {
                let (s, d, t, mx) = vectorised(
                    isa,
                    #[inline(always)]
                    || (sum(&a), dot(&a, &b), dot3(&a, &b, &a), max(&a)),
                );
                assert!(
                    (s as f64 - s64).abs() <= 1e-5 * (1.0 + s64.abs()),
                    "{isa} sum n={n}"
                );
                assert!(
                    (d as f64 - d64).abs() <= 1e-5 * (1.0 + d64.abs()),
                    "{isa} dot n={n}"
                );
                assert!(
                    (t as f64 - t64).abs() <= 1e-5 * (1.0 + t64.abs()),
                    "{isa} dot3 n={n}"
                );
                assert_eq!(mx, m, "{isa} max n={n}");
            }
        }
    }

    #[test]
    fn saturates_to_zero_and_infinity_and_keeps_nan() {
        let v = [
            -1000.0,
            -88.0,
            89.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for isa in Isa::supported() {
            let mut v = v;
            exp_inplace(isa, &mut v);
            assert_eq!(&v[..5], &[0.0, 0.0, f32::INFINITY, f32::INFINITY, 0.0]);
            assert!(v[5].is_nan(), "{isa}");
        }
    }
}
