//! `lora train`: fine-tune a Llama-family model with LoRA (or fully) on a JSONL file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora::app::plot;
use lora::merge::{merge_checkpoint, Direction, MergeOptions};
use lora::models::{Llama, LlamaConfig};
use lora::train::data::{Dataset, LazyTokenizer};
use lora::train::metrics::Record;
use lora::train::resume::{find_checkpoint, TrainMode, TrainerState};
use lora::train::{Event, Length, SaveMode, Schedule, TrainConfig, Trainer};
use lora::{Adapter, Checkpoint, InitLoraWeights, LoraBuilder, LoraConfig, TargetModules};

/// Arguments of `lora train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model folder (transformers layout: config.json, safetensors weights and, for
    /// text data, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training data, JSONL: `{"text"}`, `{"prompt", "completion"}` or `{"input_ids"}` lines.
    #[arg(long)]
    data: PathBuf,
    /// Held-out data (same format), evaluated every --eval-every steps and at the end.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// The output folder: final adapter (or model), metrics.jsonl, loss.png, checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// Start from this adapter (its config fixes rank, alpha and targets).
    #[arg(long, conflicts_with_all = ["full", "target_modules", "target_regex", "r", "alpha", "rslora", "use_dora"])]
    adapter_init: Option<PathBuf>,
    /// Modules to adapt, comma-separated (`q_proj,v_proj`), or `all-linear`.
    #[arg(long, value_delimiter = ',', conflicts_with = "target_regex")]
    target_modules: Option<Vec<String>>,
    /// Modules to adapt: a regex matching the whole module name.
    #[arg(long)]
    target_regex: Option<String>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    r: Option<usize>,
    /// LoRA alpha [default: 16].
    #[arg(long)]
    alpha: Option<f64>,
    /// Dropout on the LoRA branch input [default: 0.05, or the --adapter-init adapter's].
    #[arg(long)]
    dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// DoRA: train a magnitude vector per output unit too (PEFT's `use_dora`).
    #[arg(long)]
    use_dora: bool,
    /// How A and B start: true, false, gaussian, pissa, pissa_niter_N or olora (PEFT's
    /// `init_lora_weights`). PiSSA and OLoRA rewrite the base: the run also writes
    /// <out>/residual_model (the base it trains on) and <out>/initial_adapter (for
    /// `lora convert-init`).
    #[arg(long, default_value = "true")]
    init_lora_weights: String,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Learning-rate schedule: constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    schedule: Schedule,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Passes over the data [default: 1].
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<usize>,
    /// Optimizer steps (instead of epochs).
    #[arg(long)]
    steps: Option<usize>,
    /// Evaluate every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every this many steps, and at the end (0: never).
    #[arg(long, default_value_t = 500)]
    save_every: usize,
    /// Seed of the LoRA init, dropout and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from a checkpoint folder (or the output folder of a run: its latest checkpoint).
    #[arg(long, conflicts_with = "adapter_init")]
    resume: Option<PathBuf>,
    /// Also write the base model with the final adapter merged in, to this folder.
    #[arg(long, conflicts_with = "full")]
    merge_out: Option<PathBuf>,
    /// Full fine-tuning: train every weight and save model.safetensors instead of an adapter.
    #[arg(long, conflicts_with_all = ["target_modules", "target_regex", "r", "alpha", "rslora", "dropout"])]
    full: bool,
    /// Keep the file order (no shuffling).
    #[arg(long)]
    no_shuffle: bool,
    /// Activation checkpointing per decoder layer: keep only each layer's input for the
    /// backward and run its forward again there (less memory, about one more forward per step;
    /// same results). Applies where the training engine runs (CPU, f32).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Truncate examples to this many tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Sequence classifiers: train only the head (`classifier` / `score`, PEFT's
    /// modules_to_save), no LoRA: a linear probe.
    #[arg(long, conflicts_with_all = ["full", "adapter_init", "target_modules", "target_regex"])]
    linear_probe: bool,
}

