//! Training against PEFT's fixture: one AdamW step from the saved `llama_qv` adapter must give
//! PEFT's loss, gradients and updated weights, in the library and through `lora train`; plus
//! resume, divergence, bad data and full fine-tuning through the CLI.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use lora::models::{Llama, LlamaConfig};
use lora::tensor_file::SafeFile;
use lora::train::data::{Dataset, Example};
use lora::train::metrics::{read_metrics, Record};
use lora::train::{Length, SaveMode, Schedule, TrainConfig, Trainer};
use lora::{Adapter, Checkpoint, LoraBuilder};

use crate::common::{fixture, lora_bin, max_abs_diff};

fn io() -> SafeFile {
    SafeFile::open(&fixture("llama_qv/io.safetensors")).unwrap()
}

fn input_rows() -> Vec<Vec<u32>> {
    io().tensor("input_ids", &Device::Cpu)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
}

/// `base_model.model.<module>.lora_A.default.weight` → (`<module>`, "A").
fn peft_param(name: &str) -> (String, &'static str) {
    let rest = name.strip_prefix("base_model.model.").unwrap();
    for (suffix, f) in [
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
    ] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return (m.to_string(), f);
        }
    }
    panic!("unexpected parameter {name}")
}

/// Fixture tensors under `prefix` (`grad.`, `after_step.`) keyed by (module, factor).
fn fixture_params(prefix: &str) -> BTreeMap<(String, &'static str), Tensor> {
    let f = io();
    f.names()
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix).map(|p| (n.clone(), peft_param(p))))
        .map(|(n, k)| (k, f.tensor(&n, &Device::Cpu).unwrap()))
        .collect()
}

