//! Writes the starting point of the quickstart's base model: a randomly initialised Llama with a
//! character-level tokenizer (`<dir>/init`) and the task-A training data (`<dir>/task_a.jsonl`).
//! `scripts/remake-quickstart-base.sh` then teaches it task A with `lora train --full`.
//!
//! ```bash
//! cargo run --release --example make_quickstart_base -- /tmp/qs
//! ```
use std::path::PathBuf;

use lora::app::quickstart::{base, tasks};

fn main() -> lora::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "quickstart-base".into()),
    );
    base::write_random_model(&dir.join("init"), base::BaseShape::default(), 0)?;
    let (train, held) = tasks::split_words(0, tasks::HELD_OUT);
    let all: Vec<String> = train.into_iter().chain(held).collect();
    let a = tasks::task_a(&all, 1);
    lora::tensor_file::write_text_atomic(&dir.join("task_a.jsonl"), &tasks::to_jsonl(&a))?;
    println!(
        "wrote {} task-A examples and a random model to {}",
        a.len(),
        dir.display()
    );
    Ok(())
}
