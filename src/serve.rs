//! Continuous batching over [`Llama::forward_batch`]: sequences with different adapters join
//! and leave the running batch at any step.
//!
//! A [`Batcher`] holds up to `max_batch` running sequences. Each [`Batcher::step`] runs one
//! batched forward pass: a sequence that just joined feeds its whole prompt, the others their
//! last token; each then samples its next token with its own [`Sampler`]. A sequence finishes
//! on one of its stop ids (not emitted), after `max_new_tokens`, or at the model's context
//! length; [`Batcher::cancel`] removes one at once. Either way its KV cache is freed.
//! Per sequence this is the loop of [`crate::models::generate`], so greedy output is the same.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use lora::models::{Llama, Sampling};
//! # use lora::serve::{Batcher, Event, SeqRequest};
//! # fn demo(base: Arc<Llama>) -> lora::Result<()> {
//! let mut b = Batcher::new(base, 16);
//! b.add(1, SeqRequest { prompt: vec![1, 5, 9], adapter: None, max_new_tokens: 8,
//!                       sampling: Sampling::default(), stop: vec![2] })?;
//! while !b.is_empty() {
//!     for (id, ev) in b.step()? {
//!         if let Event::Token(t) = ev { println!("{id}: {t}"); }
//!     }
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::models::{BatchSeq, Cache, Llama, Sampler, Sampling, ServeAdapter};

/// What one sequence asks for.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    /// Prompt token ids (at least one, fewer than the context length).
    pub prompt: Vec<u32>,
    /// The adapter to run with; `None` is the base model.
    pub adapter: Option<Arc<ServeAdapter>>,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Greedy or sampled, seeded.
    pub sampling: Sampling,
    /// Ids that end the sequence (not emitted).
    pub stop: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It produced a stop id.
    Stop,
    /// It reached `max_new_tokens` or the context length.
    Length,
}

/// What a step produced for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new token.
    Token(u32),
    /// The sequence ended and left the batch.
    Finished(Finish),
}

/// A running sequence.
struct Running {
    id: u64,
    req: SeqRequest,
    sampler: Sampler,
    cache: Cache,
    /// Tokens to feed next: the prompt, then the last sampled token.
    feed: Vec<u32>,
    produced: usize,
}

/// The running batch (see the module doc).
pub struct Batcher {
    model: Arc<Llama>,
    max_batch: usize,
    running: Vec<Running>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_batch", &self.max_batch)
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// An empty batch over `model` (opened without adapters) of at most `max_batch` sequences.
    pub fn new(model: Arc<Llama>, max_batch: usize) -> Self {
        Batcher {
            model,
            max_batch: max_batch.max(1),
            running: Vec::new(),
        }
    }

    /// The model's context length (`max_position_embeddings`).
    pub fn context(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// Whether another sequence fits.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.max_batch
    }