/// max over modules of |ours − fixture| for the adapter's factors.
fn adapter_vs(adapter: &Adapter, want: &BTreeMap<(String, &'static str), Tensor>) -> f32 {
    assert_eq!(want.len(), 2 * adapter.modules.len());
    want.iter()
        .map(|((m, f), t)| {
            let ours = &adapter.modules[m];
            max_abs_diff(if *f == "A" { &ours.a } else { &ours.b }, t)
        })
        .fold(0.0, f32::max)
}

fn fixture_loss() -> f64 {
    io().tensor("train_loss", &Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64
}

#[test]
fn one_adamw_step_from_the_fixture_adapter_matches_peft() {
    let dev = Device::Cpu;
    let base = fixture("llama_qv/base");
    let cfg = LlamaConfig::from_dir(&base).unwrap();
    let adapter = Adapter::load(&fixture("llama_qv/adapter"), &dev).unwrap();
    let vb = LoraBuilder::new(Checkpoint::open(&base).unwrap(), DType::F32, dev.clone())
        .with_adapter(adapter)
        .unwrap();
    let model = Llama::load(&cfg, &vb).unwrap();

    // Gradients of the transformers loss, before any update: within 1e-4 of the largest.
    let ids = io()
        .tensor("input_ids", &dev)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let logits = lora::models::CausalLm::forward_t(&model, &ids, true).unwrap();
    let loss =
        lora::train::loss::causal_lm_loss(&logits, &ids.to_dtype(DType::I64).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let named: BTreeMap<String, _> = vb.named_trainable_vars().into_iter().collect();
    let mut worst = 0f32;
    for ((m, f), want) in fixture_params("grad.") {
        let var = &named[&format!("{m}.lora_{f}")];
        let got = grads.get(var.as_tensor()).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(max_abs_diff(got, &want) / scale);
    }
    assert!(worst < 1e-4, "gradients: max relative difference {worst:e}");

    let data = Dataset::from_examples(
        "ids",
        input_rows()
            .into_iter()
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
    let save = SaveMode::Adapter {
        base_model: Some(base.display().to_string()),
    };
    let mut t = Trainer::new(&model, &vb, tc, save, &out).unwrap();
    let s = t.train(&data, None, &mut |_| {}).unwrap();
    let loss_diff = (s.losses()[0] - fixture_loss()).abs();
    assert!(loss_diff < 1e-5, "train loss differs by {loss_diff:e}");
    let after = fixture_params("after_step.");
    let d_live = adapter_vs(&vb.adapter().unwrap(), &after);
    let d_saved = adapter_vs(&Adapter::load(&out, &dev).unwrap(), &after);
    assert!(d_live < 1e-5, "after_step: max |diff| {d_live:e}");
    assert!(d_saved < 1e-5, "saved adapter: max |diff| {d_saved:e}");
    eprintln!(
        "fixture step: |loss diff| {loss_diff:e}, grad rel {worst:e}, after_step {d_saved:e}"
    );
}

fn lora(args: &[&dyn AsRef<OsStr>]) -> Output {
    lora_os(args.iter().map(|a| a.as_ref().to_os_string()).collect())
}

fn lora_os(args: Vec<OsString>) -> Output {
    Command::new(lora_bin())
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "lora train failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn fails(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

fn write_ids(path: &Path, rows: &[Vec<u32>]) {
    let text: String = rows
        .iter()
        .map(|r| format!("{}\n", serde_json::json!({ "input_ids": r })))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn json(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn lora_train_cli_reproduces_the_peft_step_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ids.jsonl");
    write_ids(&data, &input_rows());
    let out = dir.path().join("out");
    let base = fixture("llama_qv/base");
    let stdout = ok(&lora(&[
        &"--model",
        &base,
        &"--adapter-init",
        &fixture("llama_qv/adapter"),
        &"--data",
        &data,
        &"--batch-size",
        &"2",
        &"--steps",
        &"1",
        &"--lr",
        &"1e-2",
        &"--schedule",
        &"constant",
        &"--warmup-steps",
        &"0",
        &"--weight-decay",
        &"0",
        &"--max-grad-norm",
        &"0",
        &"--dropout",
        &"0",
        &"--no-shuffle",
        &"--out",
        &out,
    ]));
    assert!(stdout.contains("trained 1 steps"), "{stdout}");
    // The memory ledger names the exact sizes: every base tensor frozen (f32), A and B trainable.
    let mib = |path: &std::path::Path| {
        let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let bytes: usize = t.values().map(|t| t.elem_count() * 4).sum();
        bytes as f64 / (1024.0 * 1024.0)
    };
    let frozen = mib(&fixture("llama_qv/base/model.safetensors"));
    let trainable = mib(&fixture("llama_qv/adapter/adapter_model.safetensors"));
    let want = format!(
        "memory: frozen weights {frozen:.2} MiB, trainable {trainable:.2} MiB, gradients \
         {trainable:.2} MiB, AdamW state {:.2} MiB; heap peak while training ",
        2.0 * trainable
    );
    assert!(stdout.contains(&want), "{want}\n{stdout}");

    let ours = SafeFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let theirs = SafeFile::open(&fixture("llama_qv/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.names(), theirs.names(), "PEFT's keys");
    assert_eq!(ours.metadata(), theirs.metadata());
    for k in theirs.names() {
        assert_eq!(
            ours.info(&k).unwrap(),
            theirs.info(&k).unwrap(),
            "{k}: dtype and shape"
        );
    }
    let adapter = Adapter::load(&out, &Device::Cpu).unwrap();
    let d = adapter_vs(&adapter, &fixture_params("after_step."));
    assert!(d < 1e-5, "CLI adapter vs after_step: max |diff| {d:e}");
    eprintln!("CLI fixture step: after_step max |diff| {d:e}");

    let cfg_ours = json(&out.join("adapter_config.json"));
    let cfg_theirs = json(&fixture("llama_qv/adapter/adapter_config.json"));
    assert_eq!(
        cfg_ours
            .keys()
            .filter(|k| *k != "auto_mapping")
            .collect::<Vec<_>>(),
        cfg_theirs
            .keys()
            .filter(|k| *k != "auto_mapping")
            .collect::<Vec<_>>(),
        "PEFT's config fields"
    );
    assert_eq!(cfg_ours["task_type"], "CAUSAL_LM");
    assert_eq!(
        cfg_ours["base_model_name_or_path"],
        base.display().to_string()
    );
    for k in [
        "r",
        "lora_alpha",
        "target_modules",
        "peft_type",
        "lora_dropout",
    ] {
        assert_eq!(cfg_ours[k], cfg_theirs[k], "{k}");
    }

    let recs = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let [Record::Step(s)] = recs.as_slice() else {
        panic!("{recs:?}")
    };
    assert!((s.loss - fixture_loss()).abs() < 1e-5);
    assert!((s.lr - 1e-2).abs() < 1e-15);
    assert!(out.join("loss.png").is_file());
}

/// A run on synthetic ids with fresh adapters, dropout and shuffling.
fn synthetic(dir: &Path) -> PathBuf {
    let rows: Vec<Vec<u32>> = (0..10u32)
        .map(|i| (0..6 + i % 4).map(|j| (i * 37 + j * 11) % 128).collect())
        .collect();
    let p = dir.join("syn.jsonl");
    write_ids(&p, &rows);
    p
}

/// `--model <fixture base> --data D --out O`, batch 3 × 2 accumulated, lr 5e-3, dropout 0.1,
/// seed 3 (unless `extra` sets them), then `extra`.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "--model".into(),
        BASE.clone().into(),
        "--data".into(),
        data.into(),
        "--out".into(),
        out.into(),
    ];
    let defaults = [
        ("--batch-size", "3"),
        ("--grad-accum", "2"),
        ("--lr", "5e-3"),
        ("--dropout", "0.1"),
        ("--seed", "3"),
    ];
    for (k, val) in defaults {
        if !extra.contains(&k) {
            v.extend([k.into(), val.into()]);
        }
    }
    v.extend(extra.iter().map(OsString::from));
    v
}

static BASE: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| fixture("llama_qv/base"));

fn losses(out: &Path) -> Vec<f64> {
    read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some(s.loss),
            _ => None,
        })
        .collect()
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs())
}

#[test]
fn lora_train_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let w = "adapter_model.safetensors";

    // Uninterrupted: 4 steps (linear schedule), checkpoints at 2 and 4.
    let full = dir.path().join("full");
    ok(&lora_os(train_args(
        &data,
        &full,
        &["--steps", "4", "--save-every", "2"],
    )));
    let want = losses(&full);
    assert_eq!(want.len(), 4);
    // Resume from its step-2 checkpoint into a new folder.
    let resumed = dir.path().join("resumed");
    let ck = full.join("checkpoint-2");
    ok(&lora_os(train_args(
        &data,
        &resumed,
        &[
            "--steps",
            "4",
            "--save-every",
            "2",
            "--resume",
            ck.to_str().unwrap(),
        ],
    )));
    assert!(
        close(&losses(&resumed), &want),
        "{:?} vs {want:?}",
        losses(&resumed)
    );
    assert!(
        same_files(&resumed.join(w), &full.join(w)),
        "final adapter bit-identical"
    );

    // Train 2 steps, then resume the same folder to 4 (constant lr: the plan does not matter).
    let long = dir.path().join("long");
    ok(&lora_os(train_args(
        &data,
        &long,
        &["--steps", "4", "--schedule", "constant"],
    )));
    let short = dir.path().join("short");
    ok(&lora_os(train_args(
        &data,
        &short,
        &["--steps", "2", "--schedule", "constant"],
    )));
    let stdout = ok(&lora_os(train_args(
        &data,
        &short,
        &[
            "--steps",
            "4",
            "--schedule",
            "constant",
            "--resume",
            short.to_str().unwrap(),
        ],
    )));
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    assert!(close(&losses(&short), &losses(&long)));
    assert!(same_files(&short.join(w), &long.join(w)));
}

#[test]
fn lora_train_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let out = dir.path().join("out");
    // From the fixture adapter (A and B both non-zero), lr 1e36 moves both factors by ~1e36 in
    // the first step; the next forward overflows f32 (s·B·A·x ~ 1e72) and the loss is NaN.
    let init = fixture("llama_qv/adapter");
    let err = fails(&lora_os(train_args(
        &data,
        &out,
        &[
            "--adapter-init",
            init.to_str().unwrap(),
            "--steps",
            "6",
            "--save-every",
            "1",
            "--lr",
            "1e36",
            "--max-grad-norm",
            "0",
        ],
    )));
    assert!(err.contains("diverged at step"), "{err}");
    let step: usize = err
        .split("diverged at step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let last = out.join(format!("checkpoint-{}", step - 1));
    assert!(err.contains(&last.display().to_string()), "{err}");
    Adapter::load(&last, &Device::Cpu).unwrap();
    assert!(!out.join(format!("checkpoint-{step}")).exists());
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no final adapter"
    );
}

