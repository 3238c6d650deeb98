//! Converting a base-rewriting adapter (PiSSA, OLoRA) into a plain LoRA on the original base:
//! PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`, ported from
//! PEFT 0.21.2 `LoraModel.subtract_mutated_init` (`tuners/lora/model.py`) and the config
//! changes in `PeftModel.save_pretrained` (`peft_model.py`).
//!
//! ```text
//! W = W_res + s·B0·A0 (init)     W_res + s·B·A (trained)     ΔW = s·(B·A − B0·A0)
//!   = s·[B | −B0]·[A ; A0]      → A' = cat(A, A0) [2r, in],  B' = cat(B, −B0) [out, 2r]
//! r' = 2r, α' = 2α (α·√2 with rsLoRA), rank_pattern and alpha_pattern values doubled,
//! init_lora_weights = true        so s' = s and the result works on the original W.
//! ```

use candle_core::Tensor;

use crate::adapter::{Adapter, ModuleAdapter};
use crate::config::{InitLoraWeights, ModuleKind};
use crate::error::{Error, Result};

/// The plain rank-2r LoRA equal to `trained` (on the residual base) minus `initial` (the
/// adapter as initialised, before training), for the original base (see the module doc).
pub fn convert_init(initial: &Adapter, trained: &Adapter) -> Result<Adapter> {
    let cfg = &trained.config;
    if cfg.use_rslora && (!cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty()) {
        return Err(Error::Config(
            "convert-init: rank_pattern or alpha_pattern together with use_rslora is refused \
             (PEFT's rule: the doubled alpha cannot keep every module's scale)"
                .into(),
        ));
    }
    if cfg.use_dora || initial.config.use_dora {
        return Err(Error::State(
            "convert-init refuses DoRA adapters (use_dora: true): ΔW = B·A − B0·A0 would ignore \
             the magnitude vector"
                .into(),
        ));
    }
    let names = |a: &Adapter| a.modules.keys().cloned().collect::<Vec<_>>();
    if names(initial) != names(trained) {
        return Err(Error::Config(format!(
            "convert-init: the initial adapter adapts {:?} but the trained one {:?}",
            names(initial),
            names(trained)
        )));
    }
    let mut modules = std::collections::BTreeMap::new();
    for (name, t) in &trained.modules {
        let i = &initial.modules[name];
        if t.kind != ModuleKind::Linear || i.kind != ModuleKind::Linear {
            return Err(Error::Module {
                module: name.clone(),
                reason: "convert-init supports linear layers only (PiSSA and OLoRA init them)"
                    .into(),
            });
        }
        if t.a.dims() != i.a.dims() || t.b.dims() != i.b.dims() {
            return Err(Error::ShapeMismatch {
                key: name.clone(),
                got: i.a.dims().to_vec(),
                what: format!(
                    "the trained adapter's lora_A {:?} (initial and trained differ)",
                    t.a.dims()
                ),
            });
        }
        let f32 = candle_core::DType::F32;
        let a = Tensor::cat(&[t.a.to_dtype(f32)?, i.a.to_dtype(f32)?], 0)?;
        let b = Tensor::cat(&[t.b.to_dtype(f32)?, i.b.to_dtype(f32)?.neg()?], 1)?;
        modules.insert(
            name.clone(),
            ModuleAdapter {
                kind: ModuleKind::Linear,
                a,
                b,
                magnitude: None,
            },
        );
    }
    let mut config = cfg.clone();
    config.init_lora_weights = InitLoraWeights::Default;
    config.r *= 2;
    config.lora_alpha *= if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
    for v in config.rank_pattern.values_mut() {
        *v *= 2;
    }
    for v in config.alpha_pattern.values_mut() {
        *v *= 2.0;
    }
    Ok(Adapter {
        config,
        modules,
        ..Default::default()
    })
}

/// Folder under a training output holding the adapter as initialised (PEFT's
/// `path_initial_model_for_weight_conversion`).
pub const INITIAL_DIR: &str = "initial_adapter";
/// Folder under a training output holding the residual base `W − s·B0·A0`.
pub const RESIDUAL_DIR: &str = "residual_model";

/// For a base-rewriting init (PiSSA, OLoRA), writes what PEFT's workflow saves besides the
/// trained adapter: `out/initial_adapter/` (the adapter as initialised, its config with
/// `init_lora_weights: true`, as PEFT writes it for conversion) and `out/residual_model/` (the
/// checkpoint at `base` with every adapted weight replaced by `W − s·B0·A0`, the base the trained
/// adapter works on). `initial` is the adapter right after building the model.
pub fn save_initial_and_residual(
    initial: &Adapter,
    base: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    let mut init = initial.clone();
    init.config.init_lora_weights = InitLoraWeights::Default;
    // The residual subtracts s·B0·A0 only (DoRA's magnitude does not rewrite the base).
    let mut plain = init.clone();
    plain.config.use_dora = false;
    plain.modules.values_mut().for_each(|m| m.magnitude = None);
    let opts = crate::merge::MergeOptions {
        direction: crate::merge::Direction::Unmerge,
        verify: false,
        force: true,
    };
    crate::merge::merge_checkpoint(base, &plain, &out.join(RESIDUAL_DIR), opts)?;
    init.save(&out.join(INITIAL_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LoraConfig;
    use candle_core::Device;

    fn adapter(seed: f64, r: usize) -> Adapter {
        let dev = Device::Cpu;
        let mk = |shape: (usize, usize), off: f64| {
            Tensor::arange(0f32, (shape.0 * shape.1) as f32, &dev)
                .unwrap()
                .affine(0.01, off)
                .unwrap()
                .sin()
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        let mut modules = std::collections::BTreeMap::new();
        modules.insert(
            "l".to_string(),
            ModuleAdapter {
                kind: ModuleKind::Linear,
                a: mk((r, 6), seed),
                b: mk((5, r), seed + 1.0),
                magnitude: None,
            },
        );
        let mut config = LoraConfig::new(r, 8.0, &["l"]);
        config.init_lora_weights = InitLoraWeights::Other("pissa".into());
        Adapter {
            config,
            modules,
            ..Default::default()
        }
    }

    #[test]
    fn converted_delta_is_trained_minus_initial() {
        let (init, trained) = (adapter(0.0, 2), adapter(0.3, 2));
        let c = convert_init(&init, &trained).unwrap();
        assert_eq!((c.config.r, c.config.lora_alpha), (4, 16.0));
        assert_eq!(c.config.init_lora_weights, InitLoraWeights::Default);
        let s = trained.scale_for("l").unwrap();
        assert_eq!(c.scale_for("l").unwrap(), s);
        let want = (trained.modules["l"].delta_weight(s, false).unwrap()
            - init.modules["l"].delta_weight(s, false).unwrap())
        .unwrap();
        let got = c.modules["l"].delta_weight(s, false).unwrap();
        assert!(crate::testutil::max_abs_diff(&got, &want) < 1e-6);
        let mut rs = trained.clone();
        rs.config.use_rslora = true;
        rs.config.rank_pattern.insert("l".into(), 2);
        assert!(convert_init(&init, &rs)
            .unwrap_err()
            .to_string()
            .contains("use_rslora"));
    }
}