/// Runs `lora train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    if super::logits::is_classifier(&a.model)? {
        return run_classifier(&a);
    }
    if a.linear_probe {
        bail!("--linear-probe needs a *ForSequenceClassification model");
    }
    let dev = Device::Cpu;
    let cfg = LlamaConfig::from_dir(&a.model)?;
    let tok_path = a.model.join("tokenizer.json");
    let mut tok = LazyTokenizer::new(tok_path.is_file().then_some(tok_path), cfg.vocab_size);
    let train = Dataset::load_jsonl(&a.data, &mut tok, a.max_len)?;
    let eval = a
        .eval_data
        .as_deref()
        .map(|p| Dataset::load_jsonl(p, &mut tok, a.max_len))
        .transpose()?;
    for d in std::iter::once(&train).chain(eval.as_ref()) {
        if d.skipped > 0 {
            eprintln!(
                "note: {}: skipped {} examples with no token to predict",
                d.path.display(),
                d.skipped
            );
        }
    }
    let tc = TrainConfig {
        lr: a.lr,
        schedule: a.schedule,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        length: match (a.epochs, a.steps) {
            (_, Some(s)) => Length::Steps(s),
            (e, None) => Length::Epochs(e.unwrap_or(1)),
        },
        eval_every: a.eval_every,
        save_every: a.save_every,
        seed: a.seed,
        shuffle: !a.no_shuffle,
        gradient_checkpointing: a.gradient_checkpointing,
        ..TrainConfig::default()
    };
    tc.validate()?;

    let checkpoint = a.resume.as_deref().map(find_checkpoint).transpose()?;
    if let Some(ck) = &checkpoint {
        let st = TrainerState::load(ck)?;
        let want = if a.full {
            TrainMode::Full
        } else {
            TrainMode::Lora
        };
        if st.mode != want {
            bail!(
                "{}: the checkpoint is from {:?} training; pass {} to resume it",
                ck.display(),
                st.mode,
                if st.mode == TrainMode::Full {
                    "--full"
                } else {
                    "no --full"
                }
            );
        }
    }

    let base = if a.full {
        // A resumed full run reads every weight from the checkpoint.
        Checkpoint::open(checkpoint.as_deref().unwrap_or(&a.model))?
    } else {
        Checkpoint::open(&a.model)?
    };
    let vb = LoraBuilder::new(base, DType::F32, dev.clone()).with_seed(a.seed)?;
    let base_name = a.model.display().to_string();
    let vb = if a.full {
        vb.full_finetune()?
    } else if let Some(ck) = &checkpoint {
        vb.with_adapter(Adapter::load(ck, &dev)?)?
    } else if let Some(dir) = &a.adapter_init {
        let mut ad = Adapter::load(dir, &dev)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        if let Some(d) = a.dropout {
            ad.config.lora_dropout = d;
        }
        ad.config.base_model_name_or_path = Some(base_name.clone());
        vb.with_adapter(ad)?
    } else {
        vb.with_config(lora_config(&a, &base_name))?
    };
    let model = Llama::load(&cfg, &vb)?;
    let rewrites_base = vb
        .config()
        .is_some_and(|c| c.init_lora_weights.mutates_base());
    let save = if a.full {
        SaveMode::Full {
            model_dir: a.model.clone(),
        }
    } else {
        SaveMode::Adapter {
            base_model: Some(base_name),
        }
    };
    let trainable: usize = vb.trainable_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!(
        "training {trainable} parameters ({}) on {} examples",
        if a.full {
            "every weight".to_string()
        } else {
            format!("{} adapted modules", vb.adapted_modules().len())
        },
        train.len()
    );
    let mut trainer = match &checkpoint {
        Some(ck) => Trainer::resume(&model, &vb, tc, save, &a.out, ck)?,
        None => Trainer::new(&model, &vb, tc, save, &a.out)?,
    };
    if rewrites_base && checkpoint.is_none() && a.adapter_init.is_none() {
        lora::convert::save_initial_and_residual(&vb.adapter()?, &a.model, &a.out)
            .context("writing the residual base and the initial adapter")?;
        eprintln!(
            "{}: the adapter trains on the residual base {}; `lora convert-init` makes a plain LoRA",
            vb.config().map_or(String::new(), |c| format!("{:?}", c.init_lora_weights)),
            a.out.join(lora::convert::RESIDUAL_DIR).display()
        );
    }

    // Memory ledger: sizes of what training holds, and the heap peak above the loaded model
    // measured by the counting allocator over the whole run.
    let trainable_bytes: usize = vb
        .trainable_vars()
        .iter()
        .map(|v| v.elem_count() * v.dtype().size_in_bytes())
        .sum();
    let frozen_bytes = if a.full { 0 } else { vb.loaded_bytes() };
    crate::ALLOC.reset_peak();
    let heap_before = crate::ALLOC.current();

    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let say = |bar: &ProgressBar, line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let summary = trainer.train(&train, eval.as_ref(), &mut |ev| match ev {
        Event::Start { step, total } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64);
            bar.reset_eta();
            if step > 0 {
                say(&bar, format!("resuming at step {step} of {total}"));
            }
        }
        Event::Step(s) => {
            bar.set_position(s.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                s.loss, s.lr, s.tokens_per_s
            ));
        }
        Event::Eval(e) => say(
            &bar,
            format!(
                "step {}: eval loss {:.4}, perplexity {:.3}",
                e.step, e.eval_loss, e.eval_ppl
            ),
        ),
        Event::Checkpoint(p) => {
            if bar.is_hidden() {
                eprintln!("saved {}", p.display());
            }
        }
    });
    bar.finish_and_clear();
    let summary = summary?;
    plot::plot_losses(&summary.records, &a.out.join(plot::PLOT_FILE))?;

    let last = summary.records.iter().rev().find_map(|r| match r {
        Record::Step(s) => Some(s.loss),
        _ => None,
    });
    println!(
        "trained {} steps; final train loss {}; wrote {}",
        summary.steps,
        last.map_or("-".into(), |l| format!("{l:.4}")),
        a.out.display()
    );
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "memory: frozen weights {:.2} MiB, trainable {:.2} MiB, gradients {:.2} MiB, AdamW state \
         {:.2} MiB; heap peak while training {:.1} MiB above the loaded model (activations{}, \
         temporaries, checkpoints); peak RSS {}",
        mib(frozen_bytes),
        mib(trainable_bytes),
        mib(trainable_bytes),
        mib(2 * trainable_bytes),
        mib(crate::ALLOC.peak().saturating_sub(heap_before)),
        if a.gradient_checkpointing {
            " with activation checkpointing"
        } else {
            ""
        },
        lora::app::bench::peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0} MiB")),
    );
    if let Some(dir) = &a.merge_out {
        let adapter = Adapter::load(&a.out, &dev)?;
        let opts = MergeOptions {
            direction: Direction::Merge,
            verify: false,
            force: false,
        };
        let merge_base = if rewrites_base {
            a.out.join(lora::convert::RESIDUAL_DIR)
        } else {
            a.model.clone()
        };
        merge_checkpoint(&merge_base, &adapter, dir, opts)
            .with_context(|| format!("merging into {}", dir.display()))?;
        println!("merged model written to {}", dir.display());
    }
    Ok(())
}

