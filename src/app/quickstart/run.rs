//! The quickstart's workflow: base accuracy → LoRA training (validated unmerged) → LoRA
//! accuracy → merge (merged ≡ unmerged, merged as fast as the base) → full fine-tuning of the
//! same base on the same data for comparison → `report.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::app::alloc::CountingAlloc;
use crate::app::plot::plot_losses;
use crate::app::quickstart::tasks::{self, Example};
use crate::builder::LoraBuilder;
use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::merge::{merge_checkpoint, Direction, MergeOptions};
use crate::model_weights::Checkpoint;
use crate::models::{CausalLm, Llama, LlamaConfig};
use crate::tensor_file;
use crate::train::data::Dataset;
use crate::train::metrics::Record;
use crate::train::{Event, Length, SaveMode, Schedule, TrainConfig, Trainer};

/// The shipped base model (see `assets/quickstart/base/README.md`).
pub const BASE_FILES: [(&str, &[u8]); 3] = [
    (
        "config.json",
        include_bytes!("../../../assets/quickstart/base/config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../assets/quickstart/base/tokenizer.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../assets/quickstart/base/model.safetensors"),
    ),
];

/// Settings of a quickstart run.
#[derive(Debug, Clone)]
pub struct QuickstartOptions {
    /// Output folder.
    pub out: PathBuf,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Training steps, for LoRA and for full fine-tuning alike.
    pub steps: usize,
    /// LoRA learning rate.
    pub lr: f64,
    /// Full fine-tuning learning rate.
    pub full_lr: f64,
    /// Batch size.
    pub batch_size: usize,
    /// Seed for init, dropout and data order.
    pub seed: u64,
    /// Skip the full fine-tuning comparison.
    pub skip_full: bool,
}

impl Default for QuickstartOptions {
    fn default() -> Self {
        QuickstartOptions {
            out: PathBuf::from("lora-quickstart"),
            r: 8,
            alpha: 16.0,
            steps: 100,
            lr: 1e-2,
            full_lr: 1e-3,
            batch_size: 32,
            seed: 0,
            skip_full: false,
        }
    }
}

/// What the quickstart measured (also written as `report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct QuickstartReport {
    /// Held-out exact-match accuracy of the base on task B.
    pub base_accuracy: f64,
    /// Held-out exact-match accuracy with the LoRA adapter (unmerged).
    pub lora_accuracy: f64,
    /// The same after merging (must equal `lora_accuracy`).
    pub merged_accuracy: f64,
    /// Held-out accuracy after full fine-tuning on the same data, if run.
    pub full_ft_accuracy: Option<f64>,
    /// The base's accuracy on task A (what it was trained for), on the held-out words.
    pub base_task_a_accuracy: f64,
    /// LoRA's trainable parameters.
    pub trainable_params: usize,
    /// Full fine-tuning's trainable parameters (= every weight).
    pub full_ft_trainable_params: usize,
    /// Parameters of the base model.
    pub total_params: usize,
    /// max |merged-weight logits − explicit low-rank logits| on a held-out batch: the merged
    /// model (`x·(W0 + s·B·A)ᵀ`) against the unmerged one computing `x·W0ᵀ + s·(x·Aᵀ)·Bᵀ`.
    pub merge_max_abs_diff: f32,
    /// Median forward time of the base on a held-out batch, ms.
    pub base_forward_ms: f64,
    /// Median forward time of the merged model on the same batch, ms.
    pub merged_forward_ms: f64,
    /// Peak heap bytes during LoRA training (counting allocator), if measured.
    pub lora_peak_bytes: Option<usize>,
    /// Peak heap bytes during full fine-tuning, if measured.
    pub full_ft_peak_bytes: Option<usize>,
    /// LoRA training wall time, s.
    pub lora_train_seconds: f64,
    /// Full fine-tuning wall time, s.
    pub full_ft_train_seconds: Option<f64>,
    /// Held-out eval loss of the LoRA model at the end of training (unmerged).
    pub lora_eval_loss: Option<f64>,
    /// Training examples / held-out examples of task B.
    pub train_examples: usize,
    /// Held-out examples.
    pub heldout_examples: usize,
    /// Wall time of the whole quickstart, s.
    pub seconds: f64,
    /// Where everything was written.
    pub out: PathBuf,
}

