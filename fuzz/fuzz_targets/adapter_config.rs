//! `adapter_config.json` parsing, validation and target matching on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lora::{LoraConfig, ModuleKind};

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = serde_json::from_slice::<LoraConfig>(data) else { return };
    if cfg.validate().is_err() {
        return;
    }
    let _ = cfg.check_supported();
    for name in ["model.layers.0.self_attn.q_proj", "lm_head", "model.embed_tokens", "a.1.b.2.c"] {
        let _ = cfg.is_target(name, ModuleKind::Linear);
        let _ = cfg.scaling_for(name);
    }
    let _ = cfg.to_json();
});
