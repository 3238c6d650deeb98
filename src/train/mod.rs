//! Training a causal LM with LoRA (or fully): [`Trainer`].
//!
//! One optimizer step, as transformers' `Trainer` does it:
//!
//! ```text
//! for each of grad_accum micro-batches:  logits = model.forward_t(ids, train = true)
//!                                         backward of  Σ_tokens CE / N_step
//! N_step = predicted tokens in all the step's micro-batches (so accumulation equals one big batch)
//! g ← clip(g, max_grad_norm)             (global 2-norm, torch's clip_grad_norm_; 0 = off)
//! AdamW(lr = base_lr · λ(step))          over the builder's trainable variables only
//! ```
//!
//! Data is visited epoch by epoch in a seeded permutation (or file order), in batches of
//! `batch_size`; the last step of an epoch may have fewer micro-batches. Evaluation runs on a
//! held-out set every `eval_every` steps and at the end (no dropout, adapters unmerged), giving
//! the token-weighted mean loss and its perplexity. Every `save_every` steps (and at the end) a
//! checkpoint is written atomically (see [`resume`]); [`Trainer::resume`] continues from
//! one exactly as if never stopped: same data order, dropout masks, optimizer state and
//! learning rates, hence the same losses and final weights. A non-finite loss or gradient norm
//! stops training with an error before any weight is touched, leaving the last checkpoint.
//!
//! Outputs in the output folder: the final adapter in PEFT's format (or `model.safetensors`
//! plus the model's config and tokenizer files under full fine-tuning), `metrics.jsonl`
//! and the `checkpoint-<step>` folders (`lora train` adds the loss curve, `loss.png`).

pub mod classify;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod resume;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::builder::LoraBuilder;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use data::{Batch, Dataset};
use metrics::{EvalRecord, MetricsLog, Record, StepRecord};
use optim::{AdamW, AdamWConfig};
use resume::{RngState, TrainMode, TrainerState, MODEL_FILE, OPTIMIZER_FILE};
// The causal-LM loss is the models' objective and lives with them; training uses it from here.
pub use crate::models::loss;
pub use schedule::Schedule;

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Length {
    /// Whole passes over the data.
    Epochs(usize),
    /// A number of optimizer steps (the data is cycled as needed).
    Steps(usize),
}

/// Training hyper-parameters. The defaults are the CLI's: lr 2e-4, linear schedule, no
/// warmup, no weight decay, max grad norm 1, batch 8, no accumulation, 1 epoch, seed 0, no
/// activation checkpointing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule after warmup.
    pub schedule: Schedule,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay (biases and norm weights exempt).
    pub weight_decay: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Epochs or steps.
    pub length: Length,
    /// Evaluate every this many steps (and at the end); 0: only at the end.
    pub eval_every: usize,
    /// Checkpoint every this many steps (and at the end); 0: no checkpoints.
    pub save_every: usize,
    /// Seed of the data order (the LoRA init and dropout are seeded through the builder).
    pub seed: u64,
    /// Shuffle the data each epoch; false keeps file order.
    pub shuffle: bool,
    /// Activation checkpointing per decoder layer where the model's training engine runs (the
    /// Llama family on the CPU in f32): less memory, one more forward per step.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            batch_size: 8,
            grad_accum: 1,
            length: Length::Epochs(1),
            eval_every: 0,
            save_every: 0,
            seed: 0,
            shuffle: true,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("training: {m}")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr must be a finite number >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight decay must be >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("betas must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps must be >= 0");
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("max grad norm must be >= 0 (0 turns clipping off)");
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch size and gradient accumulation must be >= 1");
        }
        if matches!(self.length, Length::Epochs(0) | Length::Steps(0)) {
            return bad("train for at least one epoch or step");
        }
        Ok(())
    }
}

/// What the trainer writes as weights.
#[derive(Debug, Clone)]
pub enum SaveMode {
    /// The builder's adapters in PEFT's format (`task_type` `CAUSAL_LM`).
    Adapter {
        /// Written as `base_model_name_or_path`.
        base_model: Option<String>,
    },
    /// Every trainable weight as `model.safetensors`; the final folder also gets the model's
    /// config and tokenizer files copied from `model_dir`.
    Full {
        /// The base model's folder.
        model_dir: PathBuf,
    },
}

