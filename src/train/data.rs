//! Training data: JSONL files, tokenised, truncated, shuffled and batched.
//!
//! Each non-blank line is one JSON object of one of three kinds (other keys are ignored):
//!
//! - `{"text": "..."}`: tokenised with the model's `tokenizer.json`; every token is a label.
//! - `{"prompt": "...", "completion": "..."}`: `prompt + completion` tokenised as one string (as
//!   TRL does); the leading tokens it shares with the tokenised prompt get label −100, so the
//!   loss covers the completion only.
//! - `{"input_ids": [...]}` (optionally with `"labels": [...]` of the same length, −100
//!   allowed): used as given, labels = ids by default; no tokenizer needed.
//!
//! Special tokens are exactly those the tokenizer's post-processor adds (a Llama
//! `tokenizer.json` adds BOS; nothing is invented here). `max_len` truncates on the right.
//! Examples with no token to predict (a single token, or a prompt filling `max_len`) are
//! skipped and counted. A malformed line is an error naming the file and the line number; a
//! tokenizer or an id that does not fit the model's vocabulary is an error too.
//!
//! Batches are right-padded to their longest example with labels −100 on the padding. A
//! causal model needs no attention mask for that: position `t` only attends to positions
//! `≤ t`, so the padding (always after the real tokens) never influences a real position, and
//! the padded positions themselves are never predicted.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::RngCore;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::loss::IGNORE_INDEX;

/// The token id written into padding positions (never attended to by real positions, never
/// predicted: its value does not matter).
pub const PAD_ID: u32 = 0;

/// One tokenised example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, one per token: the id itself, or −100 where nothing is learned.
    pub labels: Vec<i64>,
}

impl Example {
    /// The number of predicted tokens: labels at positions ≥ 1 that are not −100 (the first
    /// label is never predicted by a causal model).
    pub fn predicted(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// A tokenizer loaded on first use (`input_ids` data never needs one), checked against the
/// model's vocabulary size.
#[derive(Debug)]
pub struct LazyTokenizer {
    path: Option<PathBuf>,
    vocab_size: usize,
    tok: Option<tokenizers::Tokenizer>,
}

impl LazyTokenizer {
    /// A tokenizer to be read from `path` (usually `<model>/tokenizer.json`) when text must be
    /// tokenised; `None` if the model has none. Ids must be below `vocab_size`.
    pub fn new(path: Option<PathBuf>, vocab_size: usize) -> Self {
        LazyTokenizer {
            path,
            vocab_size,
            tok: None,
        }
    }

    /// The model's vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The tokenizer, loading and checking it on the first call. `why` names what needs it.
    pub fn get(&mut self, why: &str) -> Result<&tokenizers::Tokenizer> {
        if self.tok.is_none() {
            let path = self.path.clone().ok_or_else(|| {
                Error::State(format!(
                    "{why} needs a tokenizer, but the model has no tokenizer.json \
                     (give `input_ids` lines instead)"
                ))
            })?;
            let tok = load_tokenizer(&path, self.vocab_size)?;
            self.tok = Some(tok);
        }
        self.tok
            .as_ref()
            .ok_or_else(|| Error::State("tokenizer not loaded".into()))
    }
}

/// Reads `tokenizer.json` and checks that every id (added tokens included) is below
/// `vocab_size`. The file's own padding and truncation settings are switched off, as
/// transformers does for a call that does not ask for them: examples are tokenized one by one
/// (a fixed-length padding, as sentence-transformers' tokenizers carry, would make every
/// example that long with pad tokens counted as text), batches are padded by the trainer and
/// `max_len` truncates.
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer not found"),
        ));
    }
    let mut tok = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::BadJson {
        path: path.into(),
        reason: format!("not a tokenizer: {e}"),
    })?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| Error::BadJson {
        path: path.into(),
        reason: format!("tokenizer truncation: {e}"),
    })?;
    if let Some((token, id)) = tok
        .get_vocab(true)
        .into_iter()
        .max_by_key(|(_, id)| *id)
        .filter(|(_, id)| *id as usize >= vocab_size)
    {
        return Err(Error::Config(format!(
            "{}: token `{token}` has id {id} but the model's vocab_size is {vocab_size}: \
             this tokenizer does not belong to the model",
            path.display()
        )));
    }
    Ok(tok)
}

/// A tokenised data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it came from.
    pub path: PathBuf,
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Lines skipped because they had no token to predict.
    pub skipped: usize,
}

/// A padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, t]` u32, right-padded with [`PAD_ID`].
    pub input_ids: Tensor,
    /// `[b, t]` i64, −100 on padding.
    pub labels: Tensor,
    /// Predicted tokens in the batch (the loss's denominator).
    pub predicted: usize,
    /// Real (non-padding) tokens in the batch.
    pub tokens: usize,
}

