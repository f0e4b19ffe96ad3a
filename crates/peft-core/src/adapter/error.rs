//! [`AdapterError`]: failures of the adapter layer (configs, injection, adapter files, adapter management), each
//! naming the adapter, config field, file or tensor concerned.

use std::path::PathBuf;

/// Errors of tuners, [`crate::adapter::PeftModel`] and adapter files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// A tensor op, autodiff or nn error.
    #[error(transparent)]
    Core(#[from] crate::Error),
    /// A checkpoint or config file error.
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    /// An `adapter_config.json` that is not valid JSON (or not an object).
    #[error("{}: {reason}", path.display())]
    Json {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A config field with an invalid or inconsistent value.
    #[error("{method} config: `{field}`: {reason}")]
    InvalidConfig {
        /// The method (`peft_type`).
        method: String,
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A config asks for something this library does not implement; it is refused rather than loaded as
    /// something else.
    #[error("{method}: {what} is not supported: {reason}")]
    Unsupported {
        /// The method (`peft_type`).
        method: String,
        /// The feature asked for (a config key and value).
        what: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A `peft_type` no registered tuner handles.
    #[error("{}: peft_type `{peft_type}` is not handled here (registered: {})", path.display(), registered.join(", "))]
    UnknownPeftType {
        /// The config file.
        path: PathBuf,
        /// The type asked for.
        peft_type: String,
        /// The registered types.
        registered: Vec<String>,
    },
    /// A tensor the adapter needs is absent from its file.
    #[error("{}: tensor `{key}` is missing", file.display())]
    MissingTensor {
        /// The adapter weights file.
        file: PathBuf,
        /// The key looked for.
        key: String,
    },
    /// A tensor whose shape differs from the adapter's.
    #[error("{}: tensor `{key}`: expected shape {expected:?}, found {found:?}", file.display())]
    TensorShape {
        /// The adapter weights file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The shape the adapter needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// An adapter name that does not exist.
    #[error("no adapter named `{name}` (adapters: {})", have.join(", "))]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The existing adapters.
        have: Vec<String>,
    },
    /// An adapter name that is taken.
    #[error("an adapter named `{name}` exists already")]
    AdapterExists {
        /// The name.
        name: String,
    },
    /// An operation the adapter's method does not define (e.g. merging an input-dependent mixture).
    #[error("adapter `{name}` ({method}): {op} is not possible: {reason}")]
    NotSupportedBy {
        /// The adapter.
        name: String,
        /// Its method.
        method: String,
        /// The operation (`"merge"`, ...).
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// A strict load found tensors or config keys that were not applied.
    #[error("{}: strict load refused: {summary}", dir.display())]
    Strict {
        /// The adapter folder.
        dir: PathBuf,
        /// What was not applied.
        summary: String,
    },
}

/// Result alias for the adapter layer.
pub type AdapterResult<T> = std::result::Result<T, AdapterError>;

impl AdapterError {
    /// An [`AdapterError::InvalidConfig`].
    pub fn config(method: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        AdapterError::InvalidConfig { method: method.into(), field: field.into(), reason: reason.into() }
    }
}
