//! `lora quickstart` end to end (LoRA part; the full fine-tuning comparison is skipped to keep
//! the test short): the shipped base fails task B, the adapter learns it, merging changes
//! nothing, and every promised file is written.

use std::process::Command;

use crate::common::lora_bin;

#[test]
fn quickstart_trains_an_adapter_that_learns_task_b_and_merges_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qs");
    let o = Command::new(lora_bin())
        .arg("quickstart")
        .arg("--skip-full")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let f = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    assert!(f("base_accuracy") <= 0.10, "{r}");
    assert!(f("lora_accuracy") >= 0.90, "{r}");
    assert_eq!(f("merged_accuracy"), f("lora_accuracy"));
    assert!(f("merge_max_abs_diff") <= 1e-4, "{r}");
    assert!(f("trainable_params") / f("total_params") <= 0.02, "{r}");
    for p in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "merged/model.safetensors",
        "merged/config.json",
        "loss_curve.png",
    ] {
        assert!(out.join(p).is_file(), "{p} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
}
