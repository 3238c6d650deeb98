//! The single integration-test binary; one module per area.

mod bad_input;
mod common;
mod merge;
mod tinynet;
