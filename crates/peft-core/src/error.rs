//! The core error type: shape and argument errors raised by tensor ops, autodiff and training utilities.

/// Errors raised by tensor ops, autodiff, nn layers and optimizers.
///
/// File-format errors live in [`crate::io::IoError`], which wraps this type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two operands (or an operand and a requested shape) do not fit together.
    #[error("{op}: shape mismatch: lhs {lhs:?}, rhs {rhs:?}")]
    Shape {
        /// The op that failed.
        op: &'static str,
        /// Shape of the first operand.
        lhs: Vec<usize>,
        /// Shape of the second operand (or the requested shape).
        rhs: Vec<usize>,
    },
    /// A stored weight whose shape differs from the one the model needs (loading a checkpoint).
    #[error("{origin}: tensor `{name}`: the model needs shape {expected:?}, the checkpoint has {found:?}")]
    WeightShape {
        /// Where the tensor came from (a file path, or a description of an in-memory source).
        origin: String,
        /// The tensor's name there.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// An axis index beyond the tensor's rank.
    #[error("{op}: axis {axis} out of range for a rank-{rank} tensor")]
    Axis {
        /// The op that failed.
        op: &'static str,
        /// The requested axis.
        axis: usize,
        /// The tensor's rank.
        rank: usize,
    },
    /// An argument that is out of range or inconsistent, with a human-readable reason.
    #[error("{op}: {msg}")]
    Invalid {
        /// The op that failed.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
    /// `backward` was called on a tensor that no trainable tensor reaches.
    #[error("backward: the tensor does not depend on any tensor that requires grad")]
    NoGraph,
    /// A loss, gradient or parameter became NaN or infinite.
    #[error("non-finite {what}")]
    NonFinite {
        /// What was non-finite (e.g. "loss", "gradient of encoder.layer.0.attention.self.query.weight").
        what: String,
    },
    /// A parameter name that does not exist.
    #[error("unknown parameter name `{name}`")]
    UnknownName {
        /// The name asked for.
        name: String,
    },
    /// A file that could not be read or decoded (a tokenizer, an image, a preprocessor config, a weight file read
    /// through a backbone's weight source): its path and the underlying error.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A target pattern that matched no site.
    #[error("no adapter site matched the patterns {patterns:?}")]
    NoTargetMatched {
        /// The patterns that matched nothing.
        patterns: Vec<String>,
    },
}

impl Error {
    /// An [`Error::File`] for `path` from any error (or message).
    pub fn file(
        path: impl Into<std::path::PathBuf>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::File { path: path.into(), source: source.into() }
    }
}

/// Result alias for peft-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns an [`Error::Invalid`] from the current function.
macro_rules! bail {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::error::Error::Invalid { op: $op, msg: format!($($arg)*) })
    };
}
pub(crate) use bail;
