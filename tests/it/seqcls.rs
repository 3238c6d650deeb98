//! PEFT `SEQ_CLS` adapters with `modules_to_save` on tiny BERT and Llama classifiers
//! (`tests/fixtures/{bert_cls,llama_cls}`, made by `scripts/make-seqcls-fixtures.py`): loading,
//! logits, merged logits, the merged checkpoint and one AdamW step on labels.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use lora::merge::{merge_checkpoint, Direction, MergeOptions};
use lora::model_weights::Checkpoint;
use lora::models::{classification_loss, Classifier, ClassifierInputs, LoraInit};
use lora::tensor_file::SafeFile;
use lora::train::optim::{AdamW, AdamWConfig};
use lora::Adapter;

use crate::common::{fixture, max_abs_diff};

struct Fx {
    name: &'static str,
    io: SafeFile,
}

impl Fx {
    fn new(name: &'static str) -> Self {
        let io = SafeFile::open(&fixture(&format!("{name}/io.safetensors"))).unwrap();
        Fx { name, io }
    }
    fn t(&self, key: &str) -> Tensor {
        self.io.tensor(key, &Device::Cpu).unwrap()
    }
    fn has(&self, key: &str) -> bool {
        self.io.names().iter().any(|n| n == key)
    }
    fn inputs(&self) -> ClassifierInputs {
        let opt = |k: &str| self.has(k).then(|| self.t(k).to_dtype(DType::U32).unwrap());
        ClassifierInputs {
            input_ids: self.t("input_ids").to_dtype(DType::U32).unwrap(),
            attention_mask: opt("attention_mask"),
            token_type_ids: opt("token_type_ids"),
        }
    }
    fn dir(&self, sub: &str) -> std::path::PathBuf {
        fixture(&format!("{}/{sub}", self.name))
    }
    fn adapter(&self) -> Adapter {
        Adapter::load(&self.dir("adapter"), &Device::Cpu).unwrap()
    }
    fn open(&self, lora: Option<LoraInit>) -> Classifier {
        Classifier::open(&self.dir("base"), lora, DType::F32, &Device::Cpu).unwrap()
    }
}