fn line_err(path: &Path, line: usize, reason: impl std::fmt::Display) -> Error {
    Error::BadJson {
        path: path.into(),
        reason: format!("line {line}: {reason}"),
    }
}

impl Dataset {
    /// Reads and tokenises a JSONL file (see the module doc). `max_len` truncates each example.
    pub fn load_jsonl(
        path: &Path,
        tokenizer: &mut LazyTokenizer,
        max_len: Option<usize>,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let vocab = tokenizer.vocab_size();
        let mut examples = Vec::new();
        let mut skipped = 0;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| line_err(path, n, e))?;
            let Value::Object(obj) = v else {
                return Err(line_err(path, n, "expected a JSON object"));
            };
            let kinds: Vec<&str> = ["text", "prompt", "input_ids"]
                .into_iter()
                .filter(|k| obj.contains_key(*k))
                .collect();
            let str_field = |k: &str| -> Result<&str> {
                obj.get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| line_err(path, n, format!("`{k}` must be a string")))
            };
            let mut ex = match kinds.as_slice() {
                ["text"] => {
                    let text = str_field("text")?;
                    let ids = encode(tokenizer, path, n, text)?;
                    Example {
                        labels: ids.iter().map(|&x| x as i64).collect(),
                        input_ids: ids,
                    }
                }
                ["prompt"] => {
                    let prompt = str_field("prompt")?;
                    let completion = str_field("completion")?;
                    let p = encode(tokenizer, path, n, prompt)?;
                    let ids = encode(tokenizer, path, n, &format!("{prompt}{completion}"))?;
                    let shared = p.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                    let labels = ids
                        .iter()
                        .enumerate()
                        .map(|(j, &x)| if j < shared { IGNORE_INDEX } else { x as i64 })
                        .collect();
                    Example {
                        input_ids: ids,
                        labels,
                    }
                }
                ["input_ids"] => id_example(&obj, vocab, path, n)?,
                [] => {
                    return Err(line_err(
                        path,
                        n,
                        "expected `text`, `prompt` + `completion`, or `input_ids`",
                    ))
                }
                more => {
                    return Err(line_err(
                        path,
                        n,
                        format!("has {}: give exactly one kind", more.join(" and ")),
                    ))
                }
            };
            if let Some(m) = max_len {
                ex.input_ids.truncate(m);
                ex.labels.truncate(m);
            }
            if ex.predicted() == 0 {
                skipped += 1;
                continue;
            }
            examples.push(ex);
        }
        if examples.is_empty() {
            return Err(Error::State(format!(
                "{}: no example with a token to predict ({skipped} skipped)",
                path.display()
            )));
        }
        Ok(Dataset {
            path: path.into(),
            examples,
            skipped,
        })
    }

    /// A dataset from examples already tokenised (examples with nothing to predict are
    /// skipped).
    pub fn from_examples(path: impl Into<PathBuf>, examples: Vec<Example>) -> Self {
        let n = examples.len();
        let examples: Vec<Example> = examples.into_iter().filter(|e| e.predicted() > 0).collect();
        Dataset {
            path: path.into(),
            skipped: n - examples.len(),
            examples,
        }
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// A 64-bit FNV-1a hash of every id and label: a resumed run checks it sees the same data.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for e in &self.examples {
            eat(e.input_ids.len() as u64);
            e.input_ids.iter().for_each(|&x| eat(x as u64));
            e.labels.iter().for_each(|&x| eat(x as u64));
        }
        h
    }

    /// The examples at `indices`, right-padded to the longest into one batch on `dev`.
    pub fn batch(&self, indices: &[usize], dev: &Device) -> Result<Batch> {
        let exs: Vec<&Example> = indices
            .iter()
            .map(|&i| {
                self.examples
                    .get(i)
                    .ok_or_else(|| Error::State(format!("{}: no example {i}", self.path.display())))
            })
            .collect::<Result<_>>()?;
        let t = exs.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let b = exs.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut labels = Vec::with_capacity(b * t);
        for e in &exs {
            let pad = t - e.input_ids.len();
            ids.extend_from_slice(&e.input_ids);
            ids.extend(std::iter::repeat_n(PAD_ID, pad));
            labels.extend_from_slice(&e.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), dev)?,
            labels: Tensor::from_vec(labels, (b, t), dev)?,
            predicted: exs.iter().map(|e| e.predicted()).sum(),
            tokens: exs.iter().map(|e| e.input_ids.len()).sum(),
        })
    }
}

