//! `lora serve` end to end: the binary on a free loopback port, a real HTTP client
//! (`reqwest`), concurrent requests for the base and several adapters of the shipped quickstart
//! model. Greedy output must equal what the library's single-sequence `generate` returns for
//! each request alone (token for token, compared as text and token count).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use candle_core::{DType, Device};
use lora::config::InitLoraWeights;
use lora::models::{generate, Llama, LoraInit, Sampler, Sampling};
use lora::{Adapter, LoraConfig};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::common::lora_bin;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/quickstart/base")
}

/// A random adapter (both factors random, as PEFT's `init_lora_weights=False`) of rank `r`
/// on `targets`, saved under `dir`.
fn make_adapter(dir: &Path, r: usize, targets: &[&str]) {
    let mut c = LoraConfig::new(r, 2.0 * r as f64, targets);
    c.init_lora_weights = InitLoraWeights::Random;
    let m = Llama::open(&base(), Some(LoraInit::New(c)), DType::F32, &Device::Cpu).unwrap();
    m.adapter().unwrap().save(dir).unwrap();
}

/// The server process, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[String]) -> Server {
    let mut child = Command::new(lora_bin())
        .arg("serve")
        .arg("--model")
        .arg(base())
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, url }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// POSTs `body`; (status, JSON or `{"text": ...}` for a non-JSON body).
fn post(c: &reqwest::blocking::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "text": text }));
    (status, v)
}

