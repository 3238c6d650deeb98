//! Tensor closeness for tests, defined once: the library's unit tests use it as
//! `crate::testutil`, the integration tests include this file by path (`tests/it/main.rs`), as
//! they cannot see `cfg(test)` items. It depends on `candle_core` only.
#![allow(dead_code)]

use candle_core::{DType, Tensor};

/// Both tensors flattened to f32, after checking that their shapes match.
fn flat_f32(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (f(a), f(b))
}

/// The largest absolute value of `t` (f32).
fn max_abs_of(t: &Tensor) -> f32 {
    t.abs().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// `max |a − b|` over all elements, compared in f32; panics if the shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = flat_f32(a, b);
    max_abs_of(&(a - b).unwrap())
}

/// `(max |a − b|, max |b|)`, compared in f32.
pub fn diff_and_scale(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let (fa, fb) = flat_f32(a, b);
    (max_abs_of(&(fa - &fb).unwrap()), max_abs_of(&fb))
}

/// `max |a − b| ÷ max |b|` (the reference `b`'s scale; 1e-30 if `b` is all zeros).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (d, m) = diff_and_scale(a, b);
    d / m.max(1e-30)
}

/// Asserts `max |a − b| ≤ tol · max(1, max |b|)`: absolute for small values, relative for
/// large ones.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
    let (d, m) = diff_and_scale(a, b);
    assert!(d <= tol * m.max(1.0), "max diff {d} (scale {m}, tol {tol})");
}

/// Asserts that `got` holds one gradient for each of `n_vars` variables and that each agrees
/// with autograd's (`want`) within `rel` of its largest magnitude; a variable in `zero` has a
/// gradient that is exactly 0 in exact arithmetic, where both sides hold rounding noise: it
/// must stay below `rel` absolutely. `what` names the case in messages.
pub fn assert_grads_match(
    what: &str,
    got: &[(candle_core::Var, Tensor)],
    want: &candle_core::backprop::GradStore,
    n_vars: usize,
    rel: f32,
    zero: &[candle_core::TensorId],
) {
    assert_eq!(
        got.len(),
        n_vars,
        "{what}: gradients for {} of {n_vars} variables",
        got.len()
    );
    for (v, g) in got {
        let w = want
            .get(v.as_tensor())
            .expect("autograd has this variable's gradient");
        let (diff, scale) = diff_and_scale(g, w);
        if zero.contains(&v.as_tensor().id()) {
            assert!(diff <= rel, "{what}: a zero gradient differs by {diff}");
            continue;
        }
        assert!(scale > 0.0, "{what}: zero gradient");
        assert!(
            diff <= rel * scale,
            "{what}: gradient differs by {diff} (scale {scale})"
        );
    }
}