    /// Running sequences.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Adds sequence `id`; it runs from the next step. Errors on an empty prompt, one that
    /// fills the context, a token id outside the vocabulary, bad sampling settings or a full
    /// batch.
    pub fn add(&mut self, id: u64, req: SeqRequest) -> Result<()> {
        if !self.has_room() {
            return Err(Error::State(format!(
                "the batch is full ({} sequences)",
                self.max_batch
            )));
        }
        if req.prompt.is_empty() {
            return Err(Error::State(
                "generation needs at least one prompt token".into(),
            ));
        }
        if req.prompt.len() >= self.context() {
            return Err(Error::State(format!(
                "the prompt has {} tokens; the context holds {}",
                req.prompt.len(),
                self.context()
            )));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::State(format!(
                "token id {t} is outside the vocabulary (size {vocab})"
            )));
        }
        let sampler = Sampler::new(req.sampling)?;
        self.running.push(Running {
            id,
            feed: req.prompt.clone(),
            req,
            sampler,
            cache: Cache::new(&self.model),
            produced: 0,
        });
        Ok(())
    }

    /// Removes sequence `id` (its cache is freed); false when it was not running.
    pub fn cancel(&mut self, id: u64) -> bool {
        let before = self.running.len();
        self.running.retain(|r| r.id != id);
        self.running.len() != before
    }

    /// Runs one batched forward pass over every running sequence and samples each one's next
    /// token; finished sequences leave. Returns the events in batch order.
    pub fn step(&mut self) -> Result<Vec<(u64, Event)>> {
        let ctx = self.context();
        let mut events = Vec::new();
        // Sequences with nothing left to produce leave before the pass, as `generate` stops.
        self.running.retain(|r| {
            let done = r.produced >= r.req.max_new_tokens || r.cache.len() + r.feed.len() > ctx;
            if done {
                events.push((r.id, Event::Finished(Finish::Length)));
            }
            !done
        });
        if self.running.is_empty() {
            return Ok(events);
        }
        let logits = {
            let mut batch: Vec<BatchSeq> = self
                .running
                .iter_mut()
                .map(|r| BatchSeq {
                    tokens: &r.feed,
                    adapter: r.req.adapter.as_deref(),
                    cache: &mut r.cache,
                })
                .collect();
            self.model.forward_batch(&mut batch)?
        };
        let mut finished = Vec::new();
        for (r, row) in self.running.iter_mut().zip(&logits) {
            let next = r.sampler.sample(row)?;
            if r.req.stop.contains(&next) {
                events.push((r.id, Event::Finished(Finish::Stop)));
                finished.push(r.id);
                continue;
            }
            events.push((r.id, Event::Token(next)));
            r.produced += 1;
            r.feed = vec![next];
            if r.produced >= r.req.max_new_tokens || r.cache.len() + 1 > ctx {
                events.push((r.id, Event::Finished(Finish::Length)));
                finished.push(r.id);
            }
        }
        self.running.retain(|r| !finished.contains(&r.id));
        Ok(events)
    }
}

// The tests run the shipped quickstart model, which the `cli` feature embeds.
#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The shipped quickstart model, without adapters.
    fn quickstart() -> (tempfile::TempDir, Arc<Llama>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in crate::app::quickstart::run::BASE_FILES {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let m = Llama::open(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
        (dir, Arc::new(m))
    }

    fn req(prompt: &[u32], max: usize) -> SeqRequest {
        SeqRequest {
            prompt: prompt.to_vec(),
            adapter: None,
            max_new_tokens: max,
            sampling: Sampling::default(),
            stop: vec![2],
        }
    }

    #[test]
    fn batched_sequences_get_generates_tokens_and_leave_when_done_or_cancelled() {
        let (_dir, m) = quickstart();
        let prompts: [&[u32]; 3] = [&[1, 40, 10, 7], &[1, 5, 6], &[1, 30, 31, 32, 33, 34]];
        let mut b = Batcher::new(m.clone(), 2);
        b.add(0, req(prompts[0], 9)).unwrap();
        b.add(1, req(prompts[1], 0)).unwrap();
        // The batch holds two sequences.
        assert!(b.add(9, req(prompts[2], 5)).is_err());
        let mut got: Vec<Vec<u32>> = vec![vec![]; 3];
        let mut finished = [None; 3];
        let mut steps = 0;
        while !b.is_empty() {
            for (id, ev) in b.step().unwrap() {
                match ev {
                    Event::Token(t) => got[id as usize].push(t),
                    Event::Finished(f) => finished[id as usize] = Some(f),
                }
            }
            steps += 1;
            if steps == 1 {
                // Sequence 1 (no tokens asked) has left: sequence 2 joins mid-way.
                b.add(2, req(prompts[2], 20)).unwrap();
            }
            if steps == 4 {
                assert!(b.cancel(2));
            }
        }
        let alone = |p: &[u32], max: usize| {
            let mut s = Sampler::new(Sampling::default()).unwrap();
            crate::models::generate::<Error>(&m, p, max, &mut s, &[2], |_| Ok(())).unwrap()
        };
        assert_eq!(got[0], alone(prompts[0], 9));
        assert!(!got[0].is_empty());
        assert_eq!(finished[1], Some(Finish::Length));
        assert!(got[1].is_empty());
        // Cancelled after three of its steps: the first three tokens, then nothing.
        assert_eq!(got[2], alone(prompts[2], 3));
        assert_eq!(finished[2], None);
        // Prompts that fill the context or leave the vocabulary are refused.
        let long = vec![1u32; m.config().max_position_embeddings];
        assert!(b.add(5, req(&long, 1)).is_err());
        assert!(b.add(6, req(&[1, 999], 1)).is_err());
    }
}
