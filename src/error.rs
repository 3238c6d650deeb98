//! The library's error type. Every variant names the file, tensor or module involved, so a
//! message read on its own says what went wrong and where.

use std::path::PathBuf;

/// Errors from loading, validating, building, merging and saving LoRA adapters and models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // === Files ===
    /// A file could not be read, written or renamed.
    // The cause is part of the message and deliberately not a `#[source]`, so that printing the
    // error chain (`{:#}`) does not repeat it.
    #[error("{path}: {err}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        err: std::io::Error,
    },
    /// A safetensors file is malformed: truncated, bad header, offsets that lie, bad dtype.
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A JSON file (config, index, data) could not be parsed.
    #[error("{path}: invalid JSON: {reason}")]
    BadJson {
        /// The file involved.
        path: PathBuf,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A file format we refuse to read (for example pickled `.bin` weights).
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file involved.
        path: PathBuf,
        /// Why it is refused and what to do instead.
        reason: String,
    },
    /// An output path that must not be written (it is an input, or it exists).
    #[error("{path}: {reason}")]
    BadOutput {
        /// The output path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },

    // === Configuration ===
    /// `adapter_config.json` (or a config built in code) is invalid.
    #[error("invalid LoRA config: {0}")]
    Config(String),
    /// A regular expression in the config does not compile.
    #[error("invalid LoRA config: {field} regex `{pattern}`: {reason}")]
    BadRegex {
        /// The config field (`target_modules`, `rank_pattern`, ...).
        field: &'static str,
        /// The pattern as written.
        pattern: String,
        /// The regex engine's message.
        reason: String,
    },
    /// The adapter uses a PEFT feature this library does not implement; refused rather than
    /// applied wrongly.
    #[error("adapter uses `{feature}`, which is not supported yet: {detail}")]
    UnsupportedFeature {
        /// The PEFT feature (`use_dora`, `lora_bias`, ...).
        feature: String,
        /// Which key or value carries it.
        detail: String,
    },

    // === Tensors and modules ===
    /// A tensor that must exist is absent.
    #[error("missing tensor `{key}`{}", in_file(.file))]
    MissingTensor {
        /// The tensor's key.
        key: String,
        /// The file it was looked for in, if any.
        file: Option<PathBuf>,
    },
    /// A tensor has a shape that does not fit the module it belongs to.
    #[error("tensor `{key}`: shape {got:?} does not fit {what}")]
    ShapeMismatch {
        /// The tensor's key or module name.
        key: String,
        /// The shape found.
        got: Vec<usize>,
        /// What it was expected to fit, in words (with the expected shape).
        what: String,
    },
    /// A tensor key that no module of the model uses.
    #[error("tensor `{key}` in {file} does not belong to any module of the base model ({hint})")]
    UnusedTensor {
        /// The unused key.
        key: String,
        /// The file it came from.
        file: PathBuf,
        /// Extra context (e.g. "adapter for another model?").
        hint: String,
    },
    /// A tensor holds NaN or infinite values where finite ones are required.
    #[error("tensor `{key}` has non-finite values ({what})")]
    NonFinite {
        /// The tensor or module involved.
        key: String,
        /// What was being computed.
        what: String,
    },
    /// A module name the operation does not know.
    #[error("module `{module}`: {reason}")]
    Module {
        /// The module's full name.
        module: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer was used in a state that does not allow the operation (training a merged layer).
    #[error("{0}")]
    State(String),

    // === Adapter algebra ===
    /// `lora combine` / `lora extract` refuse their inputs or options (PEFT would refuse them
    /// too, or its result would be wrong).
    #[error("{op}: {reason}")]
    Algebra {
        /// The operation (`combine`, `extract`).
        op: &'static str,
        /// What is wrong, naming the adapter, module, field or option.
        reason: String,
    },

    // === Engine ===
    /// An error from the candle tensor engine.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn in_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!(" in {}", f.display()),
        None => String::new(),
    }
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
