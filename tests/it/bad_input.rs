//! Bad input through the CLI: each case must exit non-zero with a one-line error that names the
//! file, tensor or module, and leave no output behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{fixture, lora_bin};

/// A scratch copy of the TinyNet adapter and base that a test may damage.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("adapter");
        std::fs::create_dir(&adapter).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture("tinynet_linear/adapter").join(f), adapter.join(f)).unwrap();
        }
        std::fs::copy(
            fixture("tinynet_linear/base.safetensors"),
            dir.path().join("base.safetensors"),
        )
        .unwrap();
        Scratch { dir }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.path("adapter/adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }
    /// Loads the adapter's tensors, lets `f` change them, and writes them back.
    fn rewrite_adapter(
        &self,
        f: impl FnOnce(&mut std::collections::BTreeMap<String, candle_core::Tensor>),
    ) {
        let p = self.path("adapter/adapter_model.safetensors");
        let file = lora::tensor_file::SafeFile::open(&p).unwrap();
        let mut m = std::collections::BTreeMap::new();
        for k in file.names() {
            m.insert(
                k.clone(),
                file.tensor(&k, &candle_core::Device::Cpu).unwrap(),
            );
        }
        drop(file);
        f(&mut m);
        lora::tensor_file::save(&p, &m, &lora::tensor_file::pt_metadata()).unwrap();
    }

    /// Runs `lora merge` into `out` and returns the error line; asserts failure and no output.
    fn merge_fails(&self, base: &Path, out: &Path) -> String {
        let o = Command::new(lora_bin())
            .arg("merge")
            .arg("--base")
            .arg(base)
            .arg("--adapter")
            .arg(self.path("adapter"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "expected failure, got: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(!out.exists(), "no output may be written on error");
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one-line error, got: {err}");
        assert!(err.starts_with("error: "), "{err}");
        err
    }
    fn merge_default_fails(&self) -> String {
        self.merge_fails(
            &self.path("base.safetensors"),
            &self.path("out.safetensors"),
        )
    }
}

#[test]
fn missing_weights_file_is_named() {
    let s = Scratch::new();
    std::fs::remove_file(s.path("adapter/adapter_model.safetensors")).unwrap();
    let e = s.merge_default_fails();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}

#[test]
fn pickled_bin_adapter_is_refused() {
    let s = Scratch::new();
    std::fs::rename(
        s.path("adapter/adapter_model.safetensors"),
        s.path("adapter/adapter_model.bin"),
    )
    .unwrap();
    let e = s.merge_default_fails();
    assert!(
        e.contains("adapter_model.bin") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let s = Scratch::new();
    let p = s.path("adapter/adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = s.merge_default_fails();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn header_whose_offsets_lie_is_named() {
    let s = Scratch::new();
    let p = s.path("base.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Point the first tensor's end one element further: the offsets no longer tile the data.
    let v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let first = v
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| *k != "__metadata__")
        .unwrap();
    let end = first.1["data_offsets"][1].as_u64().unwrap();
    let lied = header.replacen(&format!(",{end}]"), &format!(",{}]", end + 4), 1);
    assert_ne!(lied, header);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(lied.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    let e = s.merge_default_fails();
    assert!(
        e.contains("base.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn adapter_whose_shapes_do_not_fit_the_base_is_named() {
    let s = Scratch::new();
    // Shrink the base's blocks.0.q.weight to [8, 16]: the adapter's B is [16, 4].
    let base = lora::tensor_file::SafeFile::open(&s.path("base.safetensors")).unwrap();
    let mut m = std::collections::BTreeMap::new();
    for k in base.names() {
        let t = base.tensor(&k, &candle_core::Device::Cpu).unwrap();
        let t = if k == "blocks.0.q.weight" {
            t.narrow(0, 0, 8).unwrap()
        } else {
            t
        };
        m.insert(k, t);
    }
    drop(base);
    let p = s.path("small.safetensors");
    lora::tensor_file::save(&p, &m, &lora::tensor_file::pt_metadata()).unwrap();
    let e = s.merge_fails(&p, &s.path("out.safetensors"));
    assert!(e.contains("blocks.0.q") && e.contains("[8, 16]"), "{e}");
}

#[test]
fn rank_zero_config_is_refused() {
    let s = Scratch::new();
    s.edit_config(|v| v["r"] = 0.into());
    let e = s.merge_default_fails();
    assert!(
        e.contains("adapter_config.json") && e.contains("r must be at least 1"),
        "{e}"
    );
}

#[test]
fn invalid_regex_is_named() {
    let s = Scratch::new();
    s.edit_config(|v| v["target_modules"] = "blocks\\.(q".into());
    let e = s.merge_default_fails();
    assert!(
        e.contains("target_modules") && e.contains("blocks\\.(q"),
        "{e}"
    );
}

#[test]
fn adapter_for_another_model_is_refused() {
    let s = Scratch::new();
    let e = s.merge_fails(&fixture("llama_qv/base"), &s.path("out"));
    assert!(
        e.contains("blocks.0.q") && e.contains("another model"),
        "{e}"
    );
}

#[test]
fn unwritable_output_is_named() {
    let s = Scratch::new();
    let e = s.merge_fails(
        &s.path("base.safetensors"),
        &s.path("no/such/dir/out.safetensors"),
    );
    assert!(e.contains("no/such/dir/out.safetensors"), "{e}");
}

#[test]
fn dora_and_nan_adapters_are_refused_by_name() {
    let s = Scratch::new();
    // DoRA is supported; a DoRA config whose file lacks the magnitudes names the missing key.
    s.edit_config(|v| v["use_dora"] = true.into());
    let e = s.merge_default_fails();
    assert!(e.contains("lora_magnitude_vector"), "{e}");

    let s = Scratch::new();
    let key = "base_model.model.blocks.1.v.lora_B.weight".to_string();
    s.rewrite_adapter(|m| {
        let nan = (m[&key].clone() * f64::NAN).unwrap();
        m.insert(key.clone(), nan);
    });
    let e = s.merge_default_fails();
    assert!(e.contains(&key) && e.contains("non-finite"), "{e}");
}

#[test]
fn output_equal_to_the_base_is_refused_and_base_untouched() {
    let s = Scratch::new();
    let before = std::fs::read(s.path("base.safetensors")).unwrap();
    let o = Command::new(lora_bin())
        .arg("merge")
        .arg("--force")
        .arg("--base")
        .arg(s.path("base.safetensors"))
        .arg("--adapter")
        .arg(s.path("adapter"))
        .arg("--out")
        .arg(s.path("base.safetensors"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("base model"));
    assert_eq!(std::fs::read(s.path("base.safetensors")).unwrap(), before);
}

#[test]
fn empty_adapter_tensors_are_refused_by_name() {
    // The usual symptom of an unsharded ZeRO-3 / FSDP export: size-0 LoRA factors.
    let s = Scratch::new();
    let key = "base_model.model.blocks.0.q.lora_A.weight".to_string();
    s.rewrite_adapter(|m| {
        let empty =
            candle_core::Tensor::zeros((0, 16), candle_core::DType::F32, &candle_core::Device::Cpu);
        m.insert(key.clone(), empty.unwrap());
    });
    let e = s.merge_default_fails();
    assert!(e.contains(&key) && e.contains("empty"), "{e}");
}

#[test]
fn tensors_of_untargeted_modules_are_left_out_with_a_warning_or_refused_with_strict() {
    // Issue 13 item 2: PEFT loads only the modules its config targets, after
    // layers_to_transform; the TinyNet file holds blocks.0 and blocks.1.
    let s = Scratch::new();
    s.edit_config(|v| {
        v["layers_to_transform"] = serde_json::json!([0]);
        v["layers_pattern"] = serde_json::json!("blocks");
    });
    let merge = |strict: bool, out: &str| {
        let mut c = Command::new(lora_bin());
        c.arg("merge")
            .arg("--base")
            .arg(s.path("base.safetensors"))
            .arg("--adapter")
            .arg(s.path("adapter"))
            .arg("--out")
            .arg(s.path(out));
        if strict {
            c.arg("--strict");
        }
        c.output().unwrap()
    };
    let o = merge(true, "strict.safetensors");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !s.path("strict.safetensors").exists());
    assert!(
        err.contains("--strict") && err.contains("blocks.1.q.lora_A.weight"),
        "{err}"
    );
    let o = merge(false, "out.safetensors");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.starts_with("warning: ") && err.contains("blocks.1.v.lora_B.weight"),
        "{err}"
    );
    assert!(!err.contains("blocks.0."), "{err}");
    let base = lora::tensor_file::SafeFile::open(&s.path("base.safetensors")).unwrap();
    let out = lora::tensor_file::SafeFile::open(&s.path("out.safetensors")).unwrap();
    for (k, changed) in [("blocks.0.q.weight", true), ("blocks.1.q.weight", false)] {
        let same = base.bytes(k).unwrap() == out.bytes(k).unwrap();
        assert_eq!(same, !changed, "{k}");
    }
}
