//! Uses a little of `lora`'s public API as a dependent crate would: a LoRA linear layer from
//! given tensors, its forward pass against the closed form, and merging.

use candle_core::{Device, Tensor};
use lora::{LoraLinear, LoraRng, Mergeable};

fn main() -> lora::Result<()> {
    let dev = Device::Cpu;
    // W0 = I (2×2), b = 0, A = [1 1] (r = 1), B = [1; 2], scale 0.5:
    // y = x·W0ᵀ + 0.5·(x·Aᵀ)·Bᵀ; for x = [1, 2]: x·Aᵀ = 3, y = [1 + 1.5, 2 + 3] = [2.5, 5].
    let w0 = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
    let a = Tensor::new(&[[1f32, 1.]], &dev)?;
    let b = Tensor::new(&[[1f32], [2.]], &dev)?;
    let mut layer = LoraLinear::from_adapter(w0, None, a, b, 0.5, 0.0, "proj", &LoraRng::new(0))?;
    let x = Tensor::new(&[[1f32, 2.]], &dev)?;
    let want = [2.5f32, 5.0];

    let y = layer
        .forward_t(&x, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    check("unmerged", &y, &want);

    layer.merge()?;
    let y = layer
        .forward_t(&x, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    check("merged", &y, &want);
    // W' = W0 + 0.5·B·A = [[1.5, 0.5], [1, 2]].
    let w = layer.weight().flatten_all()?.to_vec1::<f32>()?;
    check("merged weight", &w, &[1.5, 0.5, 1.0, 2.0]);
    println!("lora-dependent: ok");
    Ok(())
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    let close = got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-6);
    assert!(close, "{what}: {got:?}, expected {want:?} (within 1e-6)");
}
