//! `lora quickstart`: the whole LoRA workflow on the shipped model, no download needed.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora::app::quickstart::run::{run as run_quickstart, Progress, QuickstartOptions};
use lora::train::Event;

/// Arguments of `lora quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Output folder (default: `lora-quickstart`, or the next free `lora-quickstart-N`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training steps (LoRA and full fine-tuning each).
    #[arg(long, default_value_t = QuickstartOptions::default().steps)]
    steps: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = QuickstartOptions::default().r)]
    r: usize,
    /// LoRA learning rate.
    #[arg(long, default_value_t = QuickstartOptions::default().lr)]
    lr: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the full fine-tuning comparison.
    #[arg(long)]
    skip_full: bool,
}

fn free_dir() -> PathBuf {
    let base = PathBuf::from("lora-quickstart");
    let taken = |p: &PathBuf| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|i| PathBuf::from(format!("lora-quickstart-{i}")))
        .find(|p| !taken(p))
        .unwrap_or(base)
}

/// Runs `lora quickstart`.
pub fn run(a: QuickstartArgs) -> anyhow::Result<()> {
    let opts = QuickstartOptions {
        out: a.out.unwrap_or_else(free_dir),
        steps: a.steps,
        r: a.r,
        lr: a.lr,
        seed: a.seed,
        skip_full: a.skip_full,
        ..QuickstartOptions::default()
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("  {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let meter = Some(&crate::ALLOC);
    let report = run_quickstart(&opts, meter, &mut |p| match p {
        Progress::Phase(s) => {
            bar.finish_and_clear();
            eprintln!("- {s}");
        }
        Progress::Train(Event::Start { step, total }) => {
            bar.reset();
            bar.set_length(*total as u64);
            bar.set_position(*step as u64);
        }
        Progress::Train(Event::Step(s)) => {
            bar.set_position(s.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.1e}  {:.0} tok/s",
                s.loss, s.lr, s.tokens_per_s
            ));
        }
        Progress::Train(Event::Eval(e)) => {
            let line = format!(
                "  step {}: held-out loss {:.4} (unmerged), perplexity {:.3}",
                e.step, e.eval_loss, e.eval_ppl
            );
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        Progress::Train(Event::Checkpoint(_)) => {}
    })?;
    bar.finish_and_clear();
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mib = |b: Option<usize>| {
        b.map_or("-".into(), |b| {
            format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
        })
    };
    println!();
    println!(
        "task B (held-out, exact match)   {} examples; trained on {}",
        report.heldout_examples, report.train_examples
    );
    println!(
        "  base model                     {}",
        pct(report.base_accuracy)
    );
    println!(
        "  LoRA adapter (unmerged)        {}",
        pct(report.lora_accuracy)
    );
    println!(
        "  LoRA merged                    {}",
        pct(report.merged_accuracy)
    );
    if let Some(f) = report.full_ft_accuracy {
        println!("  full fine-tuning               {}", pct(f));
    }
    println!(
        "base still does task A (reverse) {}",
        pct(report.base_task_a_accuracy)
    );
    println!();
    println!("                     LoRA          full fine-tuning");
    println!(
        "trainable params     {:<13} {}  (of {} in the model: {:.2}% for LoRA)",
        report.trainable_params,
        report.full_ft_trainable_params,
        report.total_params,
        100.0 * report.trainable_params as f64 / report.total_params as f64
    );
    println!(
        "peak training heap   {:<13} {}",
        mib(report.lora_peak_bytes),
        mib(report.full_ft_peak_bytes)
    );
    println!(
        "training time        {:<13} {}",
        format!("{:.1} s", report.lora_train_seconds),
        report
            .full_ft_train_seconds
            .map_or("-".into(), |s| format!("{s:.1} s"))
    );
    println!();
    println!(
        "merged weight vs explicit low-rank logits: max |diff| = {:.2e}",
        report.merge_max_abs_diff
    );
    println!(
        "inference on a held-out batch: base {:.2} ms, merged {:.2} ms (ratio {:.2})",
        report.base_forward_ms,
        report.merged_forward_ms,
        report.merged_forward_ms / report.base_forward_ms
    );
    println!("total {:.0} s", report.seconds);
    let out = report.out.display();
    println!("\nwrote {out}/: adapter/ (PEFT format), merged/ (model), loss_curve.png, report.json, data/, base/");
    Ok(())
}
