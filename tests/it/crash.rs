//! Crash safety of `lora merge`: killed with SIGKILL at several points, it leaves either no
//! output or a complete, valid one, never touches the base, and the next run clears the
//! killed run's temporary file.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::{Device, Tensor};
use lora::adapter::ModuleAdapter;
use lora::st::{self, SafeFile};
use lora::{Adapter, LoraConfig, ModuleKind};

use crate::common::lora_bin;

/// A base of 8 linear weights [1024, 1024] (32 MiB) and an adapter on all of them.
fn setup(dir: &std::path::Path) {
    let dev = Device::Cpu;
    let mut base = BTreeMap::new();
    let mut modules = BTreeMap::new();
    for i in 0..8 {
        let name = format!("layers.{i}.proj");
        base.insert(
            format!("{name}.weight"),
            Tensor::randn(0f32, 0.02, (1024, 1024), &dev).unwrap(),
        );
        let a = Tensor::randn(0f32, 0.1, (8, 1024), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, (1024, 8), &dev).unwrap();
        modules.insert(
            name,
            ModuleAdapter {
                kind: ModuleKind::Linear,
                a,
                b,
            },
        );
    }
    st::save(&dir.join("base.safetensors"), &base, &st::pt_metadata()).unwrap();
    let adapter = Adapter {
        config: LoraConfig::new(8, 16.0, &["proj"]),
        modules,
        saved: Default::default(),
    };
    adapter.save(&dir.join("adapter")).unwrap();
}

fn merge_cmd(dir: &std::path::Path) -> Command {
    let mut c = Command::new(lora_bin());
    c.arg("merge")
        .arg("--base")
        .arg(dir.join("base.safetensors"))
        .arg("--adapter")
        .arg(dir.join("adapter"))
        .arg("--out")
        .arg(dir.join("merged.safetensors"))
        .arg("--force")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

#[test]
fn sigkilled_merge_leaves_no_partial_output_and_base_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let base_before = std::fs::read(dir.join("base.safetensors")).unwrap();
    let out = dir.join("merged.safetensors");
    let mut killed_mid_run = 0;
    for delay_ms in [5u64, 20, 40, 80, 120, 200] {
        let _ = std::fs::remove_file(&out);
        let mut child = merge_cmd(dir).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        if !finished && !out.exists() {
            killed_mid_run += 1;
        }
        // Either nothing under the output name, or a complete, valid file.
        if out.exists() {
            let f = SafeFile::open(&out).expect("an output that exists must be complete");
            assert_eq!(f.names().len(), 8);
        }
        assert_eq!(
            std::fs::read(dir.join("base.safetensors")).unwrap(),
            base_before,
            "base modified"
        );
    }
    assert!(
        killed_mid_run > 0,
        "no kill landed mid-merge; the test proved nothing"
    );
    // A full run succeeds and removes the temporary files killed runs left behind.
    let st = merge_cmd(dir).status().unwrap();
    assert!(st.success());
    let litter: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(litter.is_empty(), "temporary files left: {litter:?}");
    assert_eq!(SafeFile::open(&out).unwrap().names().len(), 8);
}
