//! Command-line parsing: each subcommand lives in its own file with its `Args` and `run`.

use clap::{Parser, Subcommand};

mod bench;
mod combine;
mod convert_init;
mod demo;
mod embed;
mod extract;
mod generate;
mod inspect;
mod logits;
mod merge;
mod quickstart;
mod serve;
mod train;

/// LoRA fine-tuning, merging and inspection, compatible with Hugging Face PEFT.
#[derive(Debug, Parser)]
#[command(name = "lora", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Merge an adapter into a checkpoint: `<module>.weight += ΔW`, tensor by tensor.
    Merge(merge::MergeArgs),
    /// Take an adapter back out of a merged checkpoint: `<module>.weight -= ΔW`.
    Unmerge(merge::MergeArgs),
    /// The main job: train a LoRA adapter on the shipped model, merge it, compare with full
    /// fine-tuning; no download needed.
    Quickstart(quickstart::QuickstartArgs),
    /// Show an adapter's config, modules, ranks, scales and sizes.
    Inspect(inspect::InspectArgs),
    /// The five checks of a LoRA linear layer at x [32, 128, 768] -> 512, r 8: parameters,
    /// training memory, output change, merged = unmerged, inference speed (measured).
    Demo(demo::DemoArgs),
    /// Benchmarks with the PyTorch + PEFT baseline's shapes and keys (layer ops, Llama LoRA
    /// training step, memory ledger, peak RSS).
    Bench(bench::BenchArgs),
    /// Fine-tune a model with LoRA (or fully) on a JSONL file.
    Train(Box<train::TrainArgs>),
    /// Turn a PiSSA / OLoRA adapter (trained on the residual base) into a plain rank-2r LoRA
    /// for the original base.
    ConvertInit(convert_init::ConvertInitArgs),
    /// Run a Llama-family model (optionally with an adapter) on token ids; write the logits.
    Logits(logits::LogitsArgs),
    /// Complete a prompt with a Llama-family model, streaming the tokens.
    Generate(generate::GenerateArgs),
    /// Combine adapters into one, as PEFT's add_weighted_adapter: linear, cat, svd, ties,
    /// dare_linear, dare_ties, magnitude_prune (and *_svd).
    Combine(Box<combine::CombineArgs>),
    /// Extract a LoRA adapter from a full fine-tune: truncated SVD of each changed weight.
    Extract(Box<extract::ExtractArgs>),
    /// Serve a base model and its adapters over an OpenAI-style HTTP API, requests for
    /// different adapters batched together.
    Serve(serve::ServeArgs),
    /// Sentence embeddings of a JSONL file's texts with a BERT sentence-transformers model.
    Embed(embed::EmbedArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Merge(a) => merge::run(a, lora::merge::Direction::Merge),
        Command::Unmerge(a) => merge::run(a, lora::merge::Direction::Unmerge),
        Command::Inspect(a) => inspect::run(a),
        Command::Quickstart(a) => quickstart::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Train(a) => train::run(*a),
        Command::Combine(a) => combine::run(*a),
        Command::Extract(a) => extract::run(*a),
        Command::ConvertInit(a) => convert_init::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Embed(a) => embed::run(a),
    }
}