/// Progress for the caller to display.
pub enum Progress<'a> {
    /// A phase starts.
    Phase(&'a str),
    /// A training event of the current phase.
    Train(&'a Event<'a>),
}

/// Writes the embedded base model into `dir`.
pub fn write_base(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in BASE_FILES {
        let mut f = tensor_file::AtomicFile::create(&dir.join(name))?;
        f.write_all(bytes)?;
        f.commit()?;
    }
    Ok(())
}

/// Runs the whole quickstart (see the module doc).
pub fn run(
    opts: &QuickstartOptions,
    meter: Option<&CountingAlloc>,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuickstartReport> {
    let t0 = Instant::now();
    let dev = Device::Cpu;
    let out = &opts.out;
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::BadOutput {
            path: out.clone(),
            reason: "exists and is not empty".into(),
        });
    }
    let base_dir = out.join("base");
    write_base(&base_dir)?;
    let cfg = LlamaConfig::from_dir(&base_dir)?;
    let tok = crate::train::data::load_tokenizer(&base_dir.join("tokenizer.json"), cfg.vocab_size)?;

    // Task B data: training words and held-out words, never mixed.
    let (train_words, held_words) = tasks::split_words(0, tasks::HELD_OUT);
    let train_ex = tasks::task_b(&train_words);
    let held_ex = tasks::task_b(&held_words);
    let data_dir = out.join("data");
    tensor_file::write_text_atomic(&data_dir.join("train.jsonl"), &tasks::to_jsonl(&train_ex))
        .or_else(|_| {
            std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
            tensor_file::write_text_atomic(
                &data_dir.join("train.jsonl"),
                &tasks::to_jsonl(&train_ex),
            )
        })?;
    tensor_file::write_text_atomic(&data_dir.join("heldout.jsonl"), &tasks::to_jsonl(&held_ex))?;
    let mut lazy = crate::train::data::LazyTokenizer::new(
        Some(base_dir.join("tokenizer.json")),
        cfg.vocab_size,
    );
    let train_ds = Dataset::load_jsonl(&data_dir.join("train.jsonl"), &mut lazy, None)?;
    let held_ds = Dataset::load_jsonl(&data_dir.join("heldout.jsonl"), &mut lazy, None)?;

    progress(Progress::Phase(
        "measuring the base model on held-out task B",
    ));
    let base = Llama::open(&base_dir, None, DType::F32, &dev)?;
    let total_params = count_params(&base_dir)?;
    let base_accuracy = accuracy(&base, &tok, &held_ex)?;
    let task_a_held: Vec<Example> = held_words
        .iter()
        .map(|w| tasks::Game::Reverse.example(w))
        .collect();
    let base_task_a_accuracy = accuracy(&base, &tok, &task_a_held)?;

    // LoRA on q_proj and v_proj.
    progress(Progress::Phase(
        "training the LoRA adapter (validated unmerged)",
    ));
    let lcfg = LoraConfig {
        r: opts.r,
        lora_alpha: opts.alpha,
        lora_dropout: 0.0,
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(base_dir.display().to_string()),
        ..LoraConfig::default()
    };
    let vb = LoraBuilder::new(Checkpoint::open(&base_dir)?, DType::F32, dev.clone())
        .with_seed(opts.seed)?
        .with_config(lcfg)?;
    let mut model = Llama::load(&cfg, &vb)?;
    let trainable_params: usize = vb.trainable_vars().iter().map(|v| v.elem_count()).sum();
    let adapter_dir = out.join("adapter");
    let tc = train_config(opts, opts.lr);
    let (summary, lora_peak_bytes, lora_train_seconds) = measure(meter, || {
        let mut trainer = Trainer::new(
            &model,
            &vb,
            tc.clone(),
            SaveMode::Adapter {
                base_model: Some(base_dir.display().to_string()),
            },
            &adapter_dir,
        )?;
        trainer.train(&train_ds, Some(&held_ds), &mut |ev| {
            progress(Progress::Train(&ev))
        })
    })?;
    let lora_eval_loss = summary.records.iter().rev().find_map(|r| match r {
        Record::Eval(e) => Some(e.eval_loss),
        _ => None,
    });
    let lora_accuracy = accuracy(&model, &tok, &held_ex)?;

    progress(Progress::Phase("merging the adapter for deployment"));
    let batch = prompt_batch(&tok, &held_ex, &dev)?;
    // The unmerged model in the explicit low-rank form x·W0ᵀ + s·(x·Aᵀ)·Bᵀ: at this batch size
    // the fast path would build W0 + s·B·A itself, the same computation as the merged model.
    let unmerged = crate::layers::with_low_rank_reference(|| model.forward_t(&batch, false))?;
    model.merge_adapters()?;
    let merged = model.forward_t(&batch, false)?;
    let merge_max_abs_diff = (merged - unmerged)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let merged_accuracy = accuracy(&model, &tok, &held_ex)?;
    let (base_forward_ms, merged_forward_ms) = interleaved_medians(&base, &model, &batch)?;
    let adapter = crate::Adapter::load(&adapter_dir, &dev)?;
    let merge_opts = MergeOptions {
        direction: Direction::Merge,
        verify: false,
        force: false,
    };
    merge_checkpoint(&base_dir, &adapter, &out.join("merged"), merge_opts)?;
    plot_losses(&summary.records, &out.join("loss_curve.png"))?;

    let (mut full_ft_accuracy, mut full_ft_peak_bytes, mut full_ft_train_seconds) =
        (None, None, None);
    let mut full_ft_trainable_params = total_params;
    if !opts.skip_full {
        progress(Progress::Phase(
            "full fine-tuning of the same base, for comparison",
        ));
        let vb = LoraBuilder::new(Checkpoint::open(&base_dir)?, DType::F32, dev.clone())
            .with_seed(opts.seed)?
            .full_finetune()?;
        let model = Llama::load(&cfg, &vb)?;
        full_ft_trainable_params = vb.trainable_vars().iter().map(|v| v.elem_count()).sum();
        let tc = train_config(opts, opts.full_lr);
        let (_, peak, secs) = measure(meter, || {
            let mut trainer = Trainer::new(
                &model,
                &vb,
                tc.clone(),
                SaveMode::Full {
                    model_dir: base_dir.clone(),
                },
                &out.join("full"),
            )?;
            trainer.train(&train_ds, Some(&held_ds), &mut |ev| {
                progress(Progress::Train(&ev))
            })
        })?;
        full_ft_accuracy = Some(accuracy(&model, &tok, &held_ex)?);
        full_ft_peak_bytes = peak;
        full_ft_train_seconds = Some(secs);
    }

    let report = QuickstartReport {
        base_accuracy,
        lora_accuracy,
        merged_accuracy,
        full_ft_accuracy,
        base_task_a_accuracy,
        trainable_params,
        full_ft_trainable_params,
        total_params,
        merge_max_abs_diff,
        base_forward_ms,
        merged_forward_ms,
        lora_peak_bytes,
        full_ft_peak_bytes,
        lora_train_seconds,
        full_ft_train_seconds,
        lora_eval_loss,
        train_examples: train_ex.len(),
        heldout_examples: held_ex.len(),
        seconds: t0.elapsed().as_secs_f64(),
        out: out.clone(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::State(e.to_string()))?;
    tensor_file::write_text_atomic(&out.join("report.json"), &json)?;
    Ok(report)
}

