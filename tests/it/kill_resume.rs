//! Crash safety of `lora train`: SIGKILL at several points, resume each time from the latest
//! checkpoint, and end with exactly the adapter and the losses of an uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{fixture, lora_bin};

const STEPS: &str = "40";

fn write_data(dir: &Path) -> std::path::PathBuf {
    // 16 short id sequences from the fixture's vocabulary (128), deterministic.
    let lines: String = (0..16u32)
        .map(|i| {
            let ids: Vec<u32> = (0..10).map(|j| (i * 7 + j * 13) % 128).collect();
            format!("{{\"input_ids\": {ids:?}}}\n")
        })
        .collect();
    let p = dir.join("ids.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn train(data: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(lora_bin());
    c.arg("train")
        .arg("--model")
        .arg(fixture("llama_qv/base"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            STEPS,
            "--batch-size",
            "4",
            "--save-every",
            "1",
            "--dropout",
            "0.1",
        ])
        .args([
            "--lr",
            "1e-2",
            "--schedule",
            "cosine",
            "--warmup-steps",
            "3",
            "--seed",
            "7",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if resume {
        c.arg("--resume").arg(out);
    }
    c
}

fn has_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("checkpoint-")
                && e.path().join("trainer_state.json").is_file()
        })
    })
}

fn losses(out: &Path) -> Vec<String> {
    // The step records, as written: step number and loss.
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!(
                "{}:{:.9}",
                v.get("step")?,
                v.get("loss")?.as_f64()?
            ))
        })
        .collect()
}

#[test]
fn sigkilled_training_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path());
    let reference = tmp.path().join("reference");
    assert!(train(&data, &reference, false).status().unwrap().success());

    let out = tmp.path().join("killed");
    let mut kills = 0;
    let started = Instant::now();
    for delay_ms in [150u64, 60, 250, 90, 400, 120, 700, 200, 1000] {
        let resume = has_checkpoint(&out);
        if !resume {
            let _ = std::fs::remove_dir_all(&out); // killed before its first checkpoint
        }
        let mut child = train(&data, &out, resume).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        if out.join("adapter_model.safetensors").is_file() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "bounded");
    }
    if !out.join("adapter_model.safetensors").is_file() {
        let resume = has_checkpoint(&out);
        assert!(train(&data, &out, resume).status().unwrap().success());
    }
    assert!(
        kills >= 2,
        "only {kills} kills landed mid-run; the test proved little"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(reference.join("adapter_model.safetensors")).unwrap(),
        "final adapter differs from the uninterrupted run"
    );
    let (a, b) = (losses(&out), losses(&reference));
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "losses differ step for step");
}
