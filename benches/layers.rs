//! Criterion benches of the LoRA linear layer ops at the seed's shape (x `[32, 128, 768]` →
//! 512, r 8, α 16): plain forward, unmerged and merged LoRA forward, the train step (grads for
//! A and B) and the train step with dX. `cargo bench --bench layers`.

use candle_core::{Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use lora::config::InitLoraWeights;
use lora::layers::{normal, LoraLinear, LoraRng, LoraSpec, Mergeable};

fn layers(c: &mut Criterion) {
    let dev = candle_core::Device::Cpu;
    let rng = LoraRng::new(0);
    let x = normal(&[32, 128, 768], 1.0, &rng, &dev).expect("input");
    let w = normal(&[512, 768], 0.02, &rng, &dev).expect("weight");
    let b = normal(&[512], 0.02, &rng, &dev).expect("bias");
    let spec = LoraSpec {
        init: InitLoraWeights::Random,
        ..LoraSpec::new(8, 16.0)
    };
    let plain = LoraLinear::frozen(w.clone(), Some(b.clone()));
    let mut lora = LoraLinear::new(w, Some(b), &spec, &rng, "0").expect("layer");
    let x_var = Var::from_tensor(&x).expect("var");
    let step = |l: &LoraLinear, x: &Tensor| {
        let y = l.forward_t(x, true).expect("forward");
        y.sum_all().expect("sum").backward().expect("backward")
    };

    let mut g = c.benchmark_group("lora_linear_32x128x768_to_512_r8");
    g.sample_size(20);
    g.bench_function("plain_forward", |bn| {
        bn.iter(|| plain.forward_t(&x, false).expect("forward"))
    });
    g.bench_function("unmerged_forward", |bn| {
        bn.iter(|| lora.forward_t(&x, false).expect("forward"))
    });
    g.bench_function("train_step", |bn| bn.iter(|| step(&lora, &x)));
    g.bench_function("train_step_with_dx", |bn| {
        bn.iter(|| step(&lora, x_var.as_tensor()))
    });
    lora.merge().expect("merge");
    g.bench_function("merged_forward", |bn| {
        bn.iter(|| lora.forward_t(&x, false).expect("forward"))
    });
    g.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
