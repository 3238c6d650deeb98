//! `lora merge` on model folders: sharded checkpoints, half-precision bases, side files, and the
//! Llama fixture against PEFT's `merge_and_unload()`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lora::merge::{merge_checkpoint, Direction, MergeOptions};
use lora::tensor_file::{self, SafeFile};
use lora::{Adapter, Checkpoint};

use crate::common::{fixture, max_abs_diff};

const MERGE: MergeOptions = MergeOptions {
    direction: Direction::Merge,
    verify: true,
    force: false,
};

fn load_all(p: &Path) -> BTreeMap<String, Tensor> {
    let c = Checkpoint::open(p).unwrap();
    c.names()
        .into_iter()
        .map(|n| (n.clone(), c.tensor(&n, &Device::Cpu).unwrap()))
        .collect()
}

#[test]
fn llama_folder_merge_matches_peft_merge_and_unload() {
    let adapter = Adapter::load(&fixture("llama_qv/adapter"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let r = merge_checkpoint(&fixture("llama_qv/base"), &adapter, &out, MERGE).unwrap();
    assert_eq!(r.modules_merged, 4);
    assert!(r.verify_max_abs_diff.unwrap() < 1e-6);
    let ours = load_all(&out);
    let peft = load_all(&fixture("llama_qv/merged"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    for (k, t) in &peft {
        let d = max_abs_diff(&ours[k], t);
        assert!(d <= 1e-5, "{k}: {d}");
    }
    for f in ["config.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixture("llama_qv/base").join(f)).unwrap()
        );
    }
}

/// Splits the Llama base into two shards with an index, in `dtype`.
fn sharded_base(dir: &Path, dtype: DType) {
    let all = load_all(&fixture("llama_qv/base"));
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (k, t)) in all.into_iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        weight_map.insert(k.clone(), file.into());
        shard.insert(k, t.to_dtype(dtype).unwrap());
    }
    std::fs::create_dir_all(dir).unwrap();
    tensor_file::save(
        &dir.join("model-00001-of-00002.safetensors"),
        &a,
        &tensor_file::pt_metadata(),
    )
    .unwrap();
    tensor_file::save(
        &dir.join("model-00002-of-00002.safetensors"),
        &b,
        &tensor_file::pt_metadata(),
    )
    .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(
        fixture("llama_qv/base/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
}

#[test]
fn sharded_bf16_checkpoint_keeps_shards_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    sharded_base(&base, DType::BF16);
    let adapter = Adapter::load(&fixture("llama_qv/adapter"), &Device::Cpu).unwrap();
    let out = dir.path().join("out");
    let r = merge_checkpoint(&base, &adapter, &out, MERGE).unwrap();
    assert_eq!(r.files.len(), 2);
    // bf16 has 8 bits of mantissa: the written weight is within one rounding step of base + ΔW.
    assert!(
        r.verify_max_abs_diff.unwrap() < 1e-2,
        "{:?}",
        r.verify_max_abs_diff
    );
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let s = SafeFile::open(&out.join(f)).unwrap();
        let orig = SafeFile::open(&base.join(f)).unwrap();
        assert_eq!(s.names(), orig.names(), "{f} keeps its tensors");
        for n in s.names() {
            assert_eq!(s.info(&n).unwrap().0, DType::BF16);
        }
    }
    assert!(
        out.join("model.safetensors.index.json").is_file() && out.join("config.json").is_file()
    );
    // Merged values: close to PEFT's f32 merge, to bf16 precision.
    let ours = load_all(&out);
    let peft = load_all(&fixture("llama_qv/merged"));
    let k = "model.layers.1.self_attn.v_proj.weight";
    let rel = max_abs_diff(&ours[k], &peft[k])
        / peft[k]
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    assert!(rel < 1e-2, "{rel}");
}

#[test]
fn unmerge_inverts_merge_and_existing_output_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = Adapter::load(&fixture("llama_qv/adapter"), &Device::Cpu).unwrap();
    let merged = dir.path().join("merged");
    merge_checkpoint(&fixture("llama_qv/base"), &adapter, &merged, MERGE).unwrap();
    let e = merge_checkpoint(&fixture("llama_qv/base"), &adapter, &merged, MERGE).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    merge_checkpoint(
        &fixture("llama_qv/base"),
        &adapter,
        &merged,
        MergeOptions {
            force: true,
            ..MERGE
        },
    )
    .unwrap();
    let back = dir.path().join("back");
    merge_checkpoint(
        &merged,
        &adapter,
        &back,
        MergeOptions {
            direction: Direction::Unmerge,
            ..MERGE
        },
    )
    .unwrap();
    let base = load_all(&fixture("llama_qv/base"));
    let again = load_all(&back);
    for (k, t) in &base {
        assert!(max_abs_diff(&again[k], t) < 1e-5, "{k}");
    }
}
