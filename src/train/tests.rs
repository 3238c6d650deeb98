//! Trainer tests on a toy causal LM (a bigram model: embedding → LoRA-adapted projection →
//! tanh → head), so they run in milliseconds. The Llama fixture tests are in tests/it/train.rs.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::data::{Dataset, Example};
use super::resume::{TrainerState, OPTIMIZER_FILE, STATE_FILE};
use super::*;
use crate::builder::MapSource;
use crate::config::{InitLoraWeights, LoraConfig};
use crate::layers::{LoraEmbedding, LoraLinear};
use crate::LoraRng;

const V: usize = 11;
const D: usize = 8;

struct Toy {
    emb: LoraEmbedding,
    proj: LoraLinear,
    head: LoraLinear,
}

impl CausalLm for Toy {
    fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.emb.forward(ids)?;
        let h = self.proj.forward_t(&x, train)?.tanh()?;
        self.head.forward_t(&h, train)
    }
}

fn base_weights() -> BTreeMap<String, Tensor> {
    let rng = LoraRng::new(42);
    let dev = Device::Cpu;
    let mut m = BTreeMap::new();
    m.insert(
        "embed.weight".into(),
        crate::layers::normal(&[V, D], 1.0, &rng, &dev).unwrap(),
    );
    m.insert(
        "proj.weight".into(),
        crate::layers::normal(&[D, D], 0.4, &rng, &dev).unwrap(),
    );
    m.insert(
        "proj.bias".into(),
        crate::layers::normal(&[D], 0.1, &rng, &dev).unwrap(),
    );
    m.insert(
        "head.weight".into(),
        crate::layers::normal(&[V, D], 0.4, &rng, &dev).unwrap(),
    );
    m
}

fn lora_config(dropout: f64) -> LoraConfig {
    LoraConfig {
        lora_dropout: dropout,
        init_lora_weights: InitLoraWeights::Random,
        ..LoraConfig::new(4, 8.0, &["proj", "head"])
    }
}

/// A toy model with fresh adapters (`adapter: None`) or the given ones; `full` trains all.
fn toy(adapter: Option<Adapter>, dropout: f64, full: bool) -> (Toy, LoraBuilder) {
    let b = LoraBuilder::new(MapSource::new(base_weights()), DType::F32, Device::Cpu);
    let b = if full {
        b.full_finetune().unwrap()
    } else {
        let b = b.with_seed(7).unwrap();
        match adapter {
            Some(a) => b.with_adapter(a).unwrap(),
            None => b.with_config(lora_config(dropout)).unwrap(),
        }
    };
    let m = Toy {
        emb: b.pp("embed").embedding(V, D).unwrap(),
        proj: b.pp("proj").linear(D, D, true).unwrap(),
        head: b.pp("head").linear(D, V, false).unwrap(),
    };
    b.finish().unwrap();
    (m, b)
}

