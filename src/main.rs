//! The `lora` command-line tool: thin wrappers over the library (see `lora --help`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
pub(crate) static ALLOC: lora::alloc::CountingAlloc = lora::alloc::CountingAlloc::new();

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the chain of causes joined by ": ".
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
