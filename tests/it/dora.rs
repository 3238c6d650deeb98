//! DoRA (`use_dora`) against PEFT 0.21.2, with the fixtures made by
//! `scripts/make_dora_fixtures.py`:
//!
//! - `dora_llama`: the `llama_qv` base with a DoRA adapter on q_proj, v_proj and down_proj (r 4,
//!   α 8, magnitudes perturbed away from PEFT's init so the DoRA factor is not 1): logits
//!   (1e-4), merged weights (1e-5), loss (1e-5), gradients of A, B and m (1e-4 relative to each
//!   tensor's max) and one AdamW step (1e-5, the fixtures README's rule).
//! - `dora_layers`: Linear, Conv2d and Embedding DoRA layers: outputs and merged weights (1e-5),
//!   gradients (1e-4 relative).

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lora::merge::{merge_checkpoint, Direction, MergeOptions};
use lora::models::{CausalLm, Llama, LlamaConfig};
use lora::tensor_file::SafeFile;
use lora::train::data::{Dataset, Example};
use lora::train::loss::causal_lm_loss;
use lora::train::{Length, SaveMode, Schedule, TrainConfig, Trainer};
use lora::{
    Adapter, Checkpoint, Conv2dGeometry, LoraBuilder, LoraConv2d, LoraEmbedding, LoraLinear,
    LoraRng, Mergeable,
};

use crate::common::{fixture, lora_bin, max_abs_diff};

