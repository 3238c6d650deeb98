//! Adapter algebra: new adapters computed from existing ones or from checkpoints.
//!
//! - [`combine`]: PEFT's `LoraModel.add_weighted_adapter` (`tuners/lora/model.py`) with the
//!   task-merging functions of `utils/merge_utils.py` ([`tasks`]): `linear`, `cat`, `svd`,
//!   `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` and the `*_svd` variants.
//! - [`extract`]: a LoRA from a full fine-tune, by truncated SVD of `tuned − base` per weight.
//!
//! Shapes throughout are PEFT's, seen in the "B·A form" that every layer kind shares:
//! `B: [out, r]` and `A: [r, in…]`, ΔW = s·B·A with A flattened to `[r, in·kh·kw]` for a conv.
//! (An embedding's `lora_embedding_B: [dim, r]`, `lora_embedding_A: [r, vocab]` has ΔW = (s·B·A)ᵀ
//! in the base's `[vocab, dim]` layout, and `fan_in_fan_out` transposes a linear's ΔW; both
//! operations commute with everything done here, so the algebra works on B·A and the layout is
//! left to [`crate::ModuleAdapter::delta_weight`].)
//!
//! The SVDs are faer's (`Mat::thin_svd`, `Mat::qr`), in f64.

pub mod combine;
pub mod extract;
pub mod tasks;

use std::path::Path;

use faer::Mat;

use crate::adapter::Adapter;
use crate::error::{Error, Result};

pub use combine::{combine, CombineOptions, CombineReport, Method, SignMethod};
pub use extract::{extract, ExtractOptions, ExtractReport, RankSpec};

/// A truncated SVD `M ≈ U·diag(σ)·Vᵀ`: `u` is `[rows, k]`, `v` is `[cols, k]`, `s` descending.
pub(crate) struct Svd {
    pub u: Mat<f64>,
    pub s: Vec<f64>,
    pub v: Mat<f64>,
}

/// A row-major `[rows, cols]` slice as a faer matrix.
pub(crate) fn mat_from(data: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j] as f64)
}

/// The thin SVD of `m` (`k = min(rows, cols)` components), from faer.
pub(crate) fn thin_svd(m: faer::MatRef<'_, f64>, what: &str) -> Result<Svd> {
    let svd = m.thin_svd().map_err(|e| Error::Algebra {
        op: "svd",
        reason: format!("{what}: the SVD did not converge ({e:?})"),
    })?;
    Ok(Svd {
        u: svd.U().to_owned(),
        s: svd.S().column_vector().iter().copied().collect(),
        v: svd.V().to_owned(),
    })
}

/// The SVD of a product `P·Q` (`P: [m, R]`, `Q: [R, n]`) without forming the `m × n` matrix
/// when `R ≤ min(m, n)`: with thin QRs `P = Qp·Rp` and `Qᵀ = Qq·Rq`, `P·Q = Qp·(Rp·Rqᵀ)·Qqᵀ`, and
/// the SVD of the small `R × R` core `Rp·Rqᵀ = Uc·Σ·Vcᵀ` gives `U = Qp·Uc`, `V = Qq·Vc`. This is
/// the same decomposition as the SVD of the product (up to the signs of singular-vector pairs),
/// at O((m + n)·R²) instead of O(m·n·min(m, n)). Returns `R` components (or `min(m, n)` when the
/// product is formed).
pub(crate) fn svd_of_product(
    p: faer::MatRef<'_, f64>,
    q: faer::MatRef<'_, f64>,
    what: &str,
) -> Result<Svd> {
    let (m, r) = p.shape();
    let n = q.ncols();
    if r > m.min(n) {
        return thin_svd((p * q).as_ref(), what);
    }
    let qp = p.qr();
    let qq = q.transpose().qr();
    let core = qp.thin_R() * qq.thin_R().transpose();
    let c = thin_svd(core.as_ref(), what)?;
    Ok(Svd {
        u: qp.compute_thin_Q() * &c.u,
        s: c.s,
        v: qq.compute_thin_Q() * &c.v,
    })
}

