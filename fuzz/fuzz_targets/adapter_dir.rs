//! Adapter loading from a folder of fuzzed files: the input is split into the config and the
//! weights file at a position given by its first two bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cut = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(cut);
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join("adapter_config.json"), config).is_err()
        || std::fs::write(dir.path().join("adapter_model.safetensors"), weights).is_err()
    {
        return;
    }
    let _ = lora::Adapter::load(dir.path(), &candle_core::Device::Cpu);
});