/// What `lora generate` computes for `prompt` alone: greedy, stop at EOS.
fn expected(adapter: Option<&Path>, prompt: &str, max: usize) -> (String, usize) {
    let lora = adapter.map(|d| LoraInit::Adapter(Adapter::load(d, &Device::Cpu).unwrap()));
    let m = Llama::open(&base(), lora, DType::F32, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_file(base().join("tokenizer.json")).unwrap();
    let ids = tok.encode(prompt, true).unwrap().get_ids().to_vec();
    let mut s = Sampler::new(Sampling::default()).unwrap();
    let stop = m.config().eos_token_ids();
    let out = generate::<lora::Error>(&m, &ids, max, &mut s, &stop, |_| Ok(())).unwrap();
    (tok.decode(&out, true).unwrap(), out.len())
}

#[test]
fn serve_mixed_adapters_match_generate_alone_and_errors_keep_it_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let targets: [&[&str]; 3] = [
        &["q_proj", "v_proj"],
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        &["o_proj", "down_proj", "lm_head"],
    ];
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let d = tmp.path().join(format!("a{i}"));
            make_adapter(&d, 2 + 2 * i, targets[i]);
            d
        })
        .collect();
    // Two adapters at start (LRU of 2, so the third evicts one), one loaded at run time.
    let srv = start(&[
        "--adapter".into(),
        format!("a0={}", dirs[0].display()),
        "--adapter".into(),
        format!("a1={}", dirs[1].display()),
        "--max-adapters".into(),
        "2".into(),
    ]);
    let c = client();
    let u = |p: &str| format!("{}{p}", srv.url);

    let models: Value = c.get(u("/v1/models")).send().unwrap().json().unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "a0", "a1"]);

    let (st, v) = post(
        &c,
        &u("/v1/load_lora_adapter"),
        &json!({"lora_name": "a2", "lora_path": dirs[2]}),
    );
    assert_eq!(st, 200, "{v}");

    // Concurrent mixed requests: base and every adapter, different prompts and lengths.
    let prompts = [
        "The cat",
        "Q: what is two?\nA:",
        "hello",
        "Once upon a time",
    ];
    let names = ["base", "a0", "a1", "a2"];
    let mut cases = vec![];
    for (i, p) in prompts.iter().enumerate() {
        for (j, n) in names.iter().enumerate() {
            cases.push((n.to_string(), p.to_string(), 12 + 3 * ((i + j) % 4), j));
        }
    }
    let got: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = cases
            .iter()
            .map(|(n, p, max, _)| {
                let (c, url) = (&c, u("/v1/completions"));
                s.spawn(move || {
                    post(
                        c,
                        &url,
                        &json!({"model": n, "prompt": p, "max_tokens": max, "temperature": 0}),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut differs_from_base = 0;
    for ((n, p, max, j), (st, v)) in cases.iter().zip(&got) {
        assert_eq!(*st, 200, "{n} {p:?}: {v}");
        let adapter = (*j > 0).then(|| dirs[j - 1].as_path());
        let (want, len) = expected(adapter, p, *max);
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, want, "{n} {p:?}");
        assert_eq!(v["usage"]["completion_tokens"], len, "{n} {p:?}");
        if *j > 0 && want != expected(None, p, *max).0 {
            differs_from_base += 1;
        }
    }
    // The adapters change the output, so the comparison tells adapters apart.
    assert!(differs_from_base >= 6, "{differs_from_base}");

    // Token-id prompts and streaming give the same text.
    let tok = Tokenizer::from_file(base().join("tokenizer.json")).unwrap();
    let pids = tok.encode("The cat", true).unwrap().get_ids().to_vec();
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "a1", "prompt": pids, "max_tokens": 15, "temperature": 0}),
    );
    assert_eq!(st, 200);
    let want = expected(Some(&dirs[1]), "The cat", 15).0;
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let sse = c
        .post(u("/v1/completions"))
        .json(
            &json!({"model": "a1", "prompt": "The cat", "max_tokens": 15,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .unwrap()
        .text()
        .unwrap();
    let datas: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{sse}");
    let streamed: String = datas[..datas.len() - 1]
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(streamed, want);

    // A stop string ends the text before it.
    if let Some(cut) = want.char_indices().nth(3).map(|(i, _)| i) {
        let stop = &want[cut..];
        let stop: String = stop.chars().take(2).collect();
        let (_, v) = post(
            &c,
            &u("/v1/completions"),
            &json!({"model": "a1", "prompt": "The cat", "max_tokens": 15,
                    "temperature": 0, "stop": [stop]}),
        );
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert!(want.starts_with(t) && !t.contains(&stop), "{t:?} {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // Errors are JSON with their status, and the server keeps serving.
    let err = |st: u16, v: &Value, want: u16| {
        assert_eq!(st, want, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
    };
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "nope", "prompt": "x"}),
    );
    err(st, &v, 404);
    let r = c
        .post(u("/v1/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": \"base\", \"prompt\": ")
        .send()
        .unwrap();
    let st = r.status().as_u16();
    err(st, &r.json().unwrap(), 400);
    let (st, v) = post(&c, &u("/v1/completions"), &json!({"model": "base"}));
    err(st, &v, 400);
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "base", "prompt": [1, 5, 999]}),
    );
    err(st, &v, 400);
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "base", "prompt": "a".repeat(200)}),
    );
    err(st, &v, 413);
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "base", "prompt": "x", "temperature": -1}),
    );
    err(st, &v, 400);
    let (st, v) = post(
        &c,
        &u("/v1/load_lora_adapter"),
        &json!({"lora_name": "bad", "lora_path": tmp.path().join("missing")}),
    );
    err(st, &v, 400);
    let (st, v) = post(
        &c,
        &u("/v1/unload_lora_adapter"),
        &json!({"lora_name": "a0"}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "a0", "prompt": "x"}),
    );
    err(st, &v, 404);
    assert_eq!(c.get(u("/health")).send().unwrap().status().as_u16(), 200);
    let (st, v) = post(
        &c,
        &u("/v1/completions"),
        &json!({"model": "a2", "prompt": "hello", "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(st, 200);
    assert_eq!(
        v["choices"][0]["text"],
        expected(Some(&dirs[2]), "hello", 10).0.as_str()
    );
}

#[test]
fn generate_into_a_closed_pipe_exits_zero_silently() {
    let mut child = Command::new(lora_bin())
        .args(["generate", "--prompt", "The cat", "--max-new-tokens", "40"])
        .arg("--model")
        .arg(base())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the only read end before the model has loaded: every write fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} {err}", out.status);
    assert!(err.is_empty(), "{err}");
}