/// Sequences following `x → (3x + 1) mod V`, of lengths 3..7, some with a masked prefix.
fn data(n: usize) -> Dataset {
    let ex = (0..n)
        .map(|i| {
            let len = 3 + i % 5;
            let mut ids = vec![(i % V) as u32];
            for _ in 1..len {
                let last = *ids.last().unwrap_or(&0);
                ids.push((3 * last + 1) % V as u32);
            }
            let labels = ids
                .iter()
                .enumerate()
                .map(|(j, &x)| if i % 3 == 0 && j < 2 { -100 } else { x as i64 })
                .collect();
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect();
    Dataset::from_examples("toy.jsonl", ex)
}

fn cfg(length: Length) -> TrainConfig {
    TrainConfig {
        lr: 5e-2,
        batch_size: 3,
        length,
        shuffle: true,
        ..TrainConfig::default()
    }
}

fn adapter_of(dir: &Path) -> Adapter {
    Adapter::load(dir, &Device::Cpu).unwrap()
}

fn same_adapters(a: &Adapter, b: &Adapter) -> bool {
    a.modules.len() == b.modules.len()
        && a.modules.iter().all(|(n, x)| {
            let y = &b.modules[n];
            crate::tensor_file::tensor_bytes(&x.a).unwrap()
                == crate::tensor_file::tensor_bytes(&y.a).unwrap()
                && crate::tensor_file::tensor_bytes(&x.b).unwrap()
                    == crate::tensor_file::tensor_bytes(&y.b).unwrap()
        })
}

fn max_diff(a: &Adapter, b: &Adapter) -> f32 {
    a.modules
        .iter()
        .flat_map(|(n, x)| {
            let y = &b.modules[n];
            [(&x.a, &y.a), (&x.b, &y.b)]
        })
        .map(|(x, y)| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

/// Same kinds and steps, values equal to 1e-12 relative (tokens/s aside: wall time).
fn assert_records_match(a: &[Record], b: &[Record]) {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let ok = match (x, y) {
            (Record::Step(x), Record::Step(y)) => {
                x.step == y.step
                    && x.tokens == y.tokens
                    && close(x.loss, y.loss)
                    && close(x.lr, y.lr)
                    && close(x.grad_norm, y.grad_norm)
                    && close(x.epoch, y.epoch)
            }
            (Record::Eval(x), Record::Eval(y)) => {
                x.step == y.step
                    && x.eval_tokens == y.eval_tokens
                    && close(x.eval_loss, y.eval_loss)
                    && close(x.eval_ppl, y.eval_ppl)
            }
            _ => false,
        };
        assert!(ok, "{x:?} vs {y:?}");
    }
}

fn save_mode() -> SaveMode {
    SaveMode::Adapter {
        base_model: Some("toy-base".into()),
    }
}

fn run(c: TrainConfig, ds: &Dataset, eval: Option<&Dataset>, out: &Path, dropout: f64) -> Summary {
    let (m, b) = toy(None, dropout, false);
    let mut t = Trainer::new(&m, &b, c, save_mode(), out).unwrap();
    t.train(ds, eval, &mut |_| {}).unwrap()
}

#[test]
fn training_lowers_the_loss_and_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let ds = data(12);
    let ev = data(5);
    let c = TrainConfig {
        eval_every: 4,
        save_every: 4,
        ..cfg(Length::Epochs(6))
    };
    let s = run(c, &ds, Some(&ev), &out, 0.0);
    // 12 examples / batch 3 = 4 steps per epoch.
    assert_eq!(s.steps, 24);
    let losses = s.losses();
    assert_eq!(losses.len(), 24);
    assert!(
        losses[23] < 0.5 * losses[0],
        "loss {} -> {}",
        losses[0],
        losses[23]
    );
    // Linear schedule: step s (0-based) uses 5e-2·(24 − s)/24.
    let lrs: Vec<f64> = s
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Step(x) => Some(x.lr),
            _ => None,
        })
        .collect();
    for (i, lr) in lrs.iter().enumerate() {
        assert!((lr - 5e-2 * (24 - i) as f64 / 24.0).abs() < 1e-15);
    }
    let evals: Vec<&EvalRecord> = s
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.step).collect::<Vec<_>>(),
        [4, 8, 12, 16, 20, 24]
    );
    let ev_tokens: usize = ev.examples.iter().map(|e| e.predicted()).sum();
    assert!(evals
        .iter()
        .all(|e| e.eval_tokens == ev_tokens && (e.eval_ppl - e.eval_loss.exp()).abs() < 1e-9));

    // The final adapter is PEFT-shaped with CAUSAL_LM and the base named.
    let a = adapter_of(&out);
    assert_eq!(a.config.task_type.as_deref(), Some("CAUSAL_LM"));
    assert_eq!(
        a.config.base_model_name_or_path.as_deref(),
        Some("toy-base")
    );
    assert_eq!(a.modules.len(), 2);
    // metrics.jsonl holds every record.
    let recs = metrics::read_metrics(&out.join(metrics::METRICS_FILE)).unwrap();
    assert_records_match(&recs, &s.records);
    // Checkpoints every 4 steps, each a loadable adapter + optimizer + state.
    for step in [4, 8, 12, 16, 20, 24] {
        let ck = out.join(format!("checkpoint-{step}"));
        assert!(ck.join(OPTIMIZER_FILE).is_file());
        let st = TrainerState::load(&ck).unwrap();
        assert_eq!(st.step, step);
        assert_eq!(st.metrics.last().map(Record::step), Some(step));
        adapter_of(&ck);
    }
    assert!(same_adapters(&a, &adapter_of(&out.join("checkpoint-24"))));
    // The evaluation reproduces from the saved adapter (unmerged, no dropout).
    let (m, b) = toy(Some(a), 0.0, false);
    let t = Trainer::new(
        &m,
        &b,
        cfg(Length::Steps(1)),
        save_mode(),
        &dir.path().join("e"),
    )
    .unwrap();
    let again = t.evaluate(&ev).unwrap();
    assert!((again.eval_loss - evals[5].eval_loss).abs() < 1e-6);
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let dir = tempfile::tempdir().unwrap();
    let ds = data(8);
    let mut finals = vec![];
    let mut losses = vec![];
    for (i, (bs, acc)) in [(4, 1), (2, 2), (1, 4)].into_iter().enumerate() {
        let c = TrainConfig {
            batch_size: bs,
            grad_accum: acc,
            shuffle: false,
            ..cfg(Length::Epochs(3))
        };
        let out = dir.path().join(format!("r{i}"));
        let s = run(c, &ds, None, &out, 0.0);
        assert_eq!(s.steps, 6);
        losses.push(s.losses());
        finals.push(adapter_of(&out));
    }
    for k in 1..3 {
        for (a, b) in losses[0].iter().zip(&losses[k]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let d = max_diff(&finals[0], &finals[k]);
        assert!(d < 1e-5, "final adapters differ by {d}");
    }
}