fn train_config(opts: &QuickstartOptions, lr: f64) -> TrainConfig {
    TrainConfig {
        lr,
        schedule: Schedule::Cosine,
        warmup_steps: opts.steps / 10,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        batch_size: opts.batch_size,
        length: Length::Steps(opts.steps),
        eval_every: (opts.steps / 3).max(1),
        save_every: opts.steps,
        seed: opts.seed,
        ..TrainConfig::default()
    }
}

/// Runs `f`, returning its result with the peak heap bytes above the starting level (when the
/// counting allocator is installed) and the wall time in seconds.
fn measure<T>(
    meter: Option<&CountingAlloc>,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<usize>, f64)> {
    let meter = meter.filter(|m| m.is_counting());
    let start = meter.map(|m| {
        m.reset_peak();
        m.current()
    });
    let t = Instant::now();
    let v = f()?;
    let secs = t.elapsed().as_secs_f64();
    let peak = meter.zip(start).map(|(m, s)| m.peak().saturating_sub(s));
    Ok((v, peak, secs))
}

/// Median forward times (ms) of `a` and `b` on `batch`, timed alternately so that machine
/// load falls on both alike.
fn interleaved_medians(a: &Llama, b: &Llama, batch: &Tensor) -> Result<(f64, f64)> {
    let time = |m: &Llama| -> Result<f64> {
        let t = Instant::now();
        drop(m.forward_t(batch, false)?);
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut ta, mut tb) = (vec![], vec![]);
    for i in 0..23 {
        let (x, y) = (time(a)?, time(b)?);
        if i >= 2 {
            ta.push(x);
            tb.push(y);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(ta), median(tb)))
}

