//! PEFT's `llama_qv` fixture (`tests/fixtures/llama_qv`): a tiny random `LlamaForCausalLM`
//! (vocab 128, hidden 64, 2 layers, 4 heads, 2 KV heads, untied) with a LoRA adapter on q_proj
//! and v_proj (r 8, α 16, `init_lora_weights=False`). Made with torch 2.15, transformers 5.24,
//! peft 0.21.2 (see its `fixture.json`):
//!
//! ```python
//! base_logits   = base(input_ids).logits
//! lora_logits   = PeftModel.from_pretrained(base, "adapter")(input_ids).logits   # eval, unmerged
//! merged_logits = merged(input_ids).logits        # merged = peft.merge_and_unload()
//! loss = peft_model(input_ids, labels=input_ids).loss; loss.backward()   # train_loss, grad.<name>
//! ```
//!
//! Tolerances (float32): logits 1e-4 absolute, loss 1e-5, gradients 1e-4 relative to each
//! tensor's max |value|.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lora::builder::LoraBuilder;
use lora::models::{generate, Cache, CausalLm, Llama, LlamaConfig, Sampler, Sampling};
use lora::tensor_file::SafeFile;
use lora::train::loss::causal_lm_loss;
use lora::{Adapter, Checkpoint};

use crate::common::{fixture, lora_bin, max_abs_diff};

fn dir(rel: &str) -> PathBuf {
    fixture("llama_qv").join(rel)
}