/// Progress reported to the caller (for a progress bar).
#[derive(Debug)]
pub enum Event<'a> {
    /// Training starts (or resumes) at `step` of `total`.
    Start {
        /// Steps already done.
        step: usize,
        /// Planned total.
        total: usize,
    },
    /// A step finished.
    Step(&'a StepRecord),
    /// An evaluation finished.
    Eval(&'a EvalRecord),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Steps done in total.
    pub steps: usize,
    /// Every record (train and eval), including those of a resumed run's earlier part.
    pub records: Vec<Record>,
    /// The output folder.
    pub out: PathBuf,
}

impl Summary {
    /// The training losses by step.
    pub fn losses(&self) -> Vec<f64> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Step(s) => Some(s.loss),
                _ => None,
            })
            .collect()
    }
}

/// Where the data loop stands.
#[derive(Debug, Clone)]
struct Position {
    step: usize,
    epoch: usize,
    micro: usize,
    /// The data-order generator at the start of `epoch`, and now.
    epoch_rng: ChaCha8Rng,
    rng: ChaCha8Rng,
    /// The current epoch's order, drawn lazily.
    order: Option<Vec<usize>>,
}

/// transformers' Trainer exempts biases and norm weights from weight decay.
pub fn no_weight_decay(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let segs: Vec<&str> = n.split('.').collect();
    n.contains("bias")
        || n.contains("layernorm")
        || n.contains("rmsnorm")
        || segs.contains(&"norm")
        || segs.iter().any(|s| s.ends_with("_norm"))
}

/// Trains `model` through the variables of `builder` (see the module doc).
pub struct Trainer<'a, M: CausalLm + ?Sized> {
    model: &'a M,
    builder: &'a LoraBuilder,
    cfg: TrainConfig,
    save: SaveMode,
    out: PathBuf,
    opt: AdamW,
    pos: Position,
    records: Vec<Record>,
    resumed: Option<(PathBuf, TrainerState)>,
    last_checkpoint: Option<PathBuf>,
}