fn io_of(rel: &str) -> BTreeMap<String, Tensor> {
    let f = SafeFile::open(&fixture(rel)).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.tensor(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

fn max_of(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn base() -> std::path::PathBuf {
    fixture("llama_qv/base")
}

fn builder() -> LoraBuilder {
    let adapter = Adapter::load(&fixture("dora_llama/adapter"), &Device::Cpu).unwrap();
    LoraBuilder::new(Checkpoint::open(&base()).unwrap(), DType::F32, Device::Cpu)
        .with_adapter(adapter)
        .unwrap()
}

fn model() -> Llama {
    let cfg = LlamaConfig::from_dir(&base()).unwrap();
    Llama::load(&cfg, &builder()).unwrap()
}

#[test]
fn dora_adapter_loads_and_saves_peft_keys_bit_identically() {
    let dir = fixture("dora_llama/adapter");
    let a = Adapter::load(&dir, &Device::Cpu).unwrap();
    assert!(a.config.use_dora);
    assert_eq!(a.modules.len(), 6);
    let q = &a.modules["model.layers.0.self_attn.q_proj"];
    assert_eq!(q.magnitude.as_ref().unwrap().dims(), &[64]);
    assert_eq!(
        a.num_params(),
        2 * (4 * 64 + 64 * 4 + 64 + 4 * 64 + 32 * 4 + 32 + 4 * 128 + 64 * 4 + 64)
    );
    let out = tempfile::tempdir().unwrap();
    a.save(out.path()).unwrap();
    let ours = SafeFile::open(&out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = SafeFile::open(&dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for k in theirs.names() {
        assert_eq!(ours.bytes(&k).unwrap(), theirs.bytes(&k).unwrap(), "{k}");
    }
}

#[test]
fn dora_logits_match_peft() {
    let io = io_of("dora_llama/io.safetensors");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model().forward_t(&ids, false).unwrap();
    let d = max_abs_diff(&logits, &io["lora_logits"]);
    println!("DoRA lora_logits max |diff| = {d:.3e}");
    assert!(d < 1e-4, "{d}");
    // Without the magnitudes (plain LoRA from the same A, B) the logits differ well beyond that.
    let mut plain = Adapter::load(&fixture("dora_llama/adapter"), &Device::Cpu).unwrap();
    plain.config.use_dora = false;
    plain.modules.values_mut().for_each(|m| m.magnitude = None);
    let vb = LoraBuilder::new(Checkpoint::open(&base()).unwrap(), DType::F32, Device::Cpu)
        .with_adapter(plain)
        .unwrap();
    let cfg = LlamaConfig::from_dir(&base()).unwrap();
    let lora_logits = Llama::load(&cfg, &vb)
        .unwrap()
        .forward_t(&ids, false)
        .unwrap();
    assert!(max_abs_diff(&lora_logits, &io["lora_logits"]) > 1e-2);
}

#[test]
fn dora_merge_matches_peft_model_free_and_in_the_model() {
    let io = io_of("dora_llama/io.safetensors");
    let adapter = Adapter::load(&fixture("dora_llama/adapter"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let opts = MergeOptions {
        direction: Direction::Merge,
        verify: true,
        force: false,
    };
    let r = merge_checkpoint(&base(), &adapter, &out, opts).unwrap();
    assert_eq!(r.modules_merged, 6);
    let merged = Checkpoint::open(&out).unwrap();
    let mut worst = 0f32;
    for (k, want) in io.iter().filter(|(k, _)| k.starts_with("merged.")) {
        let got = merged.tensor(&k["merged.".len()..], &Device::Cpu).unwrap();
        worst = worst.max(max_abs_diff(&got, want));
    }
    println!("DoRA model-free merge: max |diff| vs PEFT {worst:.3e}");
    assert!(worst < 1e-5, "{worst}");
    // The merged checkpoint gives PEFT's unmerged logits.
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let m = Llama::open(&out, None, DType::F32, &Device::Cpu).unwrap();
    let d = max_abs_diff(&m.forward_t(&ids, false).unwrap(), &io["lora_logits"]);
    assert!(d < 1e-4, "{d}");

    // In the model: merge, compare, unmerge back (layers keep the norm of their merge).
    let mut model = model();
    let before = model.forward_t(&ids, false).unwrap();
    model.merge_adapters().unwrap();
    let d = max_abs_diff(&model.forward_t(&ids, false).unwrap(), &io["lora_logits"]);
    assert!(d < 1e-4, "{d}");
    model.unmerge_adapters().unwrap();
    let d = max_abs_diff(&model.forward_t(&ids, false).unwrap(), &before);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn unmerging_a_dora_adapter_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let o = Command::new(lora_bin())
        .args(["unmerge", "--base"])
        .arg(base())
        .arg("--adapter")
        .arg(fixture("dora_llama/adapter"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("DoRA") && lines[0].contains("cannot be inverted"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `grad.base_model.model.<module>.lora_A.default.weight` → `<module>.lora_A`.
fn our_name(peft: &str) -> String {
    let rest = peft.strip_prefix("base_model.model.").unwrap();
    for (suffix, ours) in [
        (".lora_A.default.weight", ".lora_A"),
        (".lora_B.default.weight", ".lora_B"),
        (
            ".lora_magnitude_vector.default.weight",
            ".lora_magnitude_vector",
        ),
        (".lora_embedding_A.default", ".lora_embedding_A"),
        (".lora_embedding_B.default", ".lora_embedding_B"),
    ] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return format!("{m}{ours}");
        }
    }
    panic!("unexpected parameter {peft}")
}

#[test]
fn dora_training_step_matches_peft_for_a_b_and_magnitude() {
    let io = io_of("dora_llama/io.safetensors");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let vb = builder();
    let model = Llama::load(&LlamaConfig::from_dir(&base()).unwrap(), &vb).unwrap();
    let named: BTreeMap<String, _> = vb.named_trainable_vars().into_iter().collect();
    assert_eq!(named.len(), 18, "A, B and m of 6 modules");
    // The fused step declines DoRA; autograd gives the gradients.
    let logits = model.forward_t(&ids, true).unwrap();
    let loss = causal_lm_loss(&logits, &io["input_ids"]).unwrap();
    let want_loss = io["train_loss"].to_vec1::<f32>().unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got_loss - want_loss).abs() < 1e-5,
        "{got_loss} vs {want_loss}"
    );
    let grads = loss.backward().unwrap();
    let mut worst = 0f32;
    let mut n = 0;
    for (k, want) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let var = &named[&our_name(&k["grad.".len()..])];
        let got = grads.get(var.as_tensor()).unwrap();
        worst = worst.max(max_abs_diff(got, want) / max_of(want));
        n += 1;
    }
    assert_eq!(n, 18);
    println!("DoRA gradients: max |diff| / max |grad| = {worst:.3e}");
    assert!(worst < 1e-4, "{worst}");

    // One AdamW step through the trainer.
    let rows: Vec<Vec<u32>> = ids.to_vec2::<u32>().unwrap();
    let data = Dataset::from_examples(
        "ids",
        rows.into_iter()
            .map(|r| Example {
                labels: r.iter().map(|&x| x as i64).collect(),
                input_ids: r,
            })
            .collect(),
    );
    let tc = TrainConfig {
        lr: 1e-2,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        batch_size: 2,
        length: Length::Steps(1),
        shuffle: false,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let save = SaveMode::Adapter { base_model: None };
    let mut t = Trainer::new(&model, &vb, tc, save, &out).unwrap();
    t.train(&data, None, &mut |_| {}).unwrap();
    let saved = Adapter::load(&out, &Device::Cpu).unwrap();
    assert!(saved.config.use_dora);
    let mut worst = 0f32;
    for (k, want) in io.iter().filter(|(k, _)| k.starts_with("after_step.")) {
        let name = our_name(&k["after_step.".len()..]);
        let (module, factor) = name.rsplit_once('.').unwrap();
        let m = &saved.modules[module];
        let got = match factor {
            "lora_A" => &m.a,
            "lora_B" => &m.b,
            _ => m.magnitude.as_ref().unwrap(),
        };
        worst = worst.max(max_abs_diff(got, want));
    }
    println!("DoRA after one AdamW step: max |diff| vs PEFT {worst:.3e}");
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn dora_layers_match_peft_linear_conv_embedding() {
    let io = io_of("dora_layers/io.safetensors");
    let base = io_of("dora_layers/base.safetensors");
    let a = Adapter::load(&fixture("dora_layers/adapter"), &Device::Cpu).unwrap();
    let rng = LoraRng::new(0);
    let m = |n: &str| a.modules[n].clone();
    let s = 2.0; // α 4 / r 2
    let lin = LoraLinear::from_adapter(
        base["lin.weight"].clone(),
        Some(base["lin.bias"].clone()),
        m("lin").a,
        m("lin").b,
        s,
        0.0,
        "lin",
        &rng,
    )
    .unwrap()
    .with_dora(m("lin").magnitude)
    .unwrap();
    let geom = Conv2dGeometry {
        padding: 1,
        ..Default::default()
    };
    let conv = LoraConv2d::from_adapter(
        base["conv.weight"].clone(),
        Some(base["conv.bias"].clone()),
        geom,
        m("conv").a,
        m("conv").b,
        s,
        0.0,
        "conv",
        &rng,
    )
    .unwrap()
    .with_dora(m("conv").magnitude)
    .unwrap();
    let emb =
        LoraEmbedding::from_adapter(base["emb.weight"].clone(), m("emb").a, m("emb").b, s, "emb")
            .unwrap()
            .with_dora(m("emb").magnitude)
            .unwrap();
    let y_lin = lin.forward_t(&io["x_lin"], true).unwrap();
    let y_conv = conv.forward_t(&io["x_conv"], true).unwrap();
    let y_emb = emb
        .forward(&io["ids"].to_dtype(DType::U32).unwrap())
        .unwrap();
    for (got, key) in [(&y_lin, "y_lin"), (&y_conv, "y_conv"), (&y_emb, "y_emb")] {
        let d = max_abs_diff(got, &io[key]);
        println!("{key}: max |diff| = {d:.3e}");
        assert!(d < 1e-5, "{key}: {d}");
    }
    // Gradients of sum(y·w) for A, B and m of each layer.
    let loss = ((y_lin * &io["w_lin"]).unwrap().sum_all().unwrap()
        + (y_conv * &io["w_conv"]).unwrap().sum_all().unwrap()
        + (y_emb * &io["w_emb"]).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars: BTreeMap<String, candle_core::Var> = [
        ("lin", lin.lora()),
        ("conv", conv.lora()),
        ("emb", emb.lora()),
    ]
    .into_iter()
    .flat_map(|(n, l)| {
        let l = l.unwrap();
        let (fa, fb) = if n == "emb" {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A", "lora_B")
        };
        [
            (format!("{n}.{fa}"), l.a.clone()),
            (format!("{n}.{fb}"), l.b.clone()),
            (
                format!("{n}.lora_magnitude_vector"),
                l.magnitude.clone().unwrap(),
            ),
        ]
    })
    .collect();
    let mut n = 0;
    for (k, want) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = our_name(&k["grad.".len()..]);
        let got = grads.get(vars[&name].as_tensor()).unwrap();
        let rel = max_abs_diff(got, want) / max_of(want);
        assert!(rel < 1e-4, "{name}: {rel}");
        n += 1;
    }
    assert_eq!(n, 9);
    // Merged weights, and the layers' unmerge restoring the base.
    let (mut lin, mut conv, mut emb) = (lin, conv, emb);
    lin.merge().unwrap();
    conv.merge().unwrap();
    emb.merge().unwrap();
    for (got, key, orig) in [
        (lin.weight(), "merged.lin.weight", "lin.weight"),
        (conv.weight(), "merged.conv.weight", "conv.weight"),
        (emb.table(), "merged.emb.weight", "emb.weight"),
    ] {
        let d = max_abs_diff(got, &io[key]);
        assert!(d < 1e-5, "{key}: {d}");
        assert!(max_abs_diff(got, &base[orig]) > 1e-3, "{key} changed");
    }
    let d = max_abs_diff(&lin.forward_t(&io["x_lin"], false).unwrap(), &io["y_lin"]);
    assert!(d < 1e-5, "merged lin: {d}");
    lin.unmerge().unwrap();
    conv.unmerge().unwrap();
    emb.unmerge().unwrap();
    assert!(max_abs_diff(lin.weight(), &base["lin.weight"]) < 1e-5);
    assert!(max_abs_diff(conv.weight(), &base["conv.weight"]) < 1e-5);
    assert!(max_abs_diff(emb.table(), &base["emb.weight"]) < 1e-5);
}

#[test]
fn new_dora_layers_start_with_peft_magnitude_so_outputs_equal_plain_lora() {
    use lora::{config::InitLoraWeights, LoraSpec};
    let dev = Device::Cpu;
    let rng = LoraRng::new(4);
    let w = Tensor::randn(0f32, 0.5, (8, 16), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap();
    let spec = LoraSpec {
        init: InitLoraWeights::Random,
        use_dora: true,
        ..LoraSpec::new(2, 4.0)
    };
    let d = LoraLinear::new(w.clone(), None, &spec, &rng, "lin").unwrap();
    let l = d.lora().unwrap();
    // m = ‖W0 + s·B·A‖ per row, so k = 1 and DoRA's output equals plain LoRA's.
    let w_eff = (&w + (l.b.as_tensor().matmul(l.a.as_tensor()).unwrap() * 2.0).unwrap()).unwrap();
    let norms = w_eff.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    assert!(max_abs_diff(l.magnitude.as_ref().unwrap().as_tensor(), &norms) < 1e-5);
    let want = x.matmul(&w_eff.t().unwrap()).unwrap();
    assert!(max_abs_diff(&d.forward_t(&x, false).unwrap(), &want) < 1e-5);
    assert_eq!(d.num_trainable(), 2 * 16 + 8 * 2 + 8);
}
