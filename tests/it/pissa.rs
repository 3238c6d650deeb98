//! PiSSA and OLoRA (`init_lora_weights = "pissa" | "olora"`) and `lora convert-init` against
//! PEFT 0.21.2, with `tests/fixtures/pissa_olora` (made by `scripts/make_pissa_olora_fixtures.py`
//! on the `llama_qv` base, r 4, α 8, q_proj and v_proj):
//!
//! - the initial factors equal PEFT's up to the sign of each rank component (singular vectors and
//!   Householder columns are defined up to sign; the products are compared too), 1e-4;
//! - the residual base `W − s·B0·A0` equals PEFT's, 1e-5;
//! - after one AdamW step, the converted rank-8 adapter on the original base gives the trained
//!   adapter's logits on the residual base (1e-4) and PEFT's converted adapter's logits (1e-4).

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lora::models::{CausalLm, Llama, LlamaConfig};
use lora::tensor_file::SafeFile;
use lora::train::data::{Dataset, Example};
use lora::train::{Length, SaveMode, Schedule, TrainConfig, Trainer};
use lora::{Adapter, Checkpoint, InitLoraWeights, LoraBuilder, LoraConfig};

use crate::common::{fixture, lora_bin, max_abs_diff};

fn io() -> BTreeMap<String, Tensor> {
    let f = SafeFile::open(&fixture("pissa_olora/io.safetensors")).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.tensor(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

fn base() -> std::path::PathBuf {
    fixture("llama_qv/base")
}

fn config(method: &str) -> LoraConfig {
    LoraConfig {
        lora_dropout: 0.0,
        init_lora_weights: InitLoraWeights::Other(method.into()),
        task_type: Some("CAUSAL_LM".into()),
        ..LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])
    }
}

/// max over rank components i of |ours_i·sign_i − peft_i| for rows of A and columns of B, with
/// sign_i chosen from A's row.
fn up_to_sign(a: &Tensor, b: &Tensor, pa: &Tensor, pb: &Tensor) -> f32 {
    let r = a.dim(0).unwrap();
    let mut worst = 0f32;
    for i in 0..r {
        let (ai, pai) = (a.get(i).unwrap(), pa.get(i).unwrap());
        let dot = (&ai * &pai)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = if dot < 0.0 { -1.0 } else { 1.0 };
        let bi = b.narrow(1, i, 1).unwrap();
        let pbi = pb.narrow(1, i, 1).unwrap();
        worst = worst
            .max(max_abs_diff(&(ai * s).unwrap(), &pai))
            .max(max_abs_diff(&(bi * s).unwrap(), &pbi));
    }
    worst
}