impl<'a, M: CausalLm + ?Sized> Trainer<'a, M> {
    /// A fresh run writing into `out` (created; it must be empty or absent).
    pub fn new(
        model: &'a M,
        builder: &'a LoraBuilder,
        cfg: TrainConfig,
        save: SaveMode,
        out: &Path,
    ) -> Result<Self> {
        cfg.validate()?;
        if out.is_file() || std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
            return Err(Error::BadOutput {
                path: out.into(),
                reason: "exists and is not empty: choose a new output folder, or resume from \
                         a checkpoint"
                    .into(),
            });
        }
        let vars = builder.named_trainable_vars();
        if vars.is_empty() {
            return Err(Error::State(
                "nothing to train: the model has no trainable variable".into(),
            ));
        }
        let mut opt = AdamW::new(vars, adamw_config(&cfg))?;
        opt.set_no_decay(no_weight_decay);
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(1);
        Ok(Trainer {
            model,
            builder,
            save,
            out: out.into(),
            opt,
            pos: Position {
                step: 0,
                epoch: 0,
                micro: 0,
                epoch_rng: rng.clone(),
                rng,
                order: None,
            },
            records: vec![],
            resumed: None,
            last_checkpoint: None,
            cfg,
        })
    }

    /// Continues the run saved in `checkpoint` (a `checkpoint-<step>` folder), writing into
    /// `out` (which may already hold the earlier part). The builder must have been made from
    /// the checkpoint's weights ([`LoraBuilder::with_adapter`] with the checkpoint folder as
    /// the adapter, or its `model.safetensors` under full fine-tuning); `cfg` may extend the
    /// length.
    pub fn resume(
        model: &'a M,
        builder: &'a LoraBuilder,
        cfg: TrainConfig,
        save: SaveMode,
        out: &Path,
        checkpoint: &Path,
    ) -> Result<Self> {
        cfg.validate()?;
        let st = TrainerState::load(checkpoint)?;
        let state_file = checkpoint.join(resume::STATE_FILE);
        let mode = match save {
            SaveMode::Adapter { .. } => TrainMode::Lora,
            SaveMode::Full { .. } => TrainMode::Full,
        };
        if st.mode != mode {
            return Err(Error::Config(format!(
                "{}: the checkpoint is from {:?} training, this run is {mode:?}",
                state_file.display(),
                st.mode
            )));
        }
        if mode == TrainMode::Lora {
            check_same_adapter(builder, checkpoint)?;
        }
        let vars = builder.named_trainable_vars();
        let mut opt = AdamW::new(vars, adamw_config(&cfg))?;
        opt.set_no_decay(no_weight_decay);
        opt.load_state(&checkpoint.join(OPTIMIZER_FILE))?;
        st.lora_rng.restore_lora(builder.rng(), &state_file)?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let pos = Position {
            step: st.step,
            epoch: st.epoch,
            micro: st.micro_batch,
            epoch_rng: st.epoch_rng.to_rng(&state_file)?,
            rng: st.trainer_rng.to_rng(&state_file)?,
            order: None,
        };
        Ok(Trainer {
            model,
            builder,
            save,
            out: out.into(),
            opt,
            pos,
            records: st.metrics.clone(),
            resumed: Some((checkpoint.into(), st)),
            last_checkpoint: Some(checkpoint.into()),
            cfg,
        })
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Steps done so far.
    pub fn step(&self) -> usize {
        self.pos.step
    }

    /// The planned number of optimizer steps for `data`.
    pub fn total_steps(&self, data: &Dataset) -> usize {
        match self.cfg.length {
            Length::Steps(s) => s,
            Length::Epochs(e) => e * self.steps_per_epoch(data),
        }
    }

    fn batches_per_epoch(&self, data: &Dataset) -> usize {
        data.len().div_ceil(self.cfg.batch_size)
    }

    fn steps_per_epoch(&self, data: &Dataset) -> usize {
        self.batches_per_epoch(data).div_ceil(self.cfg.grad_accum)
    }

    /// Runs to the end (see the module doc); `on_event` sees progress.
    pub fn train(
        &mut self,
        data: &Dataset,
        eval: Option<&Dataset>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Summary> {
        if data.is_empty() {
            return Err(Error::State(format!(
                "{}: no training example",
                data.path.display()
            )));
        }
        if let Some((dir, st)) = &self.resumed {
            let fp = format!("{:016x}", data.fingerprint());
            if st.data_examples != data.len() || st.data_fingerprint != fp {
                return Err(Error::Config(format!(
                    "{}: the checkpoint was trained on other data ({} examples, fingerprint \
                     {}); {} has {} examples, fingerprint {fp}",
                    dir.display(),
                    st.data_examples,
                    st.data_fingerprint,
                    data.path.display(),
                    data.len()
                )));
            }
        }
        let total = self.total_steps(data);
        let log = MetricsLog::start(&self.out, &self.records)?;
        on_event(Event::Start {
            step: self.pos.step,
            total,
        });
        let nb = self.batches_per_epoch(data);
        let dev = self.builder.device().clone();
        while self.pos.step < total {
            if self.pos.micro >= nb {
                self.pos.epoch += 1;
                self.pos.micro = 0;
                self.pos.epoch_rng = self.pos.rng.clone();
                self.pos.order = None;
            }
            let order = match self.pos.order.take() {
                Some(o) => o,
                None => {
                    // Redrawn from the epoch's start state, so a resumed run gets the same order.
                    self.pos.rng = self.pos.epoch_rng.clone();
                    if self.cfg.shuffle {
                        data::permutation(data.len(), &mut self.pos.rng)
                    } else {
                        (0..data.len()).collect()
                    }
                }
            };
            let end = (self.pos.micro + self.cfg.grad_accum).min(nb);
            let batches = (self.pos.micro..end)
                .map(|b| {
                    let lo = b * self.cfg.batch_size;
                    let hi = (lo + self.cfg.batch_size).min(data.len());
                    data.batch(&order[lo..hi], &dev)
                })
                .collect::<Result<Vec<_>>>()?;
            self.pos.order = Some(order);
            let t0 = Instant::now();
            let lr = self
                .cfg
                .schedule
                .lr(self.cfg.lr, self.pos.step, self.cfg.warmup_steps, total);
            let (loss, grad_norm) = self.update(&batches, lr)?;
            self.pos.step += 1;
            self.pos.micro = end;
            let tokens: usize = batches.iter().map(|b| b.tokens).sum();
            let secs = t0.elapsed().as_secs_f64();
            let rec = StepRecord {
                step: self.pos.step,
                epoch: self.pos.epoch as f64 + self.pos.micro as f64 / nb as f64,
                loss,
                lr,
                grad_norm,
                tokens,
                tokens_per_s: if secs > 0.0 {
                    tokens as f64 / secs
                } else {
                    0.0
                },
            };
            log.append(&Record::Step(rec.clone()))?;
            on_event(Event::Step(&rec));
            self.records.push(Record::Step(rec));
            let last = self.pos.step == total;
            if let Some(ev) = eval {
                if last
                    || (self.cfg.eval_every > 0
                        && self.pos.step.is_multiple_of(self.cfg.eval_every))
                {
                    let e = self.evaluate(ev)?;
                    log.append(&Record::Eval(e.clone()))?;
                    on_event(Event::Eval(&e));
                    self.records.push(Record::Eval(e));
                }
            }
            if self.cfg.save_every > 0
                && (last || self.pos.step.is_multiple_of(self.cfg.save_every))
            {
                let dir = self.save_checkpoint(data, total)?;
                on_event(Event::Checkpoint(&dir));
                self.last_checkpoint = Some(dir);
            }
        }
        self.save_final()?;
        Ok(Summary {
            steps: self.pos.step,
            records: self.records.clone(),
            out: self.out.clone(),
        })
    }

    /// Forward, backward (accumulated), clip and one AdamW update; returns the step's mean
    /// loss and the gradient norm before clipping.
    fn update(&mut self, batches: &[Batch], lr: f64) -> Result<(f64, f64)> {
        let n: usize = batches.iter().map(|b| b.predicted).sum();
        let vars = self.opt.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        for b in batches {
            let opts = crate::models::FusedOptions {
                gradient_checkpointing: self.cfg.gradient_checkpointing,
            };
            if let Some(f) = self
                .model
                .fused_loss_and_grads(&b.input_ids, &b.labels, opts)?
            {
                if f.count == 0 {
                    continue;
                }
                loss_sum += f.loss_sum;
                for (v, gi) in f.grads {
                    let Some(slot) = vars
                        .iter()
                        .position(|x| x.as_tensor().id() == v.as_tensor().id())
                    else {
                        continue;
                    };
                    let gi = (gi / n as f64)?;
                    grads[slot] = Some(match grads[slot].take() {
                        None => gi,
                        Some(acc) => (acc + gi)?,
                    });
                }
                continue;
            }
            let logits = self.model.forward_t(&b.input_ids, true)?;
            let (sum, count) = loss::causal_lm_loss_sum(&logits, &b.labels)?;
            if count == 0 {
                continue;
            }
            loss_sum += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            let g = (sum / n as f64)?.backward()?;
            for (slot, v) in grads.iter_mut().zip(&vars) {
                if let Some(gi) = g.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        None => gi.clone(),
                        Some(acc) => (acc + gi)?,
                    });
                }
            }
        }
        let loss = loss_sum / n.max(1) as f64;
        let step = self.pos.step + 1;
        if !loss.is_finite() {
            return Err(self.diverged(step, format!("loss is {loss}")));
        }
        let norm = optim::clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(self.diverged(step, format!("gradient norm is {norm}")));
        }
        self.opt.step(&grads, lr)?;
        Ok((loss, norm))
    }

    fn diverged(&self, step: usize, what: String) -> Error {
        Error::NonFinite {
            key: "loss".into(),
            what: format!(
                "training diverged at step {step}: {what}; stopped without updating; last good \
                 checkpoint: {}",
                self.last_checkpoint
                    .as_ref()
                    .map_or("none (none saved yet)".into(), |p| p.display().to_string())
            ),
        }
    }

    /// Token-weighted mean loss and perplexity on `data`, in file order, without dropout.
    pub fn evaluate(&self, data: &Dataset) -> Result<EvalRecord> {
        let dev = self.builder.device();
        let idx: Vec<usize> = (0..data.len()).collect();
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in idx.chunks(self.cfg.batch_size) {
            let b = data.batch(chunk, dev)?;
            let logits = self.model.forward_t(&b.input_ids, false)?.detach();
            let (s, c) = loss::causal_lm_loss_sum(&logits, &b.labels)?;
            sum += s.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            n += c;
        }
        let l = sum / n.max(1) as f64;
        Ok(EvalRecord {
            step: self.pos.step,
            eval_loss: l,
            eval_ppl: l.exp(),
            eval_tokens: n,
        })
    }

    /// The current weights in their saved form (adapter, or named full weights).
    fn weights(&self) -> Result<Weights> {
        match &self.save {
            SaveMode::Adapter { base_model } => {
                let mut a = self.builder.adapter()?;
                a.config.task_type = Some("CAUSAL_LM".into());
                a.config.base_model_name_or_path = base_model.clone();
                for (name, m) in &a.modules {
                    crate::layers::check_finite(&m.a, &format!("{name}.lora_A"), "saving")?;
                    crate::layers::check_finite(&m.b, &format!("{name}.lora_B"), "saving")?;
                    if let Some(mag) = &m.magnitude {
                        let key = format!("{name}.lora_magnitude_vector");
                        crate::layers::check_finite(mag, &key, "saving")?;
                    }
                }
                Ok(Weights::Adapter(Box::new(a)))
            }
            SaveMode::Full { .. } => {
                let map: BTreeMap<String, Tensor> = self
                    .builder
                    .named_trainable_vars()
                    .into_iter()
                    .map(|(n, v): (String, Var)| (n, v.as_tensor().clone()))
                    .collect();
                for (n, t) in &map {
                    crate::layers::check_finite(t, n, "saving")?;
                }
                Ok(Weights::Full(map))
            }
        }
    }

    fn save_checkpoint(&self, data: &Dataset, total: usize) -> Result<PathBuf> {
        let w = self.weights()?;
        let mode = match w {
            Weights::Adapter(_) => TrainMode::Lora,
            Weights::Full(_) => TrainMode::Full,
        };
        let state = TrainerState::new(
            mode,
            self.pos.step,
            total,
            self.pos.epoch,
            self.pos.micro,
            [
                RngState::of(&self.pos.epoch_rng),
                RngState::of(&self.pos.rng),
                RngState::of_lora(self.builder.rng()),
            ],
            (data.len(), data.fingerprint()),
            self.cfg.clone(),
            self.records.clone(),
        );
        resume::write_checkpoint(&self.out, self.pos.step, |dir| {
            w.save(dir)?;
            self.opt.save(&dir.join(OPTIMIZER_FILE))?;
            state.save(dir)
        })
    }

    fn save_final(&self) -> Result<()> {
        let w = self.weights()?;
        w.save(&self.out)?;
        if let SaveMode::Full { model_dir } = &self.save {
            for f in crate::merge::SIDE_FILES {
                let src = model_dir.join(f);
                if src.is_file() {
                    let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                    let mut out = crate::tensor_file::AtomicFile::create(&self.out.join(f))?;
                    out.write_all(&bytes)?;
                    out.commit()?;
                }
            }
        }
        Ok(())
    }
}

