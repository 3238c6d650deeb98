//! The vendored candle-core's gradient layouts (vendor/candle-core/PATCHES.md, patch 3): a
//! broadcast gradient (of `sum`) is not copied; ops that need contiguous data still get it;
//! variables' gradients stay contiguous; and the LoRA layer's gradients do not depend on the
//! layout in which `dy` arrives. Also its threaded long sums (patch 5).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};
use lora::layers::{LoraLinear, LoraRng, LoraSpec};
use lora::InitLoraWeights;

use crate::common::max_abs_diff;

fn ramp(dims: &[usize], seed: usize) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// max |a − b| ÷ max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    max_abs_diff(a, b) / scale.to_scalar::<f32>().unwrap().max(1e-30)
}

/// An identity op that records the strides of the gradient its backward receives.
struct Probe {
    strided: bool,
    seen: Arc<Mutex<Vec<usize>>>,
}

impl CustomOp1 for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn bwd_takes_strided_grad(&self) -> bool {
        self.strided
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("probe: f32 only")
        };
        let (a, b) = l.contiguous_offsets().expect("contiguous input");
        Ok((CpuStorage::F32(v[a..b].to_vec()), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        *self.seen.lock().unwrap() = g.stride().to_vec();
        Ok(Some(g.contiguous()?))
    }
}

/// The gradient of `sum` reaches an op that reads any layout as a stride-0 view (through a
/// reshape too), and an op that does not as a contiguous tensor; the input's gradient is all
/// ones either way.
#[test]
fn broadcast_gradients_reach_custom_ops_uncopied_only_when_they_ask() {
    for (strided, want) in [(true, vec![0, 0]), (false, vec![4, 1])] {
        let x = Var::from_tensor(&ramp(&[6, 4], 1)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe {
            strided,
            seen: seen.clone(),
        };
        let y = x.as_tensor().apply_op1(probe).unwrap();
        let grads = y
            .reshape((3, 2, 4))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), want, "strided {strided}");
        let g = grads.get(x.as_tensor()).unwrap();
        assert!(g.is_contiguous());
        assert_eq!(
            max_abs_diff(g, &Tensor::ones((6, 4), g.dtype(), &Device::Cpu).unwrap()),
            0.0
        );
    }
}

/// candle's own ops get their gradients as before (copied contiguous when strided): through
/// `matmul` after a reshape, `d/dW Σ (x·W)` has element (k, j) = Σ_i x[i, k]; and a variable's
/// gradient is stored contiguous even when it is a broadcast.
#[test]
fn matmul_after_a_sum_and_variable_gradients_stay_contiguous() {
    let x = ramp(&[5, 3], 2);
    let w = Var::from_tensor(&ramp(&[3, 4], 3)).unwrap();
    let y = x.matmul(w.as_tensor()).unwrap();
    let grads = y
        .reshape((5, 2, 2))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = x
        .sum_keepdim(0)
        .unwrap()
        .t()
        .unwrap()
        .broadcast_as((3, 4))
        .unwrap();
    let got = grads.get(w.as_tensor()).unwrap();
    assert!(max_abs_diff(got, &want) <= 1e-6, "{got} vs {want}");

    let v = Var::from_tensor(&ramp(&[2, 3], 4)).unwrap();
    let grads = v.as_tensor().sum_all().unwrap().backward().unwrap();
    let g = grads.get(v.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(g.to_vec2::<f32>().unwrap(), vec![vec![1.0; 3]; 2]);
}

/// The LoRA layer's gradients (A, B, and x) from a `sum` loss, whose `dy` reaches the layer
/// as one broadcast value, equal those from the same loss with a dense `dy` (`Σ y ⊙ 1`):
/// within 1e-6 relative. 300 rows span several backward blocks and both threads.
#[test]
fn lora_gradients_do_not_depend_on_the_layout_of_dy() {
    let rng = LoraRng::new(7);
    let spec = LoraSpec {
        init: InitLoraWeights::Random,
        ..LoraSpec::new(4, 8.0)
    };
    let layer =
        LoraLinear::new(ramp(&[16, 24], 5), Some(ramp(&[16], 6)), &spec, &rng, "l").unwrap();
    let vars = layer.trainable_vars();
    assert_eq!(vars.len(), 2);
    let x = Var::from_tensor(&ramp(&[2, 150, 24], 8)).unwrap();
    let grads_of = |dense: bool| {
        let y = layer.forward_t(x.as_tensor(), true).unwrap();
        let loss = if dense {
            y.mul(&y.ones_like().unwrap()).unwrap().sum_all().unwrap()
        } else {
            y.sum_all().unwrap()
        };
        let g = loss.backward().unwrap();
        let mut out: Vec<Tensor> = vars
            .iter()
            .map(|v| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        out.push(g.get(x.as_tensor()).unwrap().clone());
        out
    };
    let (broadcast, dense) = (grads_of(false), grads_of(true));
    for (i, (b, d)) in broadcast.iter().zip(&dense).enumerate() {
        let r = rel_diff(b, d);
        assert!(r <= 1e-6, "gradient {i}: relative difference {r}");
    }
}

/// A long `sum_all` (PATCHES.md, patch 5: summed in chunks on several threads) and `mean_all`
/// equal an f64 sum within 1e-6 relative; a short one and a row-wise sum take the old path.
#[test]
fn long_sums_match_an_f64_reference() {
    for n in [1_000, 300_001, 2_097_152] {
        let t = ramp(&[n], 9).affine(1.0, 0.25).unwrap();
        let want: f64 = t.to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).sum();
        let got = t.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "n {n}: {got} vs {want}"
        );
        let mean = t.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((mean - want / n as f64).abs() <= 1e-6 * (want / n as f64).abs());
    }
    let t = ramp(&[3, 200_000], 10);
    let rows = t.sum(1).unwrap().to_vec1::<f32>().unwrap();
    for (i, got) in rows.iter().enumerate() {
        let row = t.get(i).unwrap().to_vec1::<f32>().unwrap();
        let want: f64 = row.iter().map(|&v| v as f64).sum();
        let size: f64 = row.iter().map(|&v| v.abs() as f64).sum();
        assert!(
            (*got as f64 - want).abs() <= 1e-6 * size,
            "row {i}: {got} vs {want}"
        );
    }
}