fn encode(tok: &mut LazyTokenizer, path: &Path, line: usize, text: &str) -> Result<Vec<u32>> {
    let why = format!("{} line {line}", path.display());
    let t = tok.get(&why)?;
    let enc = t
        .encode(text, true)
        .map_err(|e| line_err(path, line, format!("tokenizing failed: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

fn id_example(
    obj: &serde_json::Map<String, Value>,
    vocab: usize,
    path: &Path,
    n: usize,
) -> Result<Example> {
    let ints = |k: &str| -> Result<Vec<i64>> {
        obj.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| line_err(path, n, format!("`{k}` must be an array of integers")))?
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| line_err(path, n, format!("`{k}` holds {x}, not an integer")))
            })
            .collect()
    };
    let ids = ints("input_ids")?;
    let ids: Vec<u32> = ids
        .into_iter()
        .map(|x| {
            u32::try_from(x)
                .ok()
                .filter(|&u| (u as usize) < vocab)
                .ok_or_else(|| {
                    line_err(
                        path,
                        n,
                        format!("token id {x} is outside the model's vocabulary 0..{vocab}"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let labels = if obj.contains_key("labels") {
        let l = ints("labels")?;
        if l.len() != ids.len() {
            return Err(line_err(
                path,
                n,
                format!("{} labels for {} input_ids", l.len(), ids.len()),
            ));
        }
        if let Some(bad) = l
            .iter()
            .find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= vocab))
        {
            return Err(line_err(
                path,
                n,
                format!("label {bad} is neither -100 nor in 0..{vocab}"),
            ));
        }
        l
    } else {
        ids.iter().map(|&x| x as i64).collect()
    };
    Ok(Example {
        input_ids: ids,
        labels,
    })
}

/// A uniform integer in `0..bound` from 64-bit draws (Lemire's method with rejection), so the
/// shuffle depends only on the ChaCha stream, not on a library's sampling code.
fn below(rng: &mut impl RngCore, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = rng.next_u64() as u128 * bound as u128;
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// A Fisher–Yates permutation of `0..n` drawn from `rng`.
pub fn permutation(n: usize, rng: &mut impl RngCore) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A word-level tokenizer whose post-processor adds `<s>` (id 1), like Llama's.
    pub(crate) fn tokenizer_json(with_bos: bool) -> String {
        let post = if with_bos {
            r#"{"type":"TemplateProcessing",
                "single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],
                "pair":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],
                "special_tokens":{"<s>":{"id":"<s>","ids":[1],"tokens":["<s>"]}}}"#
        } else {
            "null"
        };
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}],
            "normalizer":null,"pre_tokenizer":{{"type":"WhitespaceSplit"}},"post_processor":{post},"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{"<unk>":0,"<s>":1,"the":2,"cat":3,"sat":4,"on":5,"mat":6,"Q:":7,"A:":8}},"unk_token":"<unk>"}}}}"#
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A tokenizer.json that pads every text to 8 tokens and truncates at 3 (as
    /// sentence-transformers' files fix 128) tokenizes each text as it is, as transformers
    /// does: no pad ids counted as text, no cut the caller did not ask for.
    #[test]
    fn the_files_own_padding_and_truncation_are_off() {
        let dir = tempfile::tempdir().unwrap();
        let json = tokenizer_json(true).replace(
            r#""truncation":null,"padding":null"#,
            r#""truncation":{"direction":"Right","max_length":3,"strategy":"LongestFirst","stride":0},
               "padding":{"strategy":{"Fixed":8},"direction":"Right","pad_to_multiple_of":null,
                          "pad_id":0,"pad_type_id":0,"pad_token":"<unk>"}"#,
        );
        assert!(json.contains("Fixed"));
        let path = write(dir.path(), "tokenizer.json", &json);
        let raw = tokenizers::Tokenizer::from_file(&path).unwrap();
        let padded = raw.encode("the cat sat on mat", true).unwrap();
        assert_eq!(
            padded.get_ids().len(),
            8,
            "the file pads (the case this guards)"
        );
        let tok = load_tokenizer(&path, 16).unwrap();
        let ids = tok.encode("the cat sat on mat", true).unwrap();
        assert_eq!(ids.get_ids(), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn text_prompt_completion_and_ids_lines() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write(dir.path(), "tokenizer.json", &tokenizer_json(true));
        let data = write(
            dir.path(),
            "d.jsonl",
            "{\"text\": \"the cat sat\"}\n\n\
             {\"prompt\": \"Q: the cat\", \"completion\": \" A: sat on mat\"}\n\
             {\"input_ids\": [5, 6, 7], \"id\": 3}\n\
             {\"input_ids\": [5, 6, 7, 2], \"labels\": [-100, 6, -100, 2]}\n\
             {\"input_ids\": [9]}\n",
        );
        let mut t = LazyTokenizer::new(Some(tok), 16);
        let ds = Dataset::load_jsonl(&data, &mut t, None).unwrap();
        assert_eq!(ds.skipped, 1, "a one-token line predicts nothing");
        let e = &ds.examples;
        assert_eq!(e[0].input_ids, [1, 2, 3, 4], "BOS from the post-processor");
        assert_eq!(e[0].labels, [1, 2, 3, 4]);
        assert_eq!(e[1].input_ids, [1, 7, 2, 3, 8, 4, 5, 6]);
        assert_eq!(e[1].labels, [-100, -100, -100, -100, 8, 4, 5, 6]);
        assert_eq!(e[1].predicted(), 4);
        assert_eq!(e[2].labels, [5, 6, 7]);
        assert_eq!(e[3].labels, [-100, 6, -100, 2]);

        // No post-processor: no BOS is invented. Truncation on the right.
        let tok2 = write(dir.path(), "tok2.json", &tokenizer_json(false));
        let mut t = LazyTokenizer::new(Some(tok2), 16);
        let ds = Dataset::load_jsonl(&data, &mut t, Some(2)).unwrap();
        assert_eq!(ds.examples[0].input_ids, [2, 3]);
        assert_eq!(ds.examples[1].input_ids, [5, 6]);
        assert_eq!(
            ds.skipped, 2,
            "the prompt fills max_len: nothing to predict"
        );
    }

    #[test]
    fn batches_are_right_padded_with_ignored_labels() {
        let ds = Dataset::from_examples(
            "mem",
            vec![
                Example {
                    input_ids: vec![3, 4, 5],
                    labels: vec![3, 4, 5],
                },
                Example {
                    input_ids: vec![7, 8],
                    labels: vec![-100, 8],
                },
            ],
        );
        let b = ds.batch(&[1, 0], &Device::Cpu).unwrap();
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            [[7, 8, PAD_ID], [3, 4, 5]]
        );
        assert_eq!(
            b.labels.to_vec2::<i64>().unwrap(),
            [[-100, 8, -100], [3, 4, 5]]
        );
        assert_eq!((b.predicted, b.tokens), (3, 5));
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = LazyTokenizer::new(None, 16);
        let cases = [
            ("{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2\n", "line 2"),
            (
                "{\"input_ids\": [1, 2]}\n\n[1, 2]\n",
                "line 3: expected a JSON object",
            ),
            ("{\"foo\": 1}\n", "line 1: expected `text`"),
            ("{\"input_ids\": [1, 99]}\n", "line 1: token id 99"),
            ("{\"input_ids\": [1, -1]}\n", "line 1: token id -1"),
            (
                "{\"input_ids\": [1, 2], \"labels\": [1]}\n",
                "line 1: 1 labels",
            ),
            (
                "{\"text\": \"a\", \"input_ids\": [1]}\n",
                "line 1: has text and input_ids",
            ),
            (
                "{\"prompt\": \"a\"}\n",
                "line 1: `completion` must be a string",
            ),
        ];
        for (text, want) in cases {
            let p = write(dir.path(), "bad.jsonl", text);
            let e = Dataset::load_jsonl(&p, &mut t, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("bad.jsonl") && e.contains(want), "{e} / {want}");
        }
        // Text without a tokenizer.
        let p = write(dir.path(), "text.jsonl", "{\"text\": \"the cat\"}\n");
        let e = Dataset::load_jsonl(&p, &mut t, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text.jsonl line 1") && e.contains("tokenizer"),
            "{e}"
        );
    }

    #[test]
    fn tokenizer_larger_than_the_model_vocabulary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write(dir.path(), "tokenizer.json", &tokenizer_json(true));
        let e = load_tokenizer(&tok, 8).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("id 8") && e.contains("vocab_size is 8"),
            "{e}"
        );
        assert!(load_tokenizer(&tok, 9).is_ok());
    }

    #[test]
    fn permutation_is_a_seeded_shuffle() {
        let p = permutation(50, &mut ChaCha8Rng::seed_from_u64(1));
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(p, s);
        assert_eq!(p, permutation(50, &mut ChaCha8Rng::seed_from_u64(1)));
        assert_ne!(p, permutation(50, &mut ChaCha8Rng::seed_from_u64(2)));
        // Uniform: each of 3! orders about 1/6 of the time.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..6000 {
            *counts.entry(permutation(3, &mut rng)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 6);
        assert!(
            counts.values().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }
}