#[test]
fn resume_from_a_checkpoint_reproduces_the_run_exactly() {
    // Shuffling, dropout, warmup + cosine, accumulation, an epoch boundary mid-run and eval.
    let dir = tempfile::tempdir().unwrap();
    let ds = data(7);
    let ev = data(4);
    let c = TrainConfig {
        batch_size: 2,
        grad_accum: 2,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        save_every: 3,
        eval_every: 2,
        max_grad_norm: 0.5,
        weight_decay: 0.01,
        ..cfg(Length::Steps(8))
    };
    let full = dir.path().join("full");
    let a = run(c.clone(), &ds, Some(&ev), &full, 0.2);
    for from in [3, 6] {
        let ck = dir.path().join(format!("ck{from}"));
        copy_dir(&full.join(format!("checkpoint-{from}")), &ck);
        let (m, b) = toy(Some(adapter_of(&ck)), 0.2, false);
        let out = dir.path().join(format!("resumed{from}"));
        let mut t = Trainer::resume(&m, &b, c.clone(), save_mode(), &out, &ck).unwrap();
        assert_eq!(t.step(), from);
        let r = t.train(&ds, Some(&ev), &mut |_| {}).unwrap();
        // The records before the checkpoint went through JSON (serde_json parses floats to
        // within an ulp), those after were computed again: equal to 1e-12 relative.
        assert_records_match(&r.records, &a.records);
        assert!(
            same_adapters(&adapter_of(&out), &adapter_of(&full)),
            "final adapter bit-identical (resumed at {from})"
        );
    }
    // A shorter run resumed to a longer length (constant schedule, so the lr does not depend
    // on the planned length) equals the longer run.
    let c = TrainConfig {
        schedule: Schedule::Constant,
        ..c
    };
    let long = dir.path().join("long");
    let l = run(c.clone(), &ds, None, &long, 0.2);
    let short = dir.path().join("short");
    run(
        TrainConfig {
            length: Length::Steps(3),
            ..c.clone()
        },
        &ds,
        None,
        &short,
        0.2,
    );
    let ck = short.join("checkpoint-3");
    let (m, b) = toy(Some(adapter_of(&ck)), 0.2, false);
    let mut t = Trainer::resume(&m, &b, c, save_mode(), &short, &ck).unwrap();
    let r = t.train(&ds, None, &mut |_| {}).unwrap();
    assert_records_match(&r.records, &l.records);
    assert!(same_adapters(&adapter_of(&short), &adapter_of(&long)));
    // The metrics file was rewritten from the checkpoint, then appended: no duplicates.
    let recs = metrics::read_metrics(&short.join(metrics::METRICS_FILE)).unwrap();
    assert_eq!(recs.len(), 8);
}

#[test]
fn resume_refuses_other_data_and_a_model_not_built_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ds = data(6);
    let c = TrainConfig {
        save_every: 1,
        ..cfg(Length::Steps(2))
    };
    let out = dir.path().join("a");
    run(c.clone(), &ds, None, &out, 0.0);
    let ck = out.join("checkpoint-1");
    let (m, b) = toy(Some(adapter_of(&ck)), 0.0, false);
    let mut t = Trainer::resume(&m, &b, c.clone(), save_mode(), &out, &ck).unwrap();
    let e = t
        .train(&data(5), None, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("checkpoint-1") && e.contains("other data"),
        "{e}"
    );
    let (m, b) = toy(None, 0.0, false);
    let e = Trainer::resume(&m, &b, c, save_mode(), &out, &ck)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not built from this checkpoint"), "{e}");
}

