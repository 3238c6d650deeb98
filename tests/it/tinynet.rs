//! PEFT's TinyNet fixture (`tests/fixtures/tinynet_linear`): the model is built here through
//! the library's [`LoraBuilder`], PEFT's adapter is loaded onto it, and the outputs, the merged
//! checkpoint and the saved adapter are compared with what PEFT produced.
//!
//! The fixture was made with torch 2.15, peft 0.21.2 (see its `fixture.json`):
//! `get_peft_model(TinyNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["q","v"],
//! init_lora_weights=False))`, outputs in eval mode, `merge_and_unload()` state dict.

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor, D};
use lora::builder::LoraBuilder;
use lora::tensor_file::SafeFile;
use lora::{Adapter, Checkpoint, LoraConfig, LoraEmbedding, LoraLinear, Mergeable};

use crate::common::{fixture, lora_bin, max_abs_diff};

/// `embed -> 2 × [x += o(softmax(q kᵀ/√16) v); x += down(relu(up x))] -> head`.
struct TinyNet {
    embed: LoraEmbedding,
    blocks: Vec<[LoraLinear; 6]>,
    head: LoraLinear,
}

impl TinyNet {
    fn load(vb: &LoraBuilder) -> lora::Result<Self> {
        let blocks = (0..2)
            .map(|i| {
                let b = vb.pp("blocks").pp(i);
                Ok([
                    b.pp("q").linear(16, 16, true)?,
                    b.pp("k").linear(16, 16, false)?,
                    b.pp("v").linear(16, 16, true)?,
                    b.pp("o").linear(16, 16, true)?,
                    b.pp("up").linear(16, 32, true)?,
                    b.pp("down").linear(32, 16, true)?,
                ])
            })
            .collect::<lora::Result<_>>()?;
        Ok(TinyNet {
            embed: vb.pp("embed").embedding(32, 16)?,
            blocks,
            head: vb.pp("head").linear(16, 10, true)?,
        })
    }

    fn forward(&self, ids: &Tensor) -> lora::Result<Tensor> {
        let mut x = self.embed.forward(ids)?; // [b, t, 16]
        for [q, k, v, o, up, down] in &self.blocks {
            let (q, k, v) = (
                q.forward_t(&x, false)?,
                k.forward_t(&x, false)?,
                v.forward_t(&x, false)?,
            );
            let att = (q.matmul(&k.t()?)? / 4.0)?; // [b, t, t]
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            x = (&x + o.forward_t(&att.matmul(&v)?, false)?)?;
            x = (&x + down.forward_t(&up.forward_t(&x, false)?.relu()?, false)?)?;
        }
        self.head.forward_t(&x, false)
    }

    fn layers_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.blocks
            .iter_mut()
            .flatten()
            .chain(std::iter::once(&mut self.head))
    }
}

fn io() -> (Tensor, BTreeMap<String, Tensor>) {
    let f = SafeFile::open(&fixture("tinynet_linear/io.safetensors")).unwrap();
    let dev = Device::Cpu;
    let ids = f
        .tensor("input_ids", &dev)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let outs = ["base_output", "lora_output", "merged_output"]
        .iter()
        .map(|k| (k.to_string(), f.tensor(k, &dev).unwrap()))
        .collect();
    (ids, outs)
}

fn base_builder() -> LoraBuilder {
    let ckpt = Checkpoint::open(&fixture("tinynet_linear/base.safetensors")).unwrap();
    LoraBuilder::new(ckpt, DType::F32, Device::Cpu)
}

#[test]
fn base_model_reproduces_base_output() {
    let (ids, outs) = io();
    let net = TinyNet::load(&base_builder()).unwrap();
    let d = max_abs_diff(&net.forward(&ids).unwrap(), &outs["base_output"]);
    assert!(d < 1e-4, "base output differs by {d}");
}

