//! The single integration-test binary; one module per area.

mod algebra;
mod backprop;
mod bad_input;
mod common;
mod crash;
mod demo;
mod dora;
mod kill_resume;
mod llama;
mod merge;
mod minilm;
mod pissa;
mod quickstart;
mod seqcls;
mod serve;
mod tinynet;
mod train;

/// Tensor closeness, the same file as the library's unit tests use.
#[path = "../../src/testutil.rs"]
mod testutil;