fn count_params(dir: &Path) -> Result<usize> {
    let c = Checkpoint::open(dir)?;
    c.names()
        .iter()
        .map(|n| Ok(c.info(n)?.1.iter().product::<usize>()))
        .sum()
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, true)
        .map_err(|e| Error::State(format!("tokenizing `{text}`: {e}")))?
        .get_ids()
        .to_vec())
}

/// The held-out prompts of the most common length, as one batch `[n, t]` (for logits and
/// timing).
fn prompt_batch(tok: &tokenizers::Tokenizer, examples: &[Example], dev: &Device) -> Result<Tensor> {
    let ids: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| encode(tok, &e.prompt))
        .collect::<Result<_>>()?;
    let mut counts = std::collections::BTreeMap::new();
    for i in &ids {
        *counts.entry(i.len()).or_insert(0usize) += 1;
    }
    let len = counts
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .map(|(l, _)| l)
        .unwrap_or(1);
    let rows: Vec<u32> = ids
        .into_iter()
        .filter(|i| i.len() == len)
        .flatten()
        .collect();
    let n = rows.len() / len;
    Ok(Tensor::from_vec(rows, (n, len), dev)?)
}

/// Exact-match accuracy: greedy decoding of each prompt until the newline must give exactly
/// the expected completion. Prompts of equal length decode together as one batch.
pub fn accuracy(model: &Llama, tok: &tokenizers::Tokenizer, examples: &[Example]) -> Result<f64> {
    let newline = *encode(tok, "\n")?
        .last()
        .ok_or_else(|| Error::State("the tokenizer drops newlines".into()))?;
    let mut groups: std::collections::BTreeMap<usize, Vec<(Vec<u32>, &Example)>> =
        Default::default();
    for e in examples {
        let ids = encode(tok, &e.prompt)?;
        groups.entry(ids.len()).or_default().push((ids, e));
    }
    let dev = Device::Cpu;
    let mut correct = 0usize;
    for (len, group) in groups {
        let n = group.len();
        let mut seqs: Vec<Vec<u32>> = group.iter().map(|(ids, _)| ids.clone()).collect();
        let mut done = vec![false; n];
        for step in 0..12 {
            let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (n, len + step), &dev)?;
            let logits = model.forward_t(&ids, false)?; // [n, t, V]
            let next = logits
                .narrow(1, len + step - 1, 1)?
                .squeeze(1)?
                .argmax(candle_core::D::Minus1)?
                .to_vec1::<u32>()?;
            for (i, t) in next.into_iter().enumerate() {
                let t = if done[i] { newline } else { t };
                done[i] |= t == newline;
                seqs[i].push(t);
            }
            if done.iter().all(|d| *d) {
                break;
            }
        }
        for (i, (_, e)) in group.iter().enumerate() {
            let gen = &seqs[i][len..];
            let end = gen
                .iter()
                .position(|&t| t == newline)
                .map_or(gen.len(), |p| p + 1);
            let text = tok
                .decode(&gen[..end], false)
                .map_err(|e| Error::State(e.to_string()))?;
            correct += usize::from(text == e.completion);
        }
    }
    Ok(correct as f64 / examples.len().max(1) as f64)
}
