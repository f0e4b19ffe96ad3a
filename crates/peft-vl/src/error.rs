//! [`VlError`]: what can go wrong in this crate, typed. Where a peft-core trait or op returns
//! [`peft_core::Result`], it travels as [`peft_core::Error::Method`] (`method = "peft-vl"`) and comes back with
//! [`VlError::of`].

use std::path::PathBuf;

/// Errors of the COCO reader, the caption metrics and the retrieval heads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VlError {
    /// A tensor op, autodiff or optimizer error.
    #[error(transparent)]
    Core(#[from] peft_core::Error),
    /// A file that could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file (or string) that is not JSON of the expected layout (syntax error, missing field, wrong type).
    #[error("{origin}: not a valid {what} file: {source}")]
    Json {
        /// The file, or a description of an in-memory source.
        origin: String,
        /// The layout expected (`COCO captions`, `COCO instances`, `Karpathy split`).
        what: &'static str,
        /// serde_json's error (line and column).
        #[source]
        source: serde_json::Error,
    },
    /// Well-formed JSON whose content is inconsistent (an annotation naming an image the file does not list, an
    /// id given twice, a negative box size).
    #[error("{origin}: {reason}")]
    Inconsistent {
        /// The file, or a description of an in-memory source.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// A caption-metric input with no reference captions for one candidate.
    #[error("caption metrics: candidate {index} has no reference captions")]
    NoReferences {
        /// The candidate's position.
        index: usize,
    },
    /// An empty input where at least one item is needed (no candidates to score, no images to rank).
    #[error("{what} is empty")]
    Empty {
        /// What was empty.
        what: &'static str,
    },
    /// Two lengths that must agree (captions and their image indices, features and items).
    #[error("{what}: expected {expected}, got {got}")]
    Count {
        /// What was counted.
        what: &'static str,
        /// The expected number.
        expected: usize,
        /// The number given.
        got: usize,
    },
    /// A configuration value outside its allowed range.
    #[error("{what} = {value}: {rule}")]
    InvalidConfig {
        /// The field.
        what: &'static str,
        /// The value given.
        value: String,
        /// What it must satisfy.
        rule: &'static str,
    },
}

impl VlError {
    /// This crate's error inside a [`peft_core::Error::Method`], if it is one.
    pub fn of(e: &peft_core::Error) -> Option<&VlError> {
        e.method_error::<VlError>()
    }
}

impl From<VlError> for peft_core::Error {
    fn from(e: VlError) -> Self {
        match e {
            VlError::Core(e) => e,
            other => peft_core::Error::method("peft-vl", other),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, VlError>;
