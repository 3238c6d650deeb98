//! The single integration-test binary; one module per area.

mod backprop;
mod bad_input;
mod common;
mod crash;
mod demo;
mod kill_resume;
mod llama;
mod merge;
mod minilm;
mod quickstart;
mod seqcls;
mod tinynet;
mod train;
