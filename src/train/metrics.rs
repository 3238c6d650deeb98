//! Training metrics: one JSON object per line in `metrics.jsonl`, kept in memory too (they go
//! into every checkpoint, so a resumed run's log is complete).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The metrics file's name in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step number (1-based: the number of updates done).
    pub step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Mean loss over the step's predicted tokens (all accumulated micro-batches).
    pub loss: f64,
    /// The learning rate used by this update.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens in the step.
    pub tokens: usize,
    /// Tokens per second of wall time for this step.
    pub tokens_per_s: f64,
}

/// One evaluation on the held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The step after which it ran.
    pub step: usize,
    /// Mean loss over all predicted tokens of the held-out set.
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub eval_ppl: f64,
    /// Predicted tokens in the held-out set.
    pub eval_tokens: usize,
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A training step.
    Step(StepRecord),
    /// An evaluation.
    Eval(EvalRecord),
}

impl Record {
    /// The step the record belongs to.
    pub fn step(&self) -> usize {
        match self {
            Record::Step(s) => s.step,
            Record::Eval(e) => e.step,
        }
    }
}

/// Appends records to `metrics.jsonl` as training goes (flushed per line).
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// A log at `dir/metrics.jsonl`, rewritten (atomically) to hold exactly `so_far`.
    pub fn start(dir: &Path, so_far: &[Record]) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let mut text = String::new();
        for r in so_far {
            text.push_str(&to_line(r)?);
        }
        crate::tensor_file::write_text_atomic(&path, &text)?;
        Ok(MetricsLog { path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record.
    pub fn append(&self, r: &Record) -> Result<()> {
        let mut f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        f.write_all(to_line(r)?.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn to_line(r: &Record) -> Result<String> {
    let mut s = serde_json::to_string(r).map_err(|e| Error::State(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

/// Reads a `metrics.jsonl` file.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::BadJson {
                path: path.into(),
                reason: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_jsonl_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = Record::Step(StepRecord {
            step: 1,
            epoch: 0.5,
            loss: 4.25,
            lr: 1e-3,
            grad_norm: 0.75,
            tokens: 24,
            tokens_per_s: 100.0,
        });
        let b = Record::Eval(EvalRecord {
            step: 1,
            eval_loss: 2.0,
            eval_ppl: 2f64.exp(),
            eval_tokens: 11,
        });
        let log = MetricsLog::start(dir.path(), std::slice::from_ref(&a)).unwrap();
        log.append(&b).unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("{\"step\":1,\"eval_loss\":2.0"));
        assert_eq!(read_metrics(log.path()).unwrap(), vec![a.clone(), b]);
        // Restarting keeps exactly the given records.
        MetricsLog::start(dir.path(), std::slice::from_ref(&a)).unwrap();
        assert_eq!(read_metrics(log.path()).unwrap(), vec![a]);
    }
}