fn io() -> BTreeMap<String, Tensor> {
    let f = SafeFile::open(&dir("io.safetensors")).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.tensor(&n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

fn ids(io: &BTreeMap<String, Tensor>) -> Tensor {
    io["input_ids"].to_dtype(DType::U32).unwrap()
}

/// The base model with the fixture's adapter, built as a caller would: config, checkpoint,
/// builder with the adapter, `Llama::load`.
fn with_adapter() -> Llama {
    let cfg = LlamaConfig::from_dir(&dir("base")).unwrap();
    let adapter = Adapter::load(&dir("adapter"), &Device::Cpu).unwrap();
    let ck = Checkpoint::open(&dir("base")).unwrap();
    let vb = LoraBuilder::new(ck, DType::F32, Device::Cpu)
        .with_adapter(adapter)
        .unwrap();
    Llama::load(&cfg, &vb).unwrap()
}

fn open(rel: &str) -> Llama {
    Llama::open(&dir(rel), None, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn base_logits_match_transformers() {
    let io = io();
    let logits = open("base").forward_t(&ids(&io), false).unwrap();
    let d = max_abs_diff(&logits, &io["base_logits"]);
    println!("base_logits max |diff| = {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn lora_logits_match_peft_unmerged() {
    let io = io();
    let model = with_adapter();
    assert_eq!(
        model.builder().adapted_modules(),
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    );
    let logits = model.forward_t(&ids(&io), false).unwrap();
    let d = max_abs_diff(&logits, &io["lora_logits"]);
    println!("lora_logits max |diff| = {d:.3e}");
    assert!(d < 1e-4, "{d}");
    // The adapter changes the outputs well beyond the tolerance, so the test has teeth.
    assert!(max_abs_diff(&io["lora_logits"], &io["base_logits"]) > 1e-2);
}

#[test]
fn merged_logits_match_peft_both_by_merging_and_from_merged_checkpoint() {
    let io = io();
    let ids = ids(&io);
    let mut model = with_adapter();
    let unmerged = model.forward_t(&ids, false).unwrap();
    model.merge_adapters().unwrap();
    let merged = model.forward_t(&ids, false).unwrap();
    let d1 = max_abs_diff(&merged, &io["merged_logits"]);
    let from_dir = open("merged").forward_t(&ids, false).unwrap();
    let d2 = max_abs_diff(&from_dir, &io["merged_logits"]);
    println!("merged_logits max |diff|: merged layers {d1:.3e}, merged/ checkpoint {d2:.3e}");
    assert!(d1 < 1e-4 && d2 < 1e-4, "{d1} {d2}");
    // Training a merged model is refused; unmerging restores the unmerged outputs.
    assert!(model.forward_t(&ids, true).is_err());
    model.unmerge_adapters().unwrap();
    let d3 = max_abs_diff(&model.forward_t(&ids, false).unwrap(), &unmerged);
    assert!(d3 < 1e-5, "{d3}");
}

#[test]
fn causal_lm_loss_and_gradients_match_peft_training_step() {
    let io = io();
    let ids = ids(&io);
    let model = with_adapter();
    let logits = model.forward_t(&ids, true).unwrap();
    let loss = causal_lm_loss(&logits, &io["input_ids"]).unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    let want = io["train_loss"].to_vec1::<f32>().unwrap()[0];
    println!(
        "train_loss {got} vs {want}: |diff| = {:.3e}",
        (got - want).abs()
    );
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");

    let grads = loss.backward().unwrap();
    let vars = model.named_trainable_vars();
    assert_eq!(vars.len(), 8, "A and B of 4 modules");
    let mut worst = 0f32;
    for (name, var) in &vars {
        // `<module>.lora_A` ↔ `grad.base_model.model.<module>.lora_A.default.weight`.
        let key = format!("grad.base_model.model.{name}.default.weight");
        let want = &io[&key];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = max_abs_diff(g, want) / scale;
        println!("{key}: max |diff| / max |grad| = {rel:.3e} (max |grad| {scale:.3e})");
        worst = worst.max(rel);
        assert!(rel < 1e-4, "{key}: {rel}");
    }
    let grad_keys = io.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grad_keys, vars.len(), "every fixture gradient is checked");
    println!("worst relative gradient difference {worst:.3e}");
}

#[test]
fn half_precision_runs_close_to_the_f32_reference() {
    // bf16 keeps 8 mantissa bits (relative rounding 4e-3 per op), f16 11; the logits here are
    // at most 0.64 in magnitude. Measured: bf16 3.4e-3, f16 5.6e-4.
    let io = io();
    for (dtype, tol) in [(DType::BF16, 2e-2), (DType::F16, 4e-3)] {
        let adapter = Adapter::load(&dir("adapter"), &Device::Cpu).unwrap();
        let model = Llama::open(&dir("base"), Some(adapter.into()), dtype, &Device::Cpu).unwrap();
        let logits = model.forward_t(&ids(&io), false).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let d = max_abs_diff(&logits, &io["lora_logits"]);
        println!("{dtype:?} lora_logits max |diff| = {d:.3e}");
        assert!(d < tol, "{dtype:?}: {d}");
    }
}

#[test]
fn kv_cache_gives_the_full_forward_logits() {
    let io = io();
    let ids = ids(&io);
    let model = with_adapter();
    let full = model.forward_t(&ids, false).unwrap(); // [2, 12, 128]
    let mut cache = Cache::new(&model);
    // A 5-token prefix, then one token at a time.
    let mut parts = vec![model
        .forward_with_cache(&ids.narrow(1, 0, 5).unwrap(), &mut cache)
        .unwrap()];
    for p in 5..12 {
        let step = ids.narrow(1, p, 1).unwrap();
        parts.push(model.forward_with_cache(&step, &mut cache).unwrap());
    }
    assert_eq!(cache.len(), 12);
    let cached = Tensor::cat(&parts, 1).unwrap();
    let d = max_abs_diff(&cached, &full);
    println!("cached vs full forward max |diff| = {d:.3e}");
    assert!(d < 1e-5, "{d}");
    assert!(max_abs_diff(&cached, &io["lora_logits"]) < 1e-4);
}

#[test]
fn greedy_generation_follows_the_argmax_of_the_full_forward() {
    let model = with_adapter();
    let prompt = [1u32, 17, 42];
    let mut sampler = Sampler::new(Sampling::default()).unwrap();
    let mut streamed = Vec::new();
    let out = generate::<lora::Error>(&model, &prompt, 6, &mut sampler, &[], |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(out, streamed);
    assert_eq!(out.len(), 6);
    // Recompute without the cache: each new token is the argmax at the last position.
    let mut seq = prompt.to_vec();
    for &t in &out {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward_t(&ids, false).unwrap();
        let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
        let want = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(t, want);
        seq.push(t);
    }
    // A stop id ends generation before it is emitted.
    let mut sampler = Sampler::new(Sampling::default()).unwrap();
    let first = out.iter().position(|&t| t == out[2]).unwrap();
    let stopped =
        generate::<lora::Error>(&model, &prompt, 6, &mut sampler, &[out[2]], |_| Ok(())).unwrap();
    assert_eq!(stopped, out[..first]);
}

/// A word-level `tokenizer.json` over the fixture's 128 ids: token `i` is the word `w<i>`,
/// decoded joined by spaces.
fn word_tokenizer() -> String {
    let vocab: Vec<String> = (0..128).map(|i| format!("\"w{i}\": {i}")).collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": null, "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        vocab.join(", ")
    )
}

#[test]
fn cli_generate_streams_the_greedy_continuation() {
    // The fixture's model folder plus a tokenizer.json (the fixture ships none).
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(dir("base").join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("tokenizer.json"), word_tokenizer()).unwrap();
    let model = with_adapter();
    let eos = model.config().eos_token_ids();
    let mut sampler = Sampler::new(Sampling::default()).unwrap();
    let want =
        generate::<lora::Error>(&model, &[1, 17, 42], 8, &mut sampler, &eos, |_| Ok(())).unwrap();
    assert!(want.len() >= 2, "{want:?}");
    let want: Vec<String> = want.iter().map(|t| format!("w{t}")).collect();
    let o = run_lora(&[
        "generate",
        "--model",
        s(tmp.path()),
        "--adapter",
        s(&dir("adapter")),
        "--prompt",
        "w1 w17 w42",
        "--max-new-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end(),
        want.join(" ")
    );
}

#[test]
fn only_lora_factors_are_trainable_and_they_snapshot_back_to_the_adapter() {
    let model = with_adapter();
    let saved = Adapter::load(&dir("adapter"), &Device::Cpu).unwrap();
    let snap = model.adapter().unwrap();
    assert_eq!(
        snap.modules.keys().collect::<Vec<_>>(),
        saved.modules.keys().collect::<Vec<_>>()
    );
    for (name, m) in &saved.modules {
        assert_eq!(max_abs_diff(&snap.modules[name].a, &m.a), 0.0);
        assert_eq!(max_abs_diff(&snap.modules[name].b, &m.b), 0.0);
    }
    let n: usize = model.trainable_vars().iter().map(|v| v.elem_count()).sum();
    // q_proj: 8·64 + 64·8, v_proj: 8·64 + 32·8, two layers.
    assert_eq!(n, 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8));
}

fn run_lora(args: &[&str]) -> std::process::Output {
    Command::new(lora_bin()).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_logits_writes_peft_lora_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let ids_arg = format!("{}:input_ids", s(&dir("io.safetensors")));
    let o = run_lora(&[
        "logits",
        "--model",
        s(&dir("base")),
        "--adapter",
        s(&dir("adapter")),
        "--ids",
        &ids_arg,
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = SafeFile::open(&out)
        .unwrap()
        .tensor("logits", &Device::Cpu)
        .unwrap();
    let d = max_abs_diff(&got, &io()["lora_logits"]);
    println!("lora logits (CLI) max |diff| = {d:.3e}");
    assert!(d < 1e-4, "{d}");

    // --merge, and the default key.
    let merged_out = tmp.path().join("merged.safetensors");
    let o = run_lora(&[
        "logits",
        "--model",
        s(&dir("base")),
        "--adapter",
        s(&dir("adapter")),
        "--merge",
        "--ids",
        s(&dir("io.safetensors")),
        "--out",
        s(&merged_out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = SafeFile::open(&merged_out)
        .unwrap()
        .tensor("logits", &Device::Cpu)
        .unwrap();
    let d = max_abs_diff(&got, &io()["merged_logits"]);
    println!("merged logits (CLI --merge) max |diff| = {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn cli_logits_refuses_bad_ids_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let ids_arg = format!("{}:base_logits", s(&dir("io.safetensors")));
    let o = run_lora(&[
        "logits",
        "--model",
        s(&dir("base")),
        "--ids",
        &ids_arg,
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("base_logits") && err.lines().count() == 1,
        "{err}"
    );
    let missing = format!("{}:nope", s(&dir("io.safetensors")));
    let o = run_lora(&[
        "logits",
        "--model",
        s(&dir("base")),
        "--ids",
        &missing,
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nope"), "{err}");
    assert!(!out.exists());
}

#[test]
fn model_dir_without_config_or_with_unsupported_architecture_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    let out = tmp.path().join("out.safetensors");
    // Through the CLI: one line on stderr, non-zero exit, no output file.
    let cli = || {
        let o = run_lora(&[
            "logits",
            "--model",
            s(tmp.path()),
            "--ids",
            s(&dir("io.safetensors")),
            "--out",
            s(&out),
        ]);
        assert!(!o.status.success());
        assert!(!out.exists());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };

    let e = Llama::open(tmp.path(), None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains(s(&cfg)) && !e.contains('\n'), "{e}");
    let err = cli();
    assert!(err.contains(s(&cfg)), "{err}");
    assert_eq!(err.matches("not found").count(), 1, "{err}");

    let text = std::fs::read_to_string(dir("base/config.json")).unwrap();
    let text = text.replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&cfg, text).unwrap();
    let e = Llama::open(tmp.path(), None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
    assert!(e.contains(s(&cfg)) && !e.contains('\n'), "{e}");
    assert!(cli().contains("GPT2LMHeadModel"));
}

#[test]
fn generate_without_tokenizer_json_names_the_missing_file() {
    let o = run_lora(&["generate", "--model", s(&dir("base")), "--prompt", "hi"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("tokenizer.json"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// Issue 13 items 1 and 4, against PEFT (`tests/fixtures/llama_tied_head/make.py`): a tiny Llama
/// with `tie_word_embeddings` and a config targeting `lm_head` and `q_proj`. PEFT wraps the tied
/// head (base weight: the shared table) and saves `lm_head.base_layer.weight`
/// (`save_embedding_layers="auto"`); logits to 1e-4.
#[test]
fn tied_head_gets_lora_as_peft_and_the_embedding_copy_is_read_and_written() {
    let d = fixture("llama_tied_head");
    let cfg = LlamaConfig::from_dir(&d.join("base")).unwrap();
    assert!(cfg.tie_word_embeddings);
    let adapter = Adapter::load(&d.join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(adapter.base_layers.keys().collect::<Vec<_>>(), ["lm_head"]);
    let vb = LoraBuilder::new(
        Checkpoint::open(&d.join("base")).unwrap(),
        DType::F32,
        Device::Cpu,
    )
    .with_adapter(adapter)
    .unwrap();
    let mut model = Llama::load(&cfg, &vb).unwrap();
    assert!(vb.adapted_modules().contains(&"lm_head".to_string()));
    let io = SafeFile::open(&d.join("io.safetensors")).unwrap();
    let ids = io
        .tensor("input_ids", &Device::Cpu)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let want = io.tensor("lora_logits", &Device::Cpu).unwrap();
    let got = model.forward_t(&ids, false).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "logits vs PEFT: {diff}");
    // What the builder saves has PEFT's keys, the embedding copy included.
    let out = tempfile::tempdir().unwrap();
    vb.adapter().unwrap().save(out.path()).unwrap();
    let ours = SafeFile::open(&out.path().join("adapter_model.safetensors")).unwrap();
    let theirs = SafeFile::open(&d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    assert_eq!(
        ours.bytes("base_model.model.lm_head.base_layer.weight")
            .unwrap(),
        theirs
            .bytes("base_model.model.lm_head.base_layer.weight")
            .unwrap()
    );
    // Merging would change the shared table in PEFT: refused.
    let e = model.merge_adapters().unwrap_err().to_string();
    assert!(e.contains("tied") && e.contains("lm_head"), "{e}");
}

/// Issue 13: `lora inspect` lists the adapter's embedding copy (`lm_head.base_layer.weight`,
/// PEFT's `save_embedding_layers`) with its shape, in the table and in the JSON.
#[test]
fn inspect_lists_the_embedding_copy() {
    let adapter = fixture("llama_tied_head/adapter");
    let o = Command::new(lora_bin())
        .arg("inspect")
        .arg(&adapter)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .skip_while(|l| !l.starts_with("embedding copies"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        line.starts_with("lm_head") && line.contains("[32, 16]") && line.contains("512"),
        "{text}"
    );
    let o = Command::new(lora_bin())
        .arg("inspect")
        .arg(&adapter)
        .arg("--json")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["embedding_copies"]["lm_head"],
        serde_json::json!([32, 16])
    );
}
