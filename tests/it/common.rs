//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub use crate::testutil::{max_abs_diff, rel_diff};

/// The path of the built `lora` binary.
pub fn lora_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lora"))
}
