//! The LoRA layer's backward does not depend on the layout in which `dy` arrives: the gradient
//! of `sum` (one value broadcast) and a dense `dy` give the same gradients.

use candle_core::{Device, Tensor, Var};
use lora::layers::{LoraLinear, LoraRng, LoraSpec};
use lora::InitLoraWeights;

use crate::common::rel_diff;

fn ramp(dims: &[usize], seed: usize) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The LoRA layer's gradients (A, B and x), through candle's autograd, equal the closed-form
/// ones within 1e-5 relative, for the gradient of `sum` (one value broadcast to every output)
/// and for a dense, varied `dy` (`Σ y ⊙ c`):
///
/// ```text
/// dA = s·(dy·B)ᵀ·x    dB = s·dyᵀ·(x·Aᵀ)    dx = dy·W0 + s·(dy·B)·A     s = α/r = 2
/// ```
///
/// 300 rows span several backward blocks and both threads.
#[test]
fn lora_gradients_match_the_closed_form_for_any_dy() {
    let rng = LoraRng::new(7);
    let spec = LoraSpec {
        init: InitLoraWeights::Random,
        ..LoraSpec::new(4, 8.0)
    };
    let w0 = ramp(&[16, 24], 5);
    let layer = LoraLinear::new(w0.clone(), Some(ramp(&[16], 6)), &spec, &rng, "l").unwrap();
    let vars = layer.trainable_vars();
    assert_eq!(vars.len(), 2);
    let (a, b) = if vars[0].dims() == [4, 24] {
        (vars[0].as_tensor(), vars[1].as_tensor())
    } else {
        (vars[1].as_tensor(), vars[0].as_tensor())
    };
    assert_eq!((a.dims(), b.dims()), (&[4, 24][..], &[16, 4][..]));
    let x = Var::from_tensor(&ramp(&[2, 150, 24], 8)).unwrap();
    let x2 = x.as_tensor().reshape((300, 24)).unwrap();
    let s = 2.0;
    for dense in [false, true] {
        let y = layer.forward_t(x.as_tensor(), true).unwrap();
        let c = ramp(&[2, 150, 16], 9);
        let loss = if dense {
            y.mul(&c).unwrap().sum_all().unwrap()
        } else {
            y.sum_all().unwrap()
        };
        let dy = if dense { c } else { y.ones_like().unwrap() };
        let dy = dy.reshape((300, 16)).unwrap();
        let g = loss.backward().unwrap();
        let dyb = dy.matmul(b).unwrap();
        let want_a = (dyb.t().unwrap().matmul(&x2).unwrap() * s).unwrap();
        let want_b = (dy
            .t()
            .unwrap()
            .matmul(&x2.matmul(&a.t().unwrap()).unwrap())
            .unwrap()
            * s)
            .unwrap();
        let want_x = (dy.matmul(&w0).unwrap() + (dyb.matmul(a).unwrap() * s).unwrap())
            .unwrap()
            .reshape((2, 150, 24))
            .unwrap();
        for (name, t, want) in [
            ("A", a, want_a),
            ("B", b, want_b),
            ("x", x.as_tensor(), want_x),
        ] {
            let r = rel_diff(g.get(t).unwrap(), &want);
            assert!(
                r <= 1e-5,
                "d{name} (dense dy: {dense}): relative difference {r}"
            );
        }
    }
}