fn logits_and_merged_logits_match(name: &'static str, head: &str) {
    let fx = Fx::new(name);
    let x = fx.inputs();
    let base = fx.open(None).logits(&x, false).unwrap();
    let d_base = max_abs_diff(&base, &fx.t("base_logits"));
    let adapter = fx.adapter();
    assert_eq!(
        adapter.saved.keys().collect::<Vec<_>>(),
        (head == "classifier")
            .then(|| format!("{head}.bias"))
            .into_iter()
            .chain([format!("{head}.weight")])
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    let mut m = fx.open(Some(adapter.into()));
    let lora = m.logits(&x, false).unwrap();
    let d_lora = max_abs_diff(&lora, &fx.t("lora_logits"));
    m.merge_adapters().unwrap();
    let merged = m.logits(&x, false).unwrap();
    let d_merged = max_abs_diff(&merged, &fx.t("merged_logits"));
    eprintln!("{name}: base {d_base:e}, lora {d_lora:e}, merged {d_merged:e}");
    assert!(d_base < 1e-4 && d_lora < 1e-4 && d_merged < 1e-4);
    // The adapter changes the logits by far more than the tolerance.
    assert!(max_abs_diff(&base, &fx.t("lora_logits")) > 1e-2);
}

#[test]
fn bert_seq_cls_adapter_logits_and_merged_logits_match_peft() {
    logits_and_merged_logits_match("bert_cls", "classifier");
}

#[test]
fn llama_seq_cls_adapter_logits_and_merged_logits_match_peft() {
    logits_and_merged_logits_match("llama_cls", "score");
}

fn merged_checkpoint_matches(name: &'static str) {
    let fx = Fx::new(name);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let opts = MergeOptions {
        direction: Direction::Merge,
        verify: true,
        force: false,
    };
    let r = merge_checkpoint(&fx.dir("base"), &fx.adapter(), &out, opts).unwrap();
    assert!(r.verify_max_abs_diff.unwrap() < 1e-6);
    let ours = Checkpoint::open(&out).unwrap();
    let theirs = Checkpoint::open(&fx.dir("merged")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    let mut worst = 0f32;
    for n in theirs.names() {
        let d = max_abs_diff(
            &ours.tensor(&n, &Device::Cpu).unwrap(),
            &theirs.tensor(&n, &Device::Cpu).unwrap(),
        );
        worst = worst.max(d);
    }
    eprintln!("{name}: merged checkpoint max |diff| {worst:e}");
    assert!(worst < 1e-5);
    // Unmerging cannot restore a replaced head.
    let e = merge_checkpoint(
        &out,
        &fx.adapter(),
        &dir.path().join("back"),
        MergeOptions {
            direction: Direction::Unmerge,
            ..opts
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("modules_to_save"), "{e}");
}

#[test]
fn bert_seq_cls_merged_checkpoint_with_head_matches_peft() {
    merged_checkpoint_matches("bert_cls");
}

#[test]
fn llama_seq_cls_merged_checkpoint_with_head_matches_peft() {
    merged_checkpoint_matches("llama_cls");
}

/// The fixture's torch parameter name → our trainable-variable name:
/// `base_model.model.X.lora_A.default.weight` → `X.lora_A`,
/// `base_model.model.classifier.modules_to_save.default.weight` → `classifier.weight`.
fn our_name(torch: &str) -> String {
    let p = torch.strip_prefix("base_model.model.").unwrap();
    if p.contains(".modules_to_save.default.") {
        return p.replace(".modules_to_save.default", "");
    }
    p.strip_suffix(".default.weight").unwrap().to_string()
}

fn one_adamw_step_matches(name: &'static str) {
    let fx = Fx::new(name);
    let m = fx.open(Some(fx.adapter().into()));
    let named: BTreeMap<String, _> = m.builder().named_trainable_vars().into_iter().collect();
    let x = fx.inputs();
    let loss = classification_loss(&m.logits(&x, true).unwrap(), &fx.t("labels")).unwrap();
    let loss_diff =
        (loss.to_scalar::<f32>().unwrap() - fx.t("train_loss").to_vec1::<f32>().unwrap()[0]).abs();
    assert!(loss_diff < 1e-5, "loss differs by {loss_diff:e}");
    let grads = loss.backward().unwrap();
    let names = fx.io.names();
    let grad_keys: Vec<_> = names.iter().filter(|n| n.starts_with("grad.")).collect();
    assert_eq!(grad_keys.len(), named.len(), "{:?}", named.keys());
    let mut worst = 0f32;
    for k in &grad_keys {
        let want = fx.t(k);
        let var = &named[&our_name(k.strip_prefix("grad.").unwrap())];
        let got = grads
            .get(var.as_tensor())
            .expect("a gradient for every trainable variable");
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
    let vars: Vec<_> = named.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    let gs: Vec<_> = vars
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).cloned())
        .collect();
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    AdamW::new(vars, cfg).unwrap().step(&gs, 1e-2).unwrap();
    let mut step_worst = 0f32;
    for (n, v) in &named {
        let key = grad_keys
            .iter()
            .map(|k| k.strip_prefix("grad.").unwrap())
            .find(|k| our_name(k) == *n)
            .unwrap();
        let d = max_abs_diff(v.as_tensor(), &fx.t(&format!("after_step.{key}")));
        step_worst = step_worst.max(d);
    }
    // The trained adapter, saved, holds the stepped head under PEFT's key.
    let dir = tempfile::tempdir().unwrap();
    m.builder().adapter().unwrap().save(dir.path()).unwrap();
    let saved = SafeFile::open(&dir.path().join("adapter_model.safetensors")).unwrap();
    let theirs = SafeFile::open(&fx.dir("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(saved.names(), theirs.names());
    eprintln!("{name}: loss {loss_diff:e}, grad rel {worst:e}, after_step {step_worst:e}");
    assert!(step_worst < 1e-5, "after_step: max |diff| {step_worst:e}");
}

#[test]
fn bert_seq_cls_adamw_step_on_lora_and_head_matches_peft() {
    one_adamw_step_matches("bert_cls");
}

#[test]
fn llama_seq_cls_adamw_step_on_lora_and_head_matches_peft() {
    one_adamw_step_matches("llama_cls");
}

/// `lora train` on labelled `input_ids` JSONL, then `lora inspect` and `lora logits` on the
/// result: the saved SEQ_CLS adapter carries the trained head under PEFT's key, and the logits
/// the CLI writes are the classifier's `[batch, num_labels]` with that adapter.
#[test]
fn cli_trains_a_bert_classifier_and_runs_inspect_and_logits() {
    use std::process::Command;
    let fx = Fx::new("bert_cls");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let mut lines = String::new();
    for i in 0..8u32 {
        let ids: Vec<u32> = (0..6).map(|j| 1 + (i * 7 + j * 3) % 120).collect();
        lines += &format!("{{\"input_ids\": {ids:?}, \"label\": {}}}\n", i % 3);
    }
    std::fs::write(&data, lines).unwrap();
    let out = dir.path().join("out");
    let st = Command::new(crate::common::lora_bin())
        .args(["train", "--model"])
        .arg(fx.dir("base"))
        .arg("--data")
        .arg(&data)
        .arg("--eval-data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--dropout",
            "0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(
        stdout.contains("eval: loss") && stdout.contains("accuracy"),
        "{stdout}"
    );
    let ad = Adapter::load(&out, &Device::Cpu).unwrap();
    assert_eq!(ad.config.task_type.as_deref(), Some("SEQ_CLS"));
    assert_eq!(
        ad.saved.keys().collect::<Vec<_>>(),
        ["classifier.bias", "classifier.weight"]
    );
    assert_eq!(ad.modules.len(), 4, "query and value of 2 layers");
    // The head moved away from the base's.
    let base_head = Checkpoint::open(&fx.dir("base"))
        .unwrap()
        .tensor("classifier.weight", &Device::Cpu)
        .unwrap();
    assert!(max_abs_diff(&ad.saved["classifier.weight"], &base_head) > 1e-4);

    let inspect = Command::new(crate::common::lora_bin())
        .arg("inspect")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("modules_to_save") && text.contains("classifier.weight"),
        "{text}"
    );

    let logits_out = dir.path().join("logits.safetensors");
    let st = Command::new(crate::common::lora_bin())
        .args(["logits", "--model"])
        .arg(fx.dir("base"))
        .arg("--adapter")
        .arg(&out)
        .arg("--ids")
        .arg(fixture("bert_cls/io.safetensors"))
        .arg("--out")
        .arg(&logits_out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let got = SafeFile::open(&logits_out)
        .unwrap()
        .tensor("logits", &Device::Cpu)
        .unwrap();
    let want = fx
        .open(Some(ad.into()))
        .logits(&fx.inputs(), false)
        .unwrap();
    assert_eq!(got.dims(), [3, 3]);
    assert!(max_abs_diff(&got, &want) < 1e-6);
}
