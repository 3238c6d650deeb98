//! `lora combine` against PEFT's `add_weighted_adapter` (fixtures in tests/fixtures/combine,
//! made by its make.py) and `lora extract` against exact reconstructions.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lora::algebra::{combine, extract, CombineOptions, ExtractOptions, Method, RankSpec};
use lora::merge::{merge_checkpoint, Direction, MergeOptions};
use lora::tensor_file::{self, SafeFile};
use lora::{Adapter, Checkpoint};

use crate::common::{fixture, lora_bin, max_abs_diff};

const MERGE: MergeOptions = MergeOptions {
    direction: Direction::Merge,
    verify: false,
    force: false,
};

fn load(name: &str) -> Adapter {
    Adapter::load(&fixture(&format!("combine/{name}")), &Device::Cpu).unwrap()
}

fn load_all(p: &Path) -> BTreeMap<String, Tensor> {
    let c = Checkpoint::open(p).unwrap();
    c.names()
        .into_iter()
        .map(|n| (n.clone(), c.tensor(&n, &Device::Cpu).unwrap()))
        .collect()
}

/// Each module's ΔW (in the base weight's layout, scale applied).
fn deltas(a: &Adapter) -> BTreeMap<String, Tensor> {
    a.modules
        .iter()
        .map(|(n, m)| {
            let s = a.scale_for(n).unwrap();
            (
                n.clone(),
                m.delta_weight(s, a.config.fan_in_fan_out).unwrap(),
            )
        })
        .collect()
}

/// Our combination of the fixture adapters, as PEFT's call in make.py.
fn ours(
    names: &[&str],
    weights: &[f64],
    opts: impl FnOnce(&mut CombineOptions),
    method: Method,
) -> Adapter {
    let adapters: Vec<Adapter> = names.iter().map(|n| load(n)).collect();
    let inputs: Vec<(&str, &Adapter)> = names.iter().copied().zip(&adapters).collect();
    let mut o = CombineOptions::new(method, weights.to_vec());
    opts(&mut o);
    combine(&inputs, &o).unwrap().0
}

