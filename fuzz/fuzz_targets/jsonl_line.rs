//! Training-data JSONL parsing and tokenisation on arbitrary bytes (text, prompt/completion and
//! input_ids lines), with the quickstart's character tokenizer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lora::train::data::{Dataset, LazyTokenizer};

const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/quickstart/base/tokenizer.json");

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("data.jsonl");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let mut tok = LazyTokenizer::new(Some(TOKENIZER.into()), 80);
    if let Ok(ds) = Dataset::load_jsonl(&path, &mut tok, Some(64)) {
        let idx: Vec<usize> = (0..ds.len().min(4)).collect();
        if !idx.is_empty() {
            let _ = ds.batch(&idx, &candle_core::Device::Cpu);
        }
    }
});
