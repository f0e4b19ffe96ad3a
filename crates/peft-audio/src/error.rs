//! [`AudioDataError`]: what can go wrong in this crate, typed. Where a peft-core trait returns
//! [`peft_core::Result`], the error travels as [`peft_core::Error::Method`] (recover it with
//! [`AudioDataError::of`]); where a tuner config returns [`peft_core::adapter::AdapterError`], config errors keep
//! their method and field.

use std::path::PathBuf;

use peft_core::adapter::AdapterError;
use peft_models::audio::AudioError;

/// Errors of the audio datasets, features and the Conformer adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AudioDataError {
    /// A tensor op, autodiff or nn error.
    #[error(transparent)]
    Core(#[from] peft_core::Error),
    /// An adapter-layer error (files, targets, adapter management).
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A checkpoint or config file could not be read (safetensors, config.json).
    #[error(transparent)]
    Checkpoint(#[from] peft_core::io::IoError),
    /// WAV decoding or resampling failed.
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset index file (CSV or list) is malformed.
    #[error("{}:{line}: {reason}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A split that selects no clip, or names a split / group the dataset does not have.
    #[error("split `{split}`: {reason}")]
    Split {
        /// The split asked for.
        split: String,
        /// What is wrong.
        reason: String,
    },
    /// A config or option value out of range.
    #[error("{method} config: `{field}`: {reason}")]
    InvalidConfig {
        /// The method or component.
        method: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, AudioDataError>;

impl AudioDataError {
    /// An [`AudioDataError::InvalidConfig`].
    pub fn config(method: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        AudioDataError::InvalidConfig { method, field, reason: reason.into() }
    }

    /// The crate's error inside a [`peft_core::Error::Method`], if it is one.
    pub fn of(e: &peft_core::Error) -> Option<&AudioDataError> {
        e.method_error::<AudioDataError>()
    }
}

impl From<AudioDataError> for peft_core::Error {
    /// peft-core's own errors come back out; the crate's typed errors travel inside [`peft_core::Error::Method`].
    fn from(e: AudioDataError) -> Self {
        match e {
            AudioDataError::Core(c) => c,
            AudioDataError::Adapter(AdapterError::Core(c)) => c,
            other => peft_core::Error::method("peft-audio", other),
        }
    }
}

impl From<AudioDataError> for AdapterError {
    fn from(e: AudioDataError) -> Self {
        match e {
            AudioDataError::Core(c) => AdapterError::Core(c),
            AudioDataError::Adapter(a) => a,
            AudioDataError::InvalidConfig { method, field, reason } => AdapterError::config(method, field, reason),
            other => AdapterError::Core(peft_core::Error::method("peft-audio", other)),
        }
    }
}

impl From<peft_adapters::AdaptersError> for AudioDataError {
    fn from(e: peft_adapters::AdaptersError) -> Self {
        AudioDataError::Adapter(e.into())
    }
}

impl From<AudioDataError> for peft_adapters::AdaptersError {
    fn from(e: AudioDataError) -> Self {
        peft_adapters::AdaptersError::Adapter(e.into())
    }
}
