//! The crate's error type: typed failures of sparse deltas (indices, lengths, budgets) and the core errors they
//! wrap.

use peft_core::adapter::AdapterError;

/// Errors of peft-sparse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SparseError {
    /// A tensor, autodiff or optimizer error of peft-core.
    #[error(transparent)]
    Core(#[from] peft_core::Error),
    /// An adapter-layer error of peft-core (files, configs, sites).
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// A flat index at or beyond the tensor's element count.
    #[error("`{tensor}`: index {index} at position {position} is out of range for {numel} elements")]
    IndexOutOfRange {
        /// The tensor the indices address.
        tensor: String,
        /// The offending index.
        index: u64,
        /// Its position in the index list.
        position: usize,
        /// The tensor's element count.
        numel: usize,
    },
    /// Indices that are not strictly increasing (unsorted or repeated).
    #[error("`{tensor}`: indices must be strictly increasing; position {position} holds {index} after {previous}")]
    Unsorted {
        /// The tensor the indices address.
        tensor: String,
        /// The position of the first violation.
        position: usize,
        /// The index there.
        index: u64,
        /// The index before it.
        previous: u64,
    },
    /// A stored index that is not a non-negative integer (a corrupt file).
    #[error("`{tensor}`: stored index {value} at position {position} is not a non-negative integer")]
    BadIndexValue {
        /// The tensor the indices address.
        tensor: String,
        /// The stored value.
        value: f64,
        /// Its position.
        position: usize,
    },
    /// Index and value lists of different lengths.
    #[error("`{tensor}`: {indices} indices but {values} values")]
    LengthMismatch {
        /// The tensor the delta addresses.
        tensor: String,
        /// Number of indices.
        indices: usize,
        /// Number of values.
        values: usize,
    },
    /// Deltas (or a delta and a tensor) for tensors of different shapes.
    #[error("`{tensor}`: shape {expected:?} expected, found {found:?}")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A budget or ratio that cannot be honoured (density outside (0, 1], k above the element count, ...).
    #[error("{method}: `{field}`: {reason}")]
    Config {
        /// The method.
        method: &'static str,
        /// The option.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A MoSA expert-id map entry that is not an expert number (a corrupt file).
    #[error("`{tensor}`: expert id {value} at position {position} is not an integer in 0..{experts}")]
    BadExpertId {
        /// The tensor.
        tensor: String,
        /// The stored value.
        value: f64,
        /// Its position (row-major).
        position: usize,
        /// The number of experts.
        experts: usize,
    },
    /// A merge-state error: unmerging what is not merged, and the like.
    #[error("`{tensor}`: {reason}")]
    State {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of peft-sparse.
pub type SparseResult<T> = std::result::Result<T, SparseError>;

impl SparseError {
    /// The `SparseError` inside a peft-core error, if there is one.
    pub fn of(e: &peft_core::Error) -> Option<&SparseError> {
        e.method_error::<SparseError>()
    }

    /// The `SparseError` inside an adapter-layer error, if there is one.
    pub fn of_adapter(e: &AdapterError) -> Option<&SparseError> {
        match e {
            AdapterError::Core(c) => Self::of(c),
            _ => None,
        }
    }

    /// A [`SparseError::Config`].
    pub fn config(method: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        SparseError::Config { method, field, reason: reason.into() }
    }
}

impl From<SparseError> for AdapterError {
    fn from(e: SparseError) -> Self {
        match e {
            SparseError::Core(c) => AdapterError::Core(c),
            SparseError::Adapter(a) => a,
            SparseError::Config { method, field, reason } => AdapterError::config(method, field, reason),
            other => AdapterError::Core(other.into()),
        }
    }
}

impl From<SparseError> for peft_core::Error {
    /// peft-core's own errors come back out; the crate's typed errors travel inside [`peft_core::Error::Method`]
    /// (recover them with [`SparseError::of`]).
    fn from(e: SparseError) -> Self {
        match e {
            SparseError::Core(c) => c,
            SparseError::Adapter(AdapterError::Core(c)) => c,
            other => peft_core::Error::method("peft-sparse", other),
        }
    }
}
