//! [`AdaptersError`]: what can go wrong in this crate, typed. Every variant converts into
//! [`peft_core::adapter::AdapterError`] (what [`peft_core::adapter::TunerConfig::inject`] returns) without losing
//! the field or method it names.

use peft_core::adapter::AdapterError;

/// Errors of the adapter, IA3 and prompt/prefix methods.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdaptersError {
    /// A tensor op, autodiff or nn error.
    #[error(transparent)]
    Core(#[from] peft_core::Error),
    /// An adapter-layer error (files, targets, adapter management).
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A config field with an invalid or inconsistent value.
    #[error("{method} config: `{field}`: {reason}")]
    InvalidConfig {
        /// The method (`peft_type`).
        method: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The model has none of the sites the method needs.
    #[error("{method}: the model has no {what}")]
    NoSites {
        /// The method (`peft_type`).
        method: &'static str,
        /// The sites looked for.
        what: String,
    },
    /// A base tensor the method reads (a LayerNorm to reuse, the word embeddings to initialise from) is absent.
    #[error("{method}: the model has no parameter `{name}` ({why})")]
    MissingBaseParam {
        /// The method (`peft_type`).
        method: &'static str,
        /// The parameter looked for.
        name: String,
        /// What it was needed for.
        why: &'static str,
    },
    /// A config value PEFT accepts but this crate does not implement; refused rather than loaded as something
    /// else.
    #[error("{method}: {what} is not supported: {reason}")]
    Unsupported {
        /// The method (`peft_type`).
        method: &'static str,
        /// The feature asked for.
        what: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, AdaptersError>;

impl AdaptersError {
    /// An [`AdaptersError::InvalidConfig`].
    pub fn config(method: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        AdaptersError::InvalidConfig { method, field, reason: reason.into() }
    }
}

impl From<AdaptersError> for AdapterError {
    fn from(e: AdaptersError) -> Self {
        match e {
            AdaptersError::Core(e) => AdapterError::Core(e),
            AdaptersError::Adapter(e) => e,
            AdaptersError::InvalidConfig { method, field, reason } => AdapterError::config(method, field, reason),
            AdaptersError::Unsupported { method, what, reason } => {
                AdapterError::Unsupported { method: method.into(), what, reason }
            }
            e @ (AdaptersError::NoSites { .. } | AdaptersError::MissingBaseParam { .. }) => {
                AdapterError::config(method_of(&e), "<model>", e.to_string())
            }
        }
    }
}

fn method_of(e: &AdaptersError) -> &'static str {
    match e {
        AdaptersError::InvalidConfig { method, .. }
        | AdaptersError::NoSites { method, .. }
        | AdaptersError::MissingBaseParam { method, .. }
        | AdaptersError::Unsupported { method, .. } => method,
        AdaptersError::Core(_) | AdaptersError::Adapter(_) => "peft-adapters",
    }
}
