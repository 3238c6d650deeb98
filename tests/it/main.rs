//! The single integration-test binary; one module per area.

mod bad_input;
mod common;
mod crash;
mod demo;
mod llama;
mod merge;
mod quickstart;
mod tinynet;
mod train;