#[test]
fn combine_linear_cat_svd_merge_to_peft_merged_weights() {
    let peft = SafeFile::open(&fixture("combine/merged.safetensors")).unwrap();
    let cases: [(&str, &[&str], &[f64]); 3] = [
        ("linear", &["a1", "a2"], &[0.7, -0.4]),
        ("cat", &["a1", "a2", "a3"], &[0.7, -0.4, 0.5]),
        ("svd", &["a1", "a2", "a3"], &[0.7, -0.4, 0.5]),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (method, names, weights) in cases {
        let c = ours(names, weights, |_| {}, method.parse().unwrap());
        let out = dir.path().join(method);
        merge_checkpoint(&fixture("llama_qv/base"), &c, &out, MERGE).unwrap();
        let merged = load_all(&out);
        let mut worst = 0f32;
        let mut checked = 0;
        for key in peft.names() {
            let Some(w) = key.strip_prefix(&format!("{method}/")) else {
                continue;
            };
            let d = max_abs_diff(&merged[w], &peft.tensor(&key, &Device::Cpu).unwrap());
            worst = worst.max(d);
            checked += 1;
        }
        eprintln!("{method}: merged max |ours - PEFT| = {worst:.2e} over {checked} weights");
        assert_eq!(checked, 6, "{method}: q, v, o of two layers");
        assert!(worst <= 1e-4, "{method}: {worst}");
    }
}

#[test]
fn combine_every_fixture_method_gives_peft_updates_and_config() {
    type Case<'a> = (
        &'a str,
        Method,
        &'a [&'a str],
        &'a [f64],
        Option<usize>,
        Option<f64>,
        bool,
    );
    let three: &[&str] = &["a1", "a2", "a3"];
    let w3: &[f64] = &[0.7, -0.4, 0.5];
    let cases: [Case; 8] = [
        (
            "linear",
            Method::Linear,
            &["a1", "a2"],
            &[0.7, -0.4],
            None,
            None,
            false,
        ),
        ("cat", Method::Cat, three, w3, None, None, false),
        ("svd", Method::Svd, three, w3, None, None, false),
        ("svd_rank6", Method::Svd, three, w3, Some(6), None, false),
        (
            "ties",
            Method::Ties,
            &["a1", "a2"],
            &[0.7, -0.4],
            None,
            Some(0.5),
            false,
        ),
        (
            "ties_frequency",
            Method::Ties,
            &["a1", "a2"],
            &[0.7, 0.3],
            None,
            Some(0.6),
            true,
        ),
        (
            "ties_svd",
            Method::TiesSvd,
            three,
            w3,
            None,
            Some(0.5),
            false,
        ),
        (
            "magnitude_prune",
            Method::MagnitudePrune,
            &["a1", "a2"],
            &[0.7, -0.4],
            None,
            Some(0.3),
            false,
        ),
    ];
    for (dir, method, names, weights, rank, density, freq) in cases {
        let c = ours(
            names,
            weights,
            |o| {
                o.rank = rank;
                o.density = density;
                if freq {
                    o.majority_sign = lora::algebra::SignMethod::Frequency;
                }
            },
            method,
        );
        let p = load(dir);
        let (dc, dp) = (deltas(&c), deltas(&p));
        assert_eq!(dc.keys().collect::<Vec<_>>(), dp.keys().collect::<Vec<_>>());
        let worst = dc
            .iter()
            .map(|(k, t)| max_abs_diff(t, &dp[k]))
            .fold(0f32, f32::max);
        eprintln!("{dir}: ΔW max |ours - PEFT| = {worst:.2e}");
        assert!(worst <= 1e-5, "{dir}: {worst}");
        // PEFT's config: r = lora_alpha = the new rank, the union of the targets.
        assert_eq!(
            (c.config.r, c.config.lora_alpha),
            (p.config.r, p.config.lora_alpha),
            "{dir}"
        );
        let set = |a: &Adapter| match &a.config.target_modules {
            Some(lora::TargetModules::List(l)) => {
                let mut l = l.clone();
                l.sort();
                l
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(set(&c), set(&p), "{dir}");
        // Same per-module shapes as PEFT, except where PEFT zero-pads `cat` to the config rank.
        for (k, m) in &c.modules {
            let pm = &p.modules[k];
            if dir == "cat" && m.rank() != pm.rank() {
                assert!(k.ends_with("o_proj"), "{k}: only o_proj is padded");
                assert_eq!(c.config.rank_for(k), m.rank());
                assert_eq!(c.scale_for(k).unwrap(), 1.0);
            } else {
                assert_eq!(m.a.dims(), pm.a.dims(), "{dir} {k}");
            }
        }
    }
}

/// A module's A factor in an adapter, as f32 values.
fn a_of(a: &Adapter, m: &str) -> Vec<f32> {
    a.modules[m].a.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn dare_prunes_at_random_and_rescales_by_one_over_density() {
    const M: &str = "model.layers.0.self_attn.q_proj";
    let (a1, a2) = (load("a1"), load("a2"));
    let d = 0.5f32;
    // A's weights: sgn(w·s)·√|w·s| with s1 = 2, s2 = 4.
    let wa = [(0.7f32 * 2.0).sqrt(), -(0.4f32 * 4.0).sqrt()];
    let (x1, x2) = (a_of(&a1, M), a_of(&a2, M));
    for method in [Method::DareLinear, Method::DareTies] {
        let run = |seed| {
            ours(
                &["a1", "a2"],
                &[0.7, -0.4],
                |o| {
                    o.density = Some(0.5);
                    o.seed = seed;
                },
                method,
            )
        };
        let c = run(11);
        let got = a_of(&c, M);
        let mut kept = [0usize; 2];
        for i in 0..got.len() {
            // Every outcome of the two Bernoulli draws, through PEFT's formula.
            let p = [x1[i] / d, x2[i] / d];
            let candidates: Vec<([bool; 2], f32)> =
                [[false, false], [true, false], [false, true], [true, true]]
                    .into_iter()
                    .map(|m| {
                        let v = [if m[0] { p[0] } else { 0.0 }, if m[1] { p[1] } else { 0.0 }];
                        let out = match method {
                            Method::DareLinear => wa[0] * v[0] + wa[1] * v[1],
                            _ => {
                                let elected = if v[0] + v[1] >= 0.0 { 1.0 } else { -1.0 };
                                let inc = |x: f32| x != 0.0 && x.signum() == elected;
                                let n = inc(v[0]) as u8 + inc(v[1]) as u8;
                                let s = if inc(v[0]) { wa[0] * v[0] } else { 0.0 }
                                    + if inc(v[1]) { wa[1] * v[1] } else { 0.0 };
                                s / (n.max(1) as f32)
                            }
                        };
                        (m, out)
                    })
                    .collect();
            let hit = candidates
                .iter()
                .find(|(_, v)| (v - got[i]).abs() <= 1e-6 * v.abs().max(1.0))
                .unwrap_or_else(|| panic!("{method} element {i}: {} is no mask outcome", got[i]));
            kept[0] += hit.0[0] as usize;
            kept[1] += hit.0[1] as usize;
        }
        // 256 elements per adapter, Binomial(256, 0.5): sd 8; the seed is fixed, 5 sd allowed.
        for k in kept {
            assert!(
                (k as f64 - 128.0).abs() < 40.0,
                "{method}: kept {kept:?} of 256"
            );
        }
        let again = a_of(&run(11), M);
        assert_eq!(got, again, "{method}: same seed, same masks");
        assert_ne!(
            got,
            a_of(&run(12), M),
            "{method}: another seed, other masks"
        );
    }
}

/// Deterministic values in (-scale, scale).
fn wave(n: usize, k: f32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * k).sin() * scale)
        .collect()
}