#[test]
fn peft_adapter_reproduces_lora_and_merged_outputs() {
    let (ids, outs) = io();
    let adapter = Adapter::load(&fixture("tinynet_linear/adapter"), &Device::Cpu).unwrap();
    let vb = base_builder().with_adapter(adapter).unwrap();
    let mut net = TinyNet::load(&vb).unwrap();
    vb.finish().unwrap();
    assert_eq!(
        vb.adapted_modules(),
        ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"]
    );
    assert_eq!(vb.trainable_vars().len(), 8);

    let unmerged = net.forward(&ids).unwrap();
    let d = max_abs_diff(&unmerged, &outs["lora_output"]);
    assert!(d < 1e-4, "lora output differs from PEFT by {d}");
    assert!(
        max_abs_diff(&unmerged, &outs["base_output"]) > 1e-2,
        "the adapter must matter"
    );

    for l in net.layers_mut() {
        l.merge().unwrap();
    }
    let merged = net.forward(&ids).unwrap();
    let d = max_abs_diff(&merged, &outs["merged_output"]);
    assert!(d < 1e-4, "merged output differs from PEFT by {d}");
    assert!(max_abs_diff(&merged, &unmerged) < 1e-5);

    // The merged weights equal PEFT's merge_and_unload() state dict.
    let peft = SafeFile::open(&fixture("tinynet_linear/merged.safetensors")).unwrap();
    let q0 = peft.tensor("blocks.0.q.weight", &Device::Cpu).unwrap();
    assert!(max_abs_diff(net.blocks[0][0].weight(), &q0) < 1e-5);
}

#[test]
fn merged_checkpoint_from_the_cli_matches_peft() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    let st = Command::new(lora_bin())
        .args(["merge", "--verify", "--base"])
        .arg(fixture("tinynet_linear/base.safetensors"))
        .arg("--adapter")
        .arg(fixture("tinynet_linear/adapter"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(String::from_utf8_lossy(&st.stdout).contains("verify: max"));
    let ours = SafeFile::open(&out).unwrap();
    let peft = SafeFile::open(&fixture("tinynet_linear/merged.safetensors")).unwrap();
    assert_eq!(ours.names(), peft.names());
    assert_eq!(ours.metadata(), peft.metadata());
    for k in peft.names() {
        let d = max_abs_diff(
            &ours.tensor(&k, &Device::Cpu).unwrap(),
            &peft.tensor(&k, &Device::Cpu).unwrap(),
        );
        assert!(d <= 1e-5, "{k}: {d}");
    }
    // Unmerging gives the base back.
    let back = dir.path().join("back.safetensors");
    let st = Command::new(lora_bin())
        .arg("unmerge")
        .arg("--base")
        .arg(&out)
        .arg("--adapter")
        .arg(fixture("tinynet_linear/adapter"))
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let back = SafeFile::open(&back).unwrap();
    let base = SafeFile::open(&fixture("tinynet_linear/base.safetensors")).unwrap();
    for k in base.names() {
        let d = max_abs_diff(
            &back.tensor(&k, &Device::Cpu).unwrap(),
            &base.tensor(&k, &Device::Cpu).unwrap(),
        );
        assert!(d <= 1e-5, "{k}: {d}");
    }
}

#[test]
fn adapter_saved_from_a_built_model_has_peft_layout_and_round_trips() {
    let peft_dir = fixture("tinynet_linear/adapter");
    let mut cfg = LoraConfig::from_file(&peft_dir.join("adapter_config.json")).unwrap();
    cfg.init_lora_weights = lora::InitLoraWeights::Default;
    let vb = base_builder()
        .with_config(cfg)
        .unwrap()
        .with_seed(1)
        .unwrap();
    let _net = TinyNet::load(&vb).unwrap();
    vb.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let saved = vb.adapter().unwrap();
    saved.save(dir.path()).unwrap();

    let ours = SafeFile::open(&dir.path().join("adapter_model.safetensors")).unwrap();
    let peft = SafeFile::open(&peft_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.names(), peft.names(), "same keys");
    assert_eq!(ours.metadata(), peft.metadata(), "{{\"format\": \"pt\"}}");
    for k in peft.names() {
        assert_eq!(
            ours.info(&k).unwrap(),
            peft.info(&k).unwrap(),
            "{k}: dtype and shape"
        );
    }
    let fields = |p: &std::path::Path| -> Vec<String> {
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap();
        v.keys().cloned().collect()
    };
    let mut peft_fields = fields(&peft_dir);
    peft_fields.retain(|f| f != "auto_mapping");
    let mut our_fields = fields(dir.path());
    our_fields.retain(|f| f != "auto_mapping");
    assert_eq!(our_fields, peft_fields, "config fields");

    // Loads back bit-identical, and B = 0 at default init.
    let back = Adapter::load(dir.path(), &Device::Cpu).unwrap();
    for (name, m) in &saved.modules {
        let b = &back.modules[name];
        assert_eq!(
            m.a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            m.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            b.b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
