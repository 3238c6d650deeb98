//! Run-time choice of the instruction set the kernels run on.
//!
//! Each kernel has one body, written either as plain element-wise loops (run through
//! [`vectorised`], which compiles them once per target with that target's features enabled, so
//! LLVM vectorises them 16, 8 or 4 lanes wide) or generically over [`pulp::Simd`] (run
//! through [`dispatch`], for the register-tiled products of `skinny` and `tile_mm`). The
//! targets:
//!
//! | [`Isa`] | x86-64 level (pulp token) | f32 lanes | vector registers |
//! |---|---|---|---|
//! | `avx512` | x86-64-v4 (`pulp::x86::V4`: AVX-512 F/BW/CD/DQ/VL) | 16 | 32 |
//! | `avx2` | x86-64-v3 (`pulp::x86::V3`: AVX2, FMA, BMI) | 8 | 16 |
//! | `portable` | none: plain Rust for the build target (`pulp::Scalar128b`) | 4 | 16 |
//!
//! The portable path compiles on every target (on x86-64 the compiler emits the baseline SSE2,
//! on aarch64 NEON). The default is the best target this CPU supports; the environment variable
//! `LORA_ISA=avx512|avx2|portable` picks another (read once; a target the CPU lacks, or an
//! unknown name, falls back to the best one with a warning on stderr), and [`with_isa`] forces
//! one on the calling thread (tests run each kernel under every [`Isa::supported`] target).
//!
//! The choice covers this crate's kernels; the `gemm` crate behind the large matrix products
//! picks its own kernels by CPU detection and is not affected.

use std::cell::Cell;
use std::sync::OnceLock;

/// An instruction-set target of the kernels (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 (x86-64-v4): 16 f32 lanes, 32 registers.
    Avx512,
    /// AVX2 with FMA (x86-64-v3): 8 f32 lanes, 16 registers.
    Avx2,
    /// Plain Rust for the build target (any architecture).
    Portable,
}

thread_local! {
    static FORCED: Cell<Option<Isa>> = const { Cell::new(None) };
}

impl Isa {
    /// Every target, best first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The name used by `LORA_ISA` and in `lora bench --json`: `avx512`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// The target named `s` (as [`Isa::name`] spells it, case-insensitive), if any.
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU runs the target.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => pulp::x86::V4::is_available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => pulp::x86::V3::is_available(),
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The targets this CPU runs, best first (always ends with [`Isa::Portable`]).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best target this CPU runs.
    pub fn best() -> Isa {
        Isa::supported()[0]
    }

    /// The target kernels started on this thread use: the one forced by [`with_isa`], else
    /// `LORA_ISA`'s, else [`Isa::best`].
    pub fn current() -> Isa {
        FORCED.with(Cell::get).unwrap_or_else(default_isa)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `LORA_ISA`'s target when the CPU supports it, else the best one (read once).
fn default_isa() -> Isa {
    static DEFAULT: OnceLock<Isa> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let Ok(want) = std::env::var("LORA_ISA") else {
            return Isa::best();
        };
        match Isa::parse(&want) {
            Some(isa) if isa.is_supported() => isa,
            Some(isa) => {
                eprintln!(
                    "warning: LORA_ISA={} is not supported by this CPU; using {}",
                    isa,
                    Isa::best()
                );
                Isa::best()
            }
            None => {
                eprintln!(
                    "warning: LORA_ISA={want:?} is not one of avx512, avx2, portable; using {}",
                    Isa::best()
                );
                Isa::best()
            }
        }
    })
}

/// Runs `f` with `isa` as [`Isa::current`] on this thread (kernels it starts pass the target
/// on to their worker threads), then restores the previous choice.
///
/// # Panics
/// If the CPU does not support `isa`.
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    assert!(isa.is_supported(), "with_isa: this CPU does not run {isa}");
    struct Restore(Option<Isa>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(isa))));
    f()
}

/// Runs `f` compiled for `isa`: `f` is inlined into a function built with that target's
/// features, so its element-wise loops (over [`super::vecmath::exp1`], divisions, products)
/// are vectorised at that width. Pass the closure as `#[inline(always)] || …`: LLVM may
/// otherwise leave a large closure out of line, compiled for the baseline. A target the CPU
/// lacks runs the portable body.
#[inline(always)]
pub(crate) fn vectorised<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => {
            if let Some(simd) = pulp::x86::V4::try_new() {
                return simd.vectorize(f);
            }
        }
        Isa::Avx2 => {
            if let Some(simd) = pulp::x86::V3::try_new() {
                return simd.vectorize(f);
            }
        }
        Isa::Portable => {}
    }
    let _ = isa;
    f()
}

/// Runs `op` with the [`pulp::Simd`] token of `isa` (`V4`, `V3`, or `Scalar128b` for the
/// portable path and for a target the CPU lacks).
#[inline(always)]
pub(crate) fn dispatch<Op: pulp::WithSimd>(isa: Isa, op: Op) -> Op::Output {
    use pulp::Simd;
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => {
            if let Some(simd) = pulp::x86::V4::try_new() {
                return Simd::vectorize(simd, op);
            }
        }
        Isa::Avx2 => {
            if let Some(simd) = pulp::x86::V3::try_new() {
                return Simd::vectorize(simd, op);
            }
        }
        Isa::Portable => {}
    }
    let _ = isa;
    Simd::vectorize(pulp::Scalar128b, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_is_always_supported() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            assert_eq!(Isa::parse(&isa.name().to_uppercase()), Some(isa));
        }
        assert_eq!(Isa::parse("sse9"), None);
        let s = Isa::supported();
        assert_eq!(s.last(), Some(&Isa::Portable));
        assert_eq!(s[0], Isa::best());
    }

    #[test]
    fn with_isa_forces_this_thread_and_restores() {
        let before = Isa::current();
        with_isa(Isa::Portable, || {
            assert_eq!(Isa::current(), Isa::Portable);
            // Other threads keep the default.
            let other = std::thread::spawn(Isa::current).join().unwrap();
            assert_eq!(other, default_isa());
        });
        assert_eq!(Isa::current(), before);
    }
}
