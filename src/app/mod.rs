//! The command-line tool's own code, built only with the `cli` feature and hidden from the
//! library's documentation: `lora demo`, `lora bench`, `lora quickstart` (with its shipped
//! model), the counting global allocator and the loss-curve plot. The library's public API is
//! the LoRA toolkit; nothing here is part of it.

pub mod alloc;
pub mod bench;
pub mod demo;
pub mod plot;
pub mod quickstart;