/// Saved weights.
enum Weights {
    Adapter(Box<Adapter>),
    Full(BTreeMap<String, Tensor>),
}

impl Weights {
    fn save(&self, dir: &Path) -> Result<()> {
        match self {
            Weights::Adapter(a) => a.save(dir),
            Weights::Full(m) => crate::tensor_file::save(
                &dir.join(MODEL_FILE),
                m,
                &crate::tensor_file::pt_metadata(),
            ),
        }
    }
}

fn adamw_config(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    }
}

/// Checks that the builder's adapters hold exactly the checkpoint's values.
fn check_same_adapter(builder: &LoraBuilder, checkpoint: &Path) -> Result<()> {
    let saved = Adapter::load(checkpoint, builder.device())?;
    let now = builder.adapter()?;
    let same = saved.modules.len() == now.modules.len()
        && saved.modules.iter().all(|(name, s)| {
            now.modules.get(name).is_some_and(|m| {
                [(&s.a, &m.a), (&s.b, &m.b)].iter().all(|(x, y)| {
                    x.dims() == y.dims()
                        && crate::tensor_file::tensor_bytes(x).ok()
                            == crate::tensor_file::tensor_bytes(y).ok()
                })
            })
        });
    if !same {
        return Err(Error::State(format!(
            "{}: the model was not built from this checkpoint's adapter (build it with \
             LoraBuilder::with_adapter(Adapter::load(checkpoint)))",
            checkpoint.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