fn lora_config(a: &TrainArgs, base: &str) -> LoraConfig {
    let targets = match (&a.target_modules, &a.target_regex) {
        (_, Some(re)) => TargetModules::Regex(re.clone()),
        (Some(l), None) if l.len() == 1 && l[0] == "all-linear" => TargetModules::AllLinear,
        (Some(l), None) => TargetModules::List(l.clone()),
        (None, None) => TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
    };
    LoraConfig {
        r: a.r.unwrap_or(8),
        lora_alpha: a.alpha.unwrap_or(16.0),
        lora_dropout: a.dropout.unwrap_or(0.05),
        use_rslora: a.rslora,
        use_dora: a.use_dora,
        init_lora_weights: match a.init_lora_weights.as_str() {
            "true" => InitLoraWeights::Default,
            "false" => InitLoraWeights::Random,
            "gaussian" => InitLoraWeights::Gaussian,
            other => InitLoraWeights::Other(other.to_string()),
        },
        target_modules: Some(targets),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(base.to_string()),
        ..LoraConfig::default()
    }
}

/// `lora train` for a `*ForSequenceClassification` model: labelled JSONL (`"label"` with
/// `"text"` or `"input_ids"`), cross-entropy, eval accuracy; saves a `SEQ_CLS` adapter whose
/// head is a modules_to_save copy (or, with `--full`, every weight).
fn run_classifier(a: &TrainArgs) -> anyhow::Result<()> {
    use lora::models::Classifier;
    use lora::train::classify::{evaluate_classifier, load_labeled, train_classifier};
    if a.resume.is_some() || a.grad_accum != 1 || a.steps.is_some() {
        bail!("sequence classifiers train by --epochs, without --resume, --grad-accum or --steps");
    }
    let dev = Device::Cpu;
    let base_name = a.model.display().to_string();
    let vb =
        LoraBuilder::new(Checkpoint::open(&a.model)?, DType::F32, dev.clone()).with_seed(a.seed)?;
    let vb = if a.full {
        vb.full_finetune()?
    } else if let Some(dir) = &a.adapter_init {
        let mut ad = Adapter::load(dir, &dev)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        if let Some(d) = a.dropout {
            ad.config.lora_dropout = d;
        }
        vb.with_adapter(ad)?
    } else {
        let mut c = lora_config(a, &base_name);
        c.task_type = Some("SEQ_CLS".into());
        if a.linear_probe {
            c.target_modules = Some(TargetModules::List(vec![]));
        } else if a.target_modules.is_none() && a.target_regex.is_none() {
            c.target_modules = Some(TargetModules::List(
                if lora::models::BertConfig::describes(&read_config(&a.model)?) {
                    vec!["query".into(), "value".into()]
                } else {
                    vec!["q_proj".into(), "v_proj".into()]
                },
            ));
        }
        vb.with_config(c)?
    };
    let model = Classifier::from_builder(&a.model, &vb)?;
    let tok_path = a.model.join("tokenizer.json");
    let vocab = match &model {
        Classifier::Bert(m) => m.config().vocab_size,
        Classifier::Llama(m) => m.config().vocab_size,
    };
    let tok = if tok_path.is_file() {
        Some(lora::train::data::load_tokenizer(&tok_path, vocab)?)
    } else {
        None
    };
    let max_len = match (a.max_len, model.max_len()) {
        (Some(m), Some(p)) => Some(m.min(p)),
        (m, p) => m.or(p),
    };
    let n = model.num_labels();
    let train = load_labeled(&a.data, tok.as_ref(), n, vocab, max_len)?;
    let eval = a
        .eval_data
        .as_deref()
        .map(|p| load_labeled(p, tok.as_ref(), n, vocab, max_len))
        .transpose()?;
    let trainable: usize = vb.trainable_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!(
        "training {trainable} parameters ({}) on {} examples, {n} labels",
        if a.full {
            "every weight".to_string()
        } else {
            format!(
                "{} adapted modules + {} head tensors",
                vb.adapted_modules().len(),
                vb.saved_tensors().len()
            )
        },
        train.len()
    );
    let tc = lora::train::classify::ClassifierTrainConfig {
        lr: a.lr,
        schedule: a.schedule,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        batch_size: a.batch_size,
        epochs: a.epochs.unwrap_or(1),
        seed: a.seed,
    };
    crate::ALLOC.reset_peak();
    let heap_before = crate::ALLOC.current();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let summary = train_classifier(&model, &train, &tc, &mut |step, total, loss| {
        bar.set_length(total as u64);
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4}"));
    });
    bar.finish_and_clear();
    let summary = summary?;
    let peak = crate::ALLOC.peak().saturating_sub(heap_before);
    if a.full {
        let tensors: std::collections::BTreeMap<String, candle_core::Tensor> = vb
            .named_trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
        lora::tensor_file::save(
            &a.out.join("model.safetensors"),
            &tensors,
            &lora::tensor_file::pt_metadata(),
        )?;
        for f in lora::merge::SIDE_FILES {
            let src = a.model.join(f);
            if src.is_file() {
                std::fs::copy(&src, a.out.join(f)).with_context(|| src.display().to_string())?;
            }
        }
    } else {
        let mut ad = vb.adapter()?;
        ad.config.base_model_name_or_path = Some(base_name);
        ad.save(&a.out)?;
    }
    let json = serde_json::json!({
        "steps": summary.steps,
        "epoch_losses": summary.epoch_losses,
        "train_seconds": summary.seconds,
        "trainable_params": trainable,
        "heap_peak_mib": peak as f64 / (1024.0 * 1024.0),
        "peak_rss_mib": lora::app::bench::peak_rss_mib(),
        "eval": eval.as_ref().map(|e| evaluate_classifier(&model, e, 64)).transpose()?
            .map(|(loss, acc)| serde_json::json!({"loss": loss, "accuracy": acc})),
    });
    lora::tensor_file::write_text_atomic(
        &a.out.join("classify_summary.json"),
        &serde_json::to_string_pretty(&json)?,
    )?;
    println!(
        "trained {} steps in {:.1} s; epoch losses {:?}; wrote {}",
        summary.steps,
        summary.seconds,
        summary
            .epoch_losses
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect::<Vec<_>>(),
        a.out.display()
    );
    if let Some(e) = json.get("eval").filter(|e| !e.is_null()) {
        println!(
            "eval: loss {:.4}, accuracy {:.4}",
            e["loss"].as_f64().unwrap_or(f64::NAN),
            e["accuracy"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "memory: heap peak while training {:.1} MiB above the loaded model; peak RSS {}",
        peak as f64 / (1024.0 * 1024.0),
        lora::app::bench::peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0} MiB")),
    );
    Ok(())
}

fn read_config(model: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let f = model.join("config.json");
    let text = std::fs::read_to_string(&f).with_context(|| f.display().to_string())?;
    serde_json::from_str(&text).with_context(|| f.display().to_string())
}