#[test]
fn lora_train_rejects_bad_data_and_targets_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2,\n",
    )
    .unwrap();
    let err = fails(&lora_os(train_args(&data, &out, &["--steps", "1"])));
    assert!(
        err.contains("data.jsonl") && err.contains("line 2"),
        "{err}"
    );
    assert!(!out.exists(), "no output on error");

    std::fs::write(&data, "{\"input_ids\": [1, 200]}\n").unwrap();
    let err = fails(&lora_os(train_args(&data, &out, &["--steps", "1"])));
    assert!(
        err.contains("line 1") && err.contains("token id 200"),
        "{err}"
    );

    let good = synthetic(dir.path());
    let err = fails(&lora_os(train_args(
        &good,
        &out,
        &["--target-modules", "qkv"],
    )));
    for name in ["qkv", "q_proj", "v_proj", "gate_proj", "lm_head"] {
        assert!(err.contains(name), "{name}: {err}");
    }
    assert!(!out.exists(), "no output on error");

    // Text needs a tokenizer: the fixture model has none.
    std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
    let err = fails(&lora_os(train_args(&data, &out, &["--steps", "1"])));
    assert!(
        err.contains("data.jsonl line 1") && err.contains("tokenizer"),
        "{err}"
    );
}

/// A model folder: the fixture base plus a word-level tokenizer of `n` words (+ `<unk>`, `<s>`).
fn model_with_tokenizer(dir: &Path, n: usize) -> PathBuf {
    let m = dir.join(format!("model{n}"));
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(BASE.join(f), m.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("<s>".into(), 1.into());
    for i in 0..n {
        vocab.insert(format!("w{i}"), (i + 2).into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    m
}

#[test]
fn lora_train_on_text_and_prompt_completion_with_eval_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(dir.path(), 60);
    let data = dir.path().join("d.jsonl");
    let mut text = String::new();
    for i in 0..8 {
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"text": format!("w{} w{} w{} w{}", i, i + 1, i + 2, i + 3)})
        ));
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("w{} w{}", i, i * 2), "completion": format!(" w{}", i * 3)})
        ));
    }
    std::fs::write(&data, &text).unwrap();
    let out = dir.path().join("out");
    let merged = dir.path().join("merged");
    ok(&lora(&[
        &"--model",
        &model,
        &"--data",
        &data,
        &"--eval-data",
        &data,
        &"--out",
        &out,
        &"--epochs",
        &"3",
        &"--batch-size",
        &"4",
        &"--lr",
        &"1e-2",
        &"--eval-every",
        &"2",
        &"--target-modules",
        &"all-linear",
        &"--r",
        &"4",
        &"--alpha",
        &"8",
        &"--merge-out",
        &merged,
    ]));
    let recs = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<f64> = recs
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some(e.eval_loss),
            _ => None,
        })
        .collect();
    // 16 examples / 4 = 4 steps per epoch, 12 steps: eval at 2, 4, ..., 12.
    assert_eq!(evals.len(), 6);
    assert!(evals[5] < evals[0], "held-out loss falls: {evals:?}");
    let a = Adapter::load(&out, &Device::Cpu).unwrap();
    assert_eq!(
        a.modules.len(),
        2 * 7,
        "all-linear: 7 linears per layer, lm_head excluded"
    );
    assert_eq!(a.config.r, 4);
    // The merged folder is base + ΔW.
    let base = SafeFile::open(&BASE.join("model.safetensors")).unwrap();
    let m = SafeFile::open(&merged.join("model.safetensors")).unwrap();
    let name = "model.layers.1.mlp.down_proj";
    let delta = a.modules[name]
        .delta_weight(a.scale_for(name).unwrap(), false)
        .unwrap();
    let key = format!("{name}.weight");
    let want = (base.tensor(&key, &Device::Cpu).unwrap() + delta).unwrap();
    assert!(max_abs_diff(&m.tensor(&key, &Device::Cpu).unwrap(), &want) < 1e-5);

    // A tokenizer larger than the model's vocabulary (128) is refused.
    let big = model_with_tokenizer(dir.path(), 200);
    let err = fails(&lora(&[
        &"--model",
        &big,
        &"--data",
        &data,
        &"--out",
        &dir.path().join("o2"),
    ]));
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab_size is 128"),
        "{err}"
    );
}

