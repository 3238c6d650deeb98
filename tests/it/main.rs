//! The single integration-test binary; one module per area.

mod backprop;
mod bad_input;
mod common;
mod crash;
mod demo;
mod dora;
mod kill_resume;
mod llama;
mod merge;
mod pissa;
mod quickstart;
mod tinynet;
mod train;
