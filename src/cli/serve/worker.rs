//! The batch thread: owns the [`Batcher`], takes queued jobs in as the batch has room, runs
//! one step at a time and sends each job its tokens. A job whose receiver is gone (its client
//! disconnected or its stop string was found) leaves the batch at the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use lora::models::Llama;
use lora::serve::{Batcher, Event, SeqRequest};
use tokio::sync::mpsc::UnboundedSender;

/// What a job receives.
#[derive(Debug)]
pub enum Msg {
    /// A step's event for this job.
    Event(Event),
    /// The job failed (the message says why).
    Error(String),
}

/// One request for the batch thread.
pub struct Job {
    /// The sequence.
    pub req: SeqRequest,
    /// Where its events go.
    pub out: UnboundedSender<Msg>,
}

/// The handle of the batch thread.
pub struct Worker {
    tx: Sender<Job>,
    /// Jobs queued or running.
    pending: Arc<AtomicUsize>,
    max_queue: usize,
}

impl Worker {
    /// Starts the batch thread over `model` with at most `max_batch` running sequences and
    /// `max_queue` jobs queued or running.
    pub fn spawn(model: Arc<Llama>, max_batch: usize, max_queue: usize) -> anyhow::Result<Self> {
        let (tx, rx) = channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("lora-batch".into())
            .spawn(move || run(Batcher::new(model, max_batch), rx, p))?;
        Ok(Worker {
            tx,
            pending,
            max_queue,
        })
    }

    /// Queues `job`; gives it back when the queue is full (or the thread is gone).
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let n = self.pending.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_queue {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(job);
        }
        self.tx.send(job).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            e.0
        })
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// The batch loop; returns when every sender is gone and nothing runs.
fn run(mut batch: Batcher, rx: Receiver<Job>, pending: Arc<AtomicUsize>) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut outs: HashMap<u64, UnboundedSender<Msg>> = HashMap::new();
    let mut next_id = 0u64;
    let done = |n: usize| {
        pending.fetch_sub(n, Ordering::SeqCst);
    };
    loop {
        if batch.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        waiting.extend(rx.try_iter());
        while batch.has_room() {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            if job.out.is_closed() {
                done(1);
                continue;
            }
            next_id += 1;
            match batch.add(next_id, job.req) {
                Ok(()) => {
                    outs.insert(next_id, job.out);
                }
                Err(e) => {
                    let _ = job.out.send(Msg::Error(e.to_string()));
                    done(1);
                }
            }
        }
        // Readers that went away: their sequences leave before the pass.
        outs.retain(|id, o| {
            let open = !o.is_closed();
            if !open {
                batch.cancel(*id);
                done(1);
            }
            open
        });
        match batch.step() {
            Ok(events) => {
                for (id, ev) in events {
                    let Some(o) = outs.get(&id) else { continue };
                    let sent = o.send(Msg::Event(ev)).is_ok();
                    if !sent || matches!(ev, Event::Finished(_)) {
                        outs.remove(&id);
                        batch.cancel(id);
                        done(1);
                    }
                }
            }
            Err(e) => {
                let msg = format!("the batched forward pass failed: {e}");
                for (id, o) in outs.drain() {
                    let _ = o.send(Msg::Error(msg.clone()));
                    batch.cancel(id);
                    done(1);
                }
            }
        }
    }
}
