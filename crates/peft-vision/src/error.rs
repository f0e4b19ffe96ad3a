//! The crate's error type: typed failures of VTAB-1k data (missing files, malformed lists, bad labels), of the
//! few-shot classifiers and of VPT configs, and the core errors they wrap.

use std::path::PathBuf;

use peft_core::adapter::AdapterError;

/// Errors of peft-vision.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VisionError {
    /// A tensor, autodiff, model or optimizer error of peft-core (image decoding errors arrive here too).
    #[error(transparent)]
    Core(#[from] peft_core::Error),
    /// An adapter-layer error of peft-core (files, configs, sites).
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A training-loop error (divergence, bad trainer settings).
    #[error(transparent)]
    Train(#[from] peft_core::train::TrainError),
    /// A checkpoint or cache file error of peft-core's IO layer.
    #[error(transparent)]
    File(#[from] peft_core::io::IoError),
    /// A file that could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A dataset folder with neither layout this crate reads.
    #[error("{}: not a VTAB-1k folder: {reason}", root.display())]
    NotADataset {
        /// The folder.
        root: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// A malformed line of an index or list file.
    #[error("{}:{line}: {reason}", file.display())]
    BadLine {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A label at or above the number of classes the dataset declares.
    #[error("{}:{line}: label {label} is out of range for {classes} classes", file.display())]
    LabelOutOfRange {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The label.
        label: usize,
        /// The class count.
        classes: usize,
    },
    /// A split with no examples where some are needed.
    #[error("{what} is empty")]
    Empty {
        /// What is empty.
        what: String,
    },
    /// A few-shot request that the data cannot honour (a class with fewer than `k` examples, `k = 0`).
    #[error("{what}: {reason}")]
    FewShot {
        /// The request.
        what: String,
        /// Why it cannot be met.
        reason: String,
    },
    /// A config or hyper-parameter with an invalid value.
    #[error("{method}: `{field}`: {reason}")]
    Config {
        /// The method or component.
        method: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Features and labels (or keys and queries) that do not fit together.
    #[error("{op}: {reason}")]
    Mismatch {
        /// The operation.
        op: &'static str,
        /// What differs.
        reason: String,
    },
}

/// Result alias of peft-vision.
pub type Result<T> = std::result::Result<T, VisionError>;

impl VisionError {
    /// The `VisionError` inside a peft-core error, if there is one.
    pub fn of(e: &peft_core::Error) -> Option<&VisionError> {
        e.method_error::<VisionError>()
    }

    /// The `VisionError` inside an adapter-layer error, if there is one.
    pub fn of_adapter(e: &AdapterError) -> Option<&VisionError> {
        match e {
            AdapterError::Core(c) => Self::of(c),
            _ => None,
        }
    }

    /// A [`VisionError::Config`].
    pub fn config(method: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        VisionError::Config { method, field, reason: reason.into() }
    }

    /// A [`VisionError::Mismatch`].
    pub fn mismatch(op: &'static str, reason: impl Into<String>) -> Self {
        VisionError::Mismatch { op, reason: reason.into() }
    }
}

impl From<VisionError> for AdapterError {
    fn from(e: VisionError) -> Self {
        match e {
            VisionError::Core(c) => AdapterError::Core(c),
            VisionError::Adapter(a) => a,
            VisionError::Config { method, field, reason } => AdapterError::config(method, field, reason),
            other => AdapterError::Core(other.into()),
        }
    }
}

impl From<VisionError> for peft_core::Error {
    /// peft-core's own errors come back out; the crate's typed errors travel inside [`peft_core::Error::Method`]
    /// (recover them with [`VisionError::of`]).
    fn from(e: VisionError) -> Self {
        match e {
            VisionError::Core(c) => c,
            VisionError::Adapter(AdapterError::Core(c)) => c,
            other => peft_core::Error::method("peft-vision", other),
        }
    }
}
