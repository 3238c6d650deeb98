//! Training checkpoints: `DIR/checkpoint-<step>/`, written atomically (a temporary folder,
//! renamed into place), holding everything a resumed run needs to continue exactly:
//!
//! - the weights: `adapter_config.json` + `adapter_model.safetensors` (PEFT's format: the folder
//!   is itself a loadable adapter), or `model.safetensors` under full fine-tuning;
//! - `optimizer.safetensors`: AdamW's `m`, `v` and step counts;
//! - `trainer_state.json`: step, epoch and position in the epoch's data order, the random
//!   states (data shuffling, and the LoRA init/dropout source), the data's fingerprint, the
//!   training config and the metrics so far.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::metrics::Record;
use super::TrainConfig;
use crate::error::{Error, Result};
use crate::layers::LoraRng;

/// The trainer's state file in a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// The optimizer's state file in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The weights file of a fully fine-tuned model.
pub const MODEL_FILE: &str = "model.safetensors";
/// Checkpoint folders are `checkpoint-<step>`.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
const FORMAT: &str = "lora-trainer/1";

/// A ChaCha8 position: seed, stream and word position (decimal strings, as JSON numbers
/// cannot hold 128 bits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// The stream number.
    pub stream: String,
    /// The word position in the stream.
    pub word_pos: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl RngState {
    /// The state of `rng`.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: hex(&rng.get_seed()),
            stream: rng.get_stream().to_string(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// The state of a [`LoraRng`] (stream 0).
    pub fn of_lora(rng: &LoraRng) -> Self {
        let (seed, pos) = rng.state();
        RngState {
            seed: hex(&seed),
            stream: "0".into(),
            word_pos: pos.to_string(),
        }
    }

    fn parts(&self, file: &Path) -> Result<([u8; 32], u64, u128)> {
        let bad = || Error::BadJson {
            path: file.into(),
            reason: format!("bad random state {self:?}"),
        };
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let stream = self.stream.parse().map_err(|_| bad())?;
        let pos = self.word_pos.parse().map_err(|_| bad())?;
        Ok((seed, stream, pos))
    }

    /// A generator at this state (`file` is named in errors).
    pub fn to_rng(&self, file: &Path) -> Result<ChaCha8Rng> {
        let (seed, stream, pos) = self.parts(file)?;
        let mut r = ChaCha8Rng::from_seed(seed);
        r.set_stream(stream);
        r.set_word_pos(pos);
        Ok(r)
    }

    /// Puts `rng` at this state.
    pub fn restore_lora(&self, rng: &LoraRng, file: &Path) -> Result<()> {
        let (seed, _, pos) = self.parts(file)?;
        rng.restore(seed, pos);
        Ok(())
    }
}

/// What is being trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// LoRA adapters only.
    Lora,
    /// Every weight (full fine-tuning).
    Full,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format tag.
    pub format: String,
    /// LoRA or full fine-tuning.
    pub mode: TrainMode,
    /// Optimizer steps done.
    pub step: usize,
    /// Planned total steps of the run that wrote it.
    pub total_steps: usize,
    /// The current epoch (0-based).
    pub epoch: usize,
    /// Micro-batches of the current epoch already consumed.
    pub micro_batch: usize,
    /// The data-order generator at the start of the current epoch (its permutation is
    /// re-drawn from here on resume).
    pub epoch_rng: RngState,
    /// The data-order generator now.
    pub trainer_rng: RngState,
    /// The LoRA init/dropout source now.
    pub lora_rng: RngState,
    /// Examples in the training data.
    pub data_examples: usize,
    /// The training data's fingerprint (hex), see [`super::data::Dataset::fingerprint`].
    pub data_fingerprint: String,
    /// The configuration of the run that wrote it.
    pub config: TrainConfig,
    /// Every metric record so far.
    pub metrics: Vec<Record>,
}