#[test]
fn lora_train_full_finetuning_writes_a_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let out = dir.path().join("out");
    ok(&lora(&[
        &"--model",
        &*BASE,
        &"--data",
        &data,
        &"--out",
        &out,
        &"--full",
        &"--steps",
        &"2",
        &"--lr",
        &"1e-3",
        &"--batch-size",
        &"4",
        &"--schedule",
        &"constant",
    ]));
    let base = SafeFile::open(&BASE.join("model.safetensors")).unwrap();
    let ours = SafeFile::open(&out.join("model.safetensors")).unwrap();
    assert_eq!(ours.names(), base.names());
    let mut changed = 0;
    for k in base.names() {
        assert_eq!(ours.info(&k).unwrap(), base.info(&k).unwrap(), "{k}");
        if ours.bytes(&k).unwrap() != base.bytes(&k).unwrap() {
            changed += 1;
        }
    }
    assert_eq!(changed, base.names().len(), "every weight trained");
    assert!(same_files(
        &out.join("config.json"),
        &BASE.join("config.json")
    ));
    assert!(!out.join("adapter_model.safetensors").exists());
    // The written model opens, and fits the training data better than the base.
    let rows = std::fs::read_to_string(&data).unwrap();
    let first: Vec<u32> = serde_json::from_str::<serde_json::Value>(rows.lines().next().unwrap())
        .unwrap()["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let loss_of = |dir: &Path, ids: &Tensor| -> f32 {
        let m = Llama::open(dir, None, DType::F32, &Device::Cpu).unwrap();
        let logits = lora::models::CausalLm::forward_t(&m, ids, false).unwrap();
        let labels = ids.to_dtype(DType::I64).unwrap();
        lora::train::loss::causal_lm_loss(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let first = Tensor::new(vec![first], &Device::Cpu).unwrap();
    assert!(loss_of(&out, &first) < loss_of(&BASE, &first));

    // Full fine-tuning resumes exactly too: 1 step, then resumed to 2, equals the 2-step run.
    let short = dir.path().join("short");
    let args = |steps: &'static str, extra: &[&dyn AsRef<OsStr>]| -> Output {
        let mut v: Vec<&dyn AsRef<OsStr>> = vec![
            &"--model",
            &*BASE,
            &"--data",
            &data,
            &"--out",
            &short,
            &"--full",
            &"--lr",
            &"1e-3",
            &"--batch-size",
            &"4",
            &"--schedule",
            &"constant",
            &"--steps",
        ];
        v.push(&steps);
        v.extend_from_slice(extra);
        lora(&v)
    };
    ok(&args("1", &[]));
    ok(&args("2", &[&"--resume", &short]));
    assert!(same_files(
        &short.join("model.safetensors"),
        &out.join("model.safetensors")
    ));
}