#[test]
fn extract_at_full_rank_reproduces_the_merged_llama_and_finds_its_rank() {
    let base = Checkpoint::open(&fixture("llama_qv/base")).unwrap();
    let tuned = Checkpoint::open(&fixture("llama_qv/merged")).unwrap();
    let opts = |rank| ExtractOptions {
        rank,
        target_modules: None,
        strict: true,
    };
    let (a, report) = extract(&base, &tuned, &opts(RankSpec::Fixed(64))).unwrap();
    assert_eq!(
        a.modules.len(),
        4,
        "q_proj and v_proj of two layers changed"
    );
    for m in &report.modules {
        assert_eq!(m.rank, m.full_rank);
        assert!((m.kept_energy - 1.0).abs() < 1e-12);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge_checkpoint(&fixture("llama_qv/base"), &a, &out, MERGE).unwrap();
    let (ours, want) = (load_all(&out), load_all(&fixture("llama_qv/merged")));
    let worst = want
        .iter()
        .map(|(k, t)| max_abs_diff(&ours[k], t))
        .fold(0f32, f32::max);
    eprintln!("extract full rank, merged back: max |ours - tuned| = {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
    // The change is a rank-8 LoRA: nearly all energy sits in 8 components.
    let (a, report) = extract(&base, &tuned, &opts(RankSpec::Energy(0.999_999))).unwrap();
    assert!(
        report.modules.iter().all(|m| m.rank == 8),
        "{:?}",
        report.modules
    );
    assert_eq!((a.config.r, a.config.lora_alpha), (8, 8.0));
    assert_eq!(
        a.config.target_modules,
        Some(lora::TargetModules::List(vec![
            "q_proj".into(),
            "v_proj".into()
        ]))
    );
}

/// Writes `tensors` as `dir/model.safetensors`.
fn write_ckpt(dir: &Path, tensors: &BTreeMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    tensor_file::save(
        &dir.join("model.safetensors"),
        tensors,
        &tensor_file::pt_metadata(),
    )
    .unwrap();
}

#[test]
fn extract_of_a_perturbation_of_every_2d_weight_merges_back_and_reports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let base = load_all(&fixture("llama_qv/base"));
    let mut tuned = base.clone();
    for (i, (k, t)) in base.iter().enumerate() {
        let n = t.elem_count();
        let bump = if t.rank() == 2 || k == "model.norm.weight" {
            Tensor::from_vec(
                wave(n, 0.37 + i as f32 * 0.01, 0.05),
                t.dims(),
                &Device::Cpu,
            )
            .unwrap()
        } else {
            continue;
        };
        tuned.insert(k.clone(), (t + bump).unwrap());
    }
    write_ckpt(&dir.path().join("tuned"), &tuned);
    let (bc, tc) = (
        Checkpoint::open(&fixture("llama_qv/base")).unwrap(),
        Checkpoint::open(&dir.path().join("tuned")).unwrap(),
    );
    let mut opts = ExtractOptions {
        rank: RankSpec::Fixed(1000),
        target_modules: None,
        strict: true,
    };
    let e = extract(&bc, &tc, &opts).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("1-D"), "{e}");
    opts.strict = false;
    let (a, report) = extract(&bc, &tc, &opts).unwrap();
    let two_d = base.values().filter(|t| t.rank() == 2).count();
    assert_eq!(a.modules.len(), two_d);
    assert_eq!(report.left_out.len(), 1);
    assert_eq!(report.left_out[0].tensor, "model.norm.weight");
    assert_eq!(
        a.modules["model.embed_tokens"].kind,
        lora::ModuleKind::Embedding
    );
    let out = dir.path().join("merged");
    merge_checkpoint(&fixture("llama_qv/base"), &a, &out, MERGE).unwrap();
    let merged = load_all(&out);
    let mut worst = 0f32;
    for (k, t) in &tuned {
        if base[k].rank() == 2 {
            worst = worst.max(max_abs_diff(&merged[k], t));
        } else {
            assert_eq!(
                max_abs_diff(&merged[k], &base[k]),
                0.0,
                "{k} is left as in the base"
            );
        }
    }
    eprintln!("extract of all {two_d} 2-D weights at full rank, merged back: {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
}

/// `[rows, cols]` with orthonormal columns, from a QR of deterministic values.
fn orthonormal(rows: usize, cols: usize, k: f64) -> faer::Mat<f64> {
    let m = faer::Mat::from_fn(rows, cols, |i, j| ((i * cols + j + 1) as f64 * k).sin());
    m.qr().compute_thin_Q()
}

#[test]
fn auto_rank_picks_the_smallest_rank_keeping_the_energy_of_a_constructed_spectrum() {
    // D = U·diag(σ)·Vᵀ with σ² = 50, 30, 10, 6, 4 (cumulative 0.5, 0.8, 0.9, 0.96, 1).
    let (rows, cols) = (40, 30);
    let (u, v) = (orthonormal(rows, 5, 0.31), orthonormal(cols, 5, 0.77));
    let s2 = [50.0f64, 30.0, 10.0, 6.0, 4.0];
    let d = faer::Mat::from_fn(rows, cols, |i, j| {
        (0..5)
            .map(|c| u[(i, c)] * s2[c].sqrt() * v[(j, c)])
            .sum::<f64>()
    });
    let vals: Vec<f32> = (0..rows * cols)
        .map(|x| d[(x / cols, x % cols)] as f32)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let zeros = Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap();
    let tuned = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
    write_ckpt(
        &dir.path().join("b"),
        &BTreeMap::from([("layer.weight".to_string(), zeros)]),
    );
    write_ckpt(
        &dir.path().join("t"),
        &BTreeMap::from([("layer.weight".to_string(), tuned)]),
    );
    let (b, t) = (
        Checkpoint::open(&dir.path().join("b")).unwrap(),
        Checkpoint::open(&dir.path().join("t")).unwrap(),
    );
    for (spec, rank, energy) in [
        ("auto:0.45", 1, 0.5),
        ("auto:0.85", 3, 0.9),
        ("auto:0.95", 4, 0.96),
        ("auto:0.99", 5, 1.0),
        ("2", 2, 0.8),
    ] {
        let opts = ExtractOptions {
            rank: spec.parse().unwrap(),
            target_modules: None,
            strict: true,
        };
        let (a, r) = extract(&b, &t, &opts).unwrap();
        let m = &r.modules[0];
        assert_eq!(m.rank, rank, "{spec}");
        assert!(
            (m.kept_energy - energy).abs() < 1e-5,
            "{spec}: {}",
            m.kept_energy
        );
        // B·A is the rank-k truncation U_k·Σ_k·V_kᵀ.
        let ba = a.modules["layer"].delta_weight(1.0, false).unwrap();
        let want: Vec<f32> = (0..rows * cols)
            .map(|x| {
                (0..rank)
                    .map(|c| u[(x / cols, c)] * s2[c].sqrt() * v[(x % cols, c)])
                    .sum::<f64>() as f32
            })
            .collect();
        let want = Tensor::from_vec(want, (rows, cols), &Device::Cpu).unwrap();
        assert!(max_abs_diff(&ba, &want) < 1e-5, "{spec}");
    }
}

#[test]
fn cli_combine_and_extract_write_adapters_and_refuse_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("svd");
    let f = |n: &str| fixture(&format!("combine/{n}"));
    let o = Command::new(lora_bin())
        .args([
            "combine",
            "--method",
            "svd",
            "--weights",
            "0.7,-0.4,0.5",
            "--adapter",
        ])
        .arg(f("a1"))
        .arg("--adapter")
        .arg(f("a2"))
        .arg("--adapter")
        .arg(f("a3"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = Adapter::load(&out, &Device::Cpu).unwrap();
    let p = load("svd");
    for (k, t) in deltas(&c) {
        assert!(max_abs_diff(&t, &deltas(&p)[&k]) < 1e-5, "{k}");
    }
    // Unequal ranks for linear: one line, exit 1, no output.
    let bad = dir.path().join("bad");
    let o = Command::new(lora_bin())
        .args([
            "combine",
            "--method",
            "linear",
            "--weights",
            "1,1",
            "--adapter",
        ])
        .arg(f("a1"))
        .arg("--adapter")
        .arg(f("a3"))
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("same r"), "{err}");
    assert!(!bad.exists());

    let ex = dir.path().join("extracted");
    let o = Command::new(lora_bin())
        .args([
            "extract",
            "--rank",
            "auto:0.9",
            "--target-modules",
            "q_proj",
            "--base",
        ])
        .arg(fixture("llama_qv/base"))
        .arg("--tuned")
        .arg(fixture("llama_qv/merged"))
        .arg("--out")
        .arg(&ex)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("model.layers.0.self_attn.q_proj") && stdout.contains('%'),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("v_proj.weight`: changed, but not in --target-modules"),
        "{stderr}"
    );
    assert_eq!(Adapter::load(&ex, &Device::Cpu).unwrap().modules.len(), 2);
    // The output may not replace an input, even with --force (on a copy of the fixture).
    let tuned = dir.path().join("tuned");
    std::fs::create_dir(&tuned).unwrap();
    std::fs::copy(
        fixture("llama_qv/merged/model.safetensors"),
        tuned.join("model.safetensors"),
    )
    .unwrap();
    let o = Command::new(lora_bin())
        .args(["extract", "--rank", "4", "--force", "--base"])
        .arg(fixture("llama_qv/base"))
        .arg("--tuned")
        .arg(&tuned)
        .arg("--out")
        .arg(&tuned)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite an input"));
    assert!(tuned.join("model.safetensors").is_file());
}