/// A `rank_pattern` / `alpha_pattern` key that matches exactly `module` under PEFT's
/// `re.match(rf"(.*\.)?({key})$", name)`: the name with regex metacharacters escaped.
pub(crate) fn exact_pattern_key(module: &str) -> String {
    fancy_regex::escape(module).into_owned()
}

/// Writes `adapter` as a PEFT adapter folder at `out`: into a temporary sibling folder, then
/// renamed into place, so an interrupted run leaves nothing under `out`. An existing non-empty
/// `out` is refused unless `force`; `out` may never be one of `inputs` or a folder holding one.
pub fn save_adapter_dir(
    adapter: &Adapter,
    out: &Path,
    force: bool,
    inputs: &[&Path],
    op: &'static str,
) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        // `b` inside `a` too: replacing `a` would delete it.
        (Ok(a), Ok(b)) => b.starts_with(&a),
        _ => false,
    };
    if let Some(i) = inputs.iter().find(|i| same(out, i)) {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: format!(
                "is (or holds) the input {}: refusing to overwrite an input",
                i.display()
            ),
        });
    }
    if out.is_file() {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: "is a file; an adapter is a folder".into(),
        });
    }
    let non_empty = |p: &Path| {
        std::fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    if !force && out.is_dir() && non_empty(out) {
        return Err(Error::BadOutput {
            path: out.into(),
            reason: "already exists (use --force to replace it)".into(),
        });
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let leaf = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| Error::BadOutput {
            path: out.into(),
            reason: format!("has no folder name to write the {op} result to"),
        })?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    crate::tensor_file::remove_stale_temps(parent, &leaf);
    let tmp = parent.join(format!(".{leaf}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    struct Guard<'a>(&'a Path, bool);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
    }
    let mut guard = Guard(&tmp, false);
    adapter.save(&tmp)?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    guard.1 = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
        a * b
    }

    fn max_abs(a: faer::MatRef<'_, f64>, b: faer::MatRef<'_, f64>) -> f64 {
        let mut m = 0f64;
        for i in 0..a.nrows() {
            for j in 0..a.ncols() {
                m = m.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        m
    }

    fn reconstruct(s: &Svd, k: usize) -> Mat<f64> {
        let (m, n) = (s.u.nrows(), s.v.nrows());
        Mat::from_fn(m, n, |i, j| {
            (0..k).map(|c| s.u[(i, c)] * s.s[c] * s.v[(j, c)]).sum()
        })
    }

    #[test]
    fn svd_of_product_equals_svd_of_the_formed_matrix() {
        // Deterministic pseudo-random factors: P [40, 5], Q [5, 30].
        let f = |i: usize, j: usize, k: f64| ((i * 31 + j * 17) as f64 * k).sin();
        let p = Mat::from_fn(40, 5, |i, j| f(i, j, 0.37));
        let q = Mat::from_fn(5, 30, |i, j| f(i, j, 0.91));
        let pq = product(&p, &q);
        let low = svd_of_product(p.as_ref(), q.as_ref(), "t").unwrap();
        let full = thin_svd(pq.as_ref(), "t").unwrap();
        assert_eq!((low.s.len(), full.s.len()), (5, 30));
        for i in 0..5 {
            assert!((low.s[i] - full.s[i]).abs() < 1e-10, "{i}");
        }
        assert!(full.s[5] < 1e-10, "the product has rank 5");
        assert!(max_abs(reconstruct(&low, 5).as_ref(), pq.as_ref()) < 1e-10);
        // Truncations agree too: the rank-3 parts are the same matrix.
        let d = max_abs(
            reconstruct(&low, 3).as_ref(),
            reconstruct(&full, 3).as_ref(),
        );
        assert!(d < 1e-10, "{d}");
    }

    #[test]
    fn exact_pattern_key_matches_only_its_module() {
        let key = exact_pattern_key("model.layers.1.self_attn.q_proj");
        let cfg: crate::LoraConfig =
            serde_json::from_value(serde_json::json!({"rank_pattern": {key: 3}})).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.rank_for("model.layers.1.self_attn.q_proj"), 3);
        assert_eq!(cfg.rank_for("model.layers.11.self_attn.q_proj"), 8);
        assert_eq!(cfg.rank_for("model.layers.1.self_attnXq_proj"), 8);
    }
}
