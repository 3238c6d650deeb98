//! Safetensors validation and tensor reads on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lora::tensor_file::SafeFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafeFile::from_bytes("fuzz.safetensors".as_ref(), data.to_vec()) else { return };
    for name in f.names() {
        let _ = f.info(&name);
        let _ = f.tensor(&name, &candle_core::Device::Cpu);
    }
    let _ = f.metadata();
});