fn check(method: &str) {
    let io = io();
    let dev = Device::Cpu;
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let lcfg = LlamaConfig::from_dir(&base()).unwrap();
    let vb = LoraBuilder::new(Checkpoint::open(&base()).unwrap(), DType::F32, dev.clone())
        .with_config(config(method))
        .unwrap();
    let model = Llama::load(&lcfg, &vb).unwrap();
    let initial = vb.adapter().unwrap();
    assert_eq!(initial.modules.len(), 4);
    let mut worst_f = 0f32;
    let mut worst_p = 0f32;
    for (name, m) in &initial.modules {
        let pa = &io[&format!("{method}.init.{name}.lora_A")];
        let pb = &io[&format!("{method}.init.{name}.lora_B")];
        worst_f = worst_f.max(up_to_sign(&m.a, &m.b, pa, pb));
        let ours = m.b.matmul(&m.a).unwrap();
        worst_p = worst_p.max(max_abs_diff(&ours, &pb.matmul(pa).unwrap()));
    }
    println!("{method}: initial factors vs PEFT (up to sign) {worst_f:.3e}, B·A {worst_p:.3e}");
    assert!(worst_f < 1e-4 && worst_p < 1e-5, "{worst_f} {worst_p}");
    // At init the model's output is the base's: W_res + s·B0·A0 = W.
    let base_logits = Llama::open(&base(), None, DType::F32, &dev)
        .unwrap()
        .forward_t(&ids, false)
        .unwrap();
    assert!(max_abs_diff(&model.forward_t(&ids, false).unwrap(), &base_logits) < 1e-4);

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
    lora::convert::save_initial_and_residual(&initial, &base(), &out).unwrap();
    t.train(&data, None, &mut |_| {}).unwrap();

    let residual_dir = out.join(lora::convert::RESIDUAL_DIR);
    let residual = Checkpoint::open(&residual_dir).unwrap();
    let mut worst_r = 0f32;
    for name in initial.modules.keys() {
        let w = residual.tensor(&format!("{name}.weight"), &dev).unwrap();
        worst_r = worst_r.max(max_abs_diff(
            &w,
            &io[&format!("{method}.residual.{name}.weight")],
        ));
    }
    println!("{method}: residual base vs PEFT {worst_r:.3e}");
    assert!(worst_r < 1e-5, "{worst_r}");

    let trained = Adapter::load(&out, &dev).unwrap();
    let init_saved = Adapter::load(&out.join(lora::convert::INITIAL_DIR), &dev).unwrap();
    assert_eq!(
        init_saved.config.init_lora_weights,
        InitLoraWeights::Default
    );
    let converted = lora::convert::convert_init(&init_saved, &trained).unwrap();
    assert_eq!(converted.config.r, 8);
    let on_residual = Llama::open(&residual_dir, Some(trained.into()), DType::F32, &dev)
        .unwrap()
        .forward_t(&ids, false)
        .unwrap();
    let on_base = Llama::open(&base(), Some(converted.into()), DType::F32, &dev)
        .unwrap()
        .forward_t(&ids, false)
        .unwrap();
    let d1 = max_abs_diff(&on_base, &on_residual);
    let d2 = max_abs_diff(&on_base, &io[&format!("{method}.converted_logits")]);
    println!(
        "{method}: converted on base vs trained on residual {d1:.3e}, vs PEFT's converted {d2:.3e}"
    );
    assert!(d1 < 1e-4 && d2 < 1e-4, "{d1} {d2}");
    // The step changed the outputs, so the comparison has teeth.
    assert!(max_abs_diff(&on_base, &base_logits) > 1e-3);
}

#[test]
fn pissa_init_training_and_conversion_match_peft() {
    check("pissa");
}

#[test]
fn olora_init_training_and_conversion_match_peft() {
    check("olora");
}

#[test]
fn lora_train_with_olora_writes_residual_and_convert_init_makes_a_plain_lora() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let rows = io()["input_ids"].to_vec2::<i64>().unwrap();
    let text: String = rows
        .iter()
        .map(|r| format!("{}\n", serde_json::json!({ "input_ids": r })))
        .collect();
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("out");
    let o = Command::new(lora_bin())
        .args([
            "train",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--r",
            "4",
            "--alpha",
            "8",
        ])
        .args([
            "--init-lora-weights",
            "olora",
            "--dropout",
            "0",
            "--lr",
            "1e-2",
        ])
        .arg("--model")
        .arg(base())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("residual_model/model.safetensors").is_file());
    let conv = dir.path().join("conv");
    let o = Command::new(lora_bin())
        .arg("convert-init")
        .arg("--initial")
        .arg(out.join("initial_adapter"))
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(&conv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = Adapter::load(&conv, &Device::Cpu).unwrap();
    assert_eq!((c.config.r, c.config.lora_alpha), (8, 16.0));
    let ids = io()["input_ids"].to_dtype(DType::U32).unwrap();
    let dev = Device::Cpu;
    let a = Llama::open(&base(), Some(c.into()), DType::F32, &dev)
        .unwrap()
        .forward_t(&ids, false)
        .unwrap();
    let trained = Adapter::load(&out, &dev).unwrap();
    let b = Llama::open(
        &out.join("residual_model"),
        Some(trained.into()),
        DType::F32,
        &dev,
    )
    .unwrap()
    .forward_t(&ids, false)
    .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "{d}");
}