/// `--gradient-checkpointing` (activation checkpointing per decoder layer) trains to the same
/// losses (1e-6 relative) and adapter (1e-6 absolute) as the default, with dropout and
/// gradient accumulation, and says so in the memory line.
#[test]
fn lora_train_with_gradient_checkpointing_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let (plain, ckpt) = (dir.path().join("plain"), dir.path().join("ckpt"));
    let a = ok(&lora_os(train_args(&data, &plain, &["--steps", "3"])));
    let b = ok(&lora_os(train_args(
        &data,
        &ckpt,
        &["--steps", "3", "--gradient-checkpointing"],
    )));
    assert!(!a.contains("activation checkpointing"), "{a}");
    assert!(b.contains("with activation checkpointing"), "{b}");
    let (la, lb) = (losses(&plain), losses(&ckpt));
    assert_eq!(la.len(), 3);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{la:?} vs {lb:?}");
    }
    let w = "adapter_model.safetensors";
    let dev = candle_core::Device::Cpu;
    let ta = candle_core::safetensors::load(plain.join(w), &dev).unwrap();
    let tb = candle_core::safetensors::load(ckpt.join(w), &dev).unwrap();
    assert_eq!(ta.len(), tb.len());
    assert!(!ta.is_empty());
    for (name, t) in &ta {
        let d = max_abs_diff(t, &tb[name]);
        assert!(d <= 1e-6, "{name}: {d}");
    }
}