#[test]
fn diverging_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let ds = data(6);
    let c = TrainConfig {
        lr: 1e30,
        max_grad_norm: 0.0,
        save_every: 1,
        shuffle: false,
        ..cfg(Length::Steps(10))
    };
    let (m, b) = toy(None, 0.0, false);
    let mut t = Trainer::new(&m, &b, c, save_mode(), &out).unwrap();
    let e = t.train(&ds, None, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("diverged at step"), "{e}");
    let step: usize = e
        .split("diverged at step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(step >= 2, "{e}");
    let last = out.join(format!("checkpoint-{}", step - 1));
    assert!(e.contains(&last.display().to_string()), "{e}");
    // The last good checkpoint loads (finite values) and no later one or final adapter exists.
    adapter_of(&last);
    assert!(!out.join(format!("checkpoint-{step}")).exists());
    assert!(!out.join(crate::adapter::WEIGHTS_FILE).exists());
    let recs = metrics::read_metrics(&out.join(metrics::METRICS_FILE)).unwrap();
    assert_eq!(recs.len(), step - 1);
    assert!(recs.iter().all(|r| match r {
        Record::Step(s) => s.loss.is_finite(),
        _ => true,
    }));
}

#[test]
fn full_finetuning_saves_every_weight() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("config.json"), "{\"x\": 1}").unwrap();
    let out = dir.path().join("run");
    let (m, b) = toy(None, 0.0, true);
    let names: Vec<String> = b.named_trainable_vars().into_iter().map(|x| x.0).collect();
    assert_eq!(
        names,
        ["embed.weight", "proj.weight", "proj.bias", "head.weight"]
    );
    let c = TrainConfig {
        save_every: 2,
        weight_decay: 0.1,
        ..cfg(Length::Steps(2))
    };
    let save = SaveMode::Full {
        model_dir: model_dir.clone(),
    };
    let mut t = Trainer::new(&m, &b, c, save, &out).unwrap();
    let s = t.train(&data(6), None, &mut |_| {}).unwrap();
    assert!(s.losses()[1] < s.losses()[0]);
    let f = crate::tensor_file::SafeFile::open(&out.join(MODEL_FILE)).unwrap();
    assert_eq!(
        f.names(),
        ["embed.weight", "head.weight", "proj.bias", "proj.weight"]
    );
    for (n, v) in b.named_trainable_vars() {
        assert_eq!(
            f.bytes(&n).unwrap(),
            crate::tensor_file::tensor_bytes(v.as_tensor())
                .unwrap()
                .as_slice()
        );
        let base = &base_weights()[&n];
        assert!(
            crate::tensor_file::tensor_bytes(base).unwrap()
                != crate::tensor_file::tensor_bytes(v.as_tensor()).unwrap(),
            "{n} trained"
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        "{\"x\": 1}"
    );
    assert!(out.join("checkpoint-2").join(MODEL_FILE).is_file());
    assert!(!out.join(crate::adapter::WEIGHTS_FILE).exists());
}

#[test]
fn weight_decay_exemptions_follow_transformers() {
    for n in [
        "model.layers.0.self_attn.q_proj.bias",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "encoder.q_norm.weight",
    ] {
        assert!(no_weight_decay(n), "{n}");
    }
    for n in [
        "model.layers.0.self_attn.q_proj.lora_A",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.mlp.normal_proj.weight",
    ] {
        assert!(!no_weight_decay(n), "{n}");
    }
}

#[test]
fn refuses_a_non_empty_output_and_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    let (m, b) = toy(None, 0.0, false);
    let e = Trainer::new(&m, &b, cfg(Length::Steps(1)), save_mode(), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    let bad = TrainConfig {
        batch_size: 0,
        ..cfg(Length::Steps(1))
    };
    assert!(bad.validate().is_err());
    assert!(cfg(Length::Epochs(0)).validate().is_err());
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn checkpoint_state_records_position_and_rngs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let c = TrainConfig {
        save_every: 3,
        ..cfg(Length::Steps(3))
    };
    run(c.clone(), &data(5), None, &out, 0.1);
    let ck = out.join("checkpoint-3");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join(STATE_FILE)).unwrap()).unwrap();
    // 5 examples / batch 3 = 2 batches per epoch: step 3 is the first batch of epoch 1.
    assert_eq!(st["step"], 3);
    assert_eq!(st["epoch"], 1);
    assert_eq!(st["micro_batch"], 1);
    assert_eq!(st["config"]["lr"], c.lr);
    assert_ne!(
        st["lora_rng"]["word_pos"], "0",
        "dropout drew from the LoRA source"
    );
    assert_eq!(st["epoch_rng"]["stream"], "1");
}