impl TrainerState {
    /// A new state record (the format tag filled in).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        mode: TrainMode,
        step: usize,
        total_steps: usize,
        epoch: usize,
        micro_batch: usize,
        rngs: [RngState; 3],
        data: (usize, u64),
        config: TrainConfig,
        metrics: Vec<Record>,
    ) -> Self {
        let [epoch_rng, trainer_rng, lora_rng] = rngs;
        TrainerState {
            format: FORMAT.into(),
            mode,
            step,
            total_steps,
            epoch,
            micro_batch,
            epoch_rng,
            trainer_rng,
            lora_rng,
            data_examples: data.0,
            data_fingerprint: format!("{:016x}", data.1),
            config,
            metrics,
        }
    }

    /// Reads `dir/trainer_state.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let st: TrainerState = serde_json::from_str(&text).map_err(|e| Error::BadJson {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if st.format != FORMAT {
            return Err(Error::BadJson {
                path,
                reason: format!("format `{}`, expected `{FORMAT}`", st.format),
            });
        }
        Ok(st)
    }

    /// Writes it to `dir/trainer_state.json`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::State(e.to_string()))?;
        crate::tensor_file::write_text_atomic(&dir.join(STATE_FILE), &text)
    }
}

/// The checkpoint to resume from: `dir` itself if it holds `trainer_state.json`, else its
/// `checkpoint-<step>` subfolder with the highest step.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if e.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, e.path()));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {STATE_FILE} here and no checkpoint-<step> folder holding one"),
            ),
        )
    })
}

/// Writes a checkpoint folder `out/checkpoint-<step>` atomically: `fill` writes into a
/// temporary folder, which is then renamed into place (replacing an older one of that step).
pub fn write_checkpoint(
    out: &Path,
    step: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let name = format!("{CHECKPOINT_PREFIX}{step}");
    let dst = out.join(&name);
    let tmp = out.join(format!(".{name}.{}.tmp", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dst.exists() {
        let old = out.join(format!(".{name}.{}.old", std::process::id()));
        std::fs::rename(&dst, &old).map_err(|e| Error::io(&dst, e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    let _ = std::fs::File::open(out).and_then(|d| d.sync_all());
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn rng_states_restore_the_stream() {
        let mut r = ChaCha8Rng::seed_from_u64(9);
        r.set_stream(1);
        r.next_u64();
        let st = RngState::of(&r);
        let mut back = st.to_rng(Path::new("x")).unwrap();
        assert_eq!(r.next_u64(), back.next_u64());
        let l = LoraRng::new(3);
        l.uniform(7, 1.0);
        let st = RngState::of_lora(&l);
        let want = l.uniform(3, 1.0);
        let m = LoraRng::new(0);
        st.restore_lora(&m, Path::new("x")).unwrap();
        assert_eq!(m.uniform(3, 1.0), want);
        let bad = RngState {
            seed: "zz".into(),
            ..st
        };
        assert!(bad
            .to_rng(Path::new("state.json"))
            .unwrap_err()
            .to_string()
            .contains("state.json"));
    }

    #[test]
    fn checkpoints_are_written_atomically_and_found_by_step() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for step in [2, 10, 4] {
            write_checkpoint(out, step, |d| {
                std::fs::write(d.join(STATE_FILE), "{}").map_err(|e| Error::io(d, e))
            })
            .unwrap();
        }
        let failed = write_checkpoint(out, 12, |_| Err(Error::State("disk full".into())));
        assert!(failed.is_err());
        let mut names: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["checkpoint-10", "checkpoint-2", "checkpoint-4"]);
        assert_eq!(find_checkpoint(out).unwrap(), out.join("checkpoint-10"));
        assert_eq!(
            find_checkpoint(&out.join("checkpoint-2")).unwrap(),
            out.join("checkpoint-2")
        );
        // Rewriting a step replaces it.
        write_checkpoint(out, 2, |d| {
            std::fs::write(d.join("new"), "x").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert!(out.join("checkpoint-2/new").exists());
        assert!(!out.join("checkpoint-2").join(STATE_FILE).exists());
        let empty = tempfile::tempdir().unwrap();
        assert!(find_checkpoint(empty.path()).is_err());
    }
}
