//! The real all-MiniLM-L6-v2 (fetched by `scripts/fetch-minilm.sh` into `target/minilm`, or
//! `$LORA_MINILM_DIR`) against sentence-transformers' embeddings and its tokenizer's ids,
//! recorded by `scripts/make-minilm-reference.py`. `.ci/run` fetches the model once and sets
//! `LORA_REQUIRE_MINILM=1`, which turns a missing folder into a failure; elsewhere the test says
//! it did not run.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora::models::SentenceEncoder;
use lora::tensor_file::SafeFile;

use crate::common::fixture;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LORA_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/minilm"));
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("LORA_REQUIRE_MINILM").is_none(),
        "LORA_REQUIRE_MINILM is set but {} has no model.safetensors",
        dir.display()
    );
    eprintln!(
        "NOT RUN: {} has no all-MiniLM-L6-v2 (scripts/fetch-minilm.sh {})",
        dir.display(),
        dir.display()
    );
    None
}

fn texts() -> Vec<String> {
    std::fs::read_to_string(fixture("minilm/texts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let Some(dir) = model_dir() else { return };
    let reference = SafeFile::open(&fixture("minilm/reference.safetensors")).unwrap();
    let enc = SentenceEncoder::open(&dir, None, &Device::Cpu).unwrap();
    assert!(enc.pooling().mean && enc.pooling().normalize);
    let texts = texts();
    for (i, t) in texts.iter().enumerate() {
        let want: Vec<i64> = reference
            .tensor(&format!("input_ids.{i}"), &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<i64> = enc.tokenize(t).unwrap().iter().map(|&x| x as i64).collect();
        assert_eq!(got, want, "token ids of text {i}");
    }
    let ours = enc.embed(&texts, 4).unwrap();
    let theirs = reference.tensor("embeddings", &Device::Cpu).unwrap();
    let cos: Vec<f32> = (ours.clone() * &theirs)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = cos.iter().map(|c| (1.0 - c).abs()).fold(0f32, f32::max);
    let max_abs = crate::common::max_abs_diff(&ours, &theirs);
    eprintln!("all-MiniLM-L6-v2: 1 − cosine ≤ {worst:e}, max |diff| {max_abs:e}");
    assert!(worst < 1e-5, "cosines {cos:?}");
    assert!(max_abs < 1e-4);
    // Different texts give clearly different embeddings (the comparison can fail).
    let other = Tensor::cat(
        &[
            theirs.narrow(0, 1, 5).unwrap(),
            theirs.narrow(0, 0, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let c01: f32 = (ours * other)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(c01 < 0.9, "{c01}");
}
