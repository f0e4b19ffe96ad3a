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
    /// An argument outside its allowed range (a hyper-parameter, a probability, a stride, a tensor value).
    #[error("{op}: `{arg}` = {value}: {rule}")]
    Arg {
        /// The op that failed.
        op: &'static str,
        /// The argument (or the tensor and value) concerned.
        arg: String,
        /// The value given.
        value: String,
        /// What the value must satisfy.
        rule: &'static str,
    },
    /// An index outside the axis it indexes (a gather index, a token id, a class target).
    #[error("{op}: index {index} at position {position:?} is out of range for axis {axis} of size {size}")]
    Index {
        /// The op that failed.
        op: &'static str,
        /// The index given.
        index: i64,
        /// Where it sits in the index tensor.
        position: Vec<usize>,
        /// The indexed axis.
        axis: usize,
        /// The axis' size.
        size: usize,
    },
    /// An input that must not be empty (no tensors to concatenate, no micro-batches, an empty axis).
    #[error("{op}: {what} is empty")]
    Empty {
        /// The op that failed.
        op: &'static str,
        /// What was empty.
        what: &'static str,
    },
    /// Two counts that must agree (names per batch row, weights per tensor, mask entries per token).
    #[error("{op}: {what}: expected {expected}, got {got}")]
    Count {
        /// The op that failed.
        op: &'static str,
        /// What was counted.
        what: &'static str,
        /// The count implied by the other operands.
        expected: usize,
        /// The count given.
        got: usize,
    },
    /// A list that must be a permutation of `0..len` and is not.
    #[error("{op}: {perm:?} is not a permutation of 0..{len}")]
    NotPermutation {
        /// The op that failed.
        op: &'static str,
        /// The list given.
        perm: Vec<usize>,
        /// The length it must permute.
        len: usize,
    },
    /// An operand of the wrong rank.
    #[error("{op}: expected {expected}, got shape {shape:?}")]
    Rank {
        /// The op that failed.
        op: &'static str,
        /// The rank required (e.g. "a matrix", "rank >= 1").
        expected: &'static str,
        /// The shape given.
        shape: Vec<usize>,
    },
    /// An operation the state of an adapter on a site forbids.
    #[error("{op}: `{site}`: adapter `{adapter}` {problem}")]
    AdapterState {
        /// The operation.
        op: &'static str,
        /// The site's path.
        site: String,
        /// The adapter's name.
        adapter: String,
        /// What stands in the way.
        problem: AdapterProblem,
    },
    /// The same parameter (or two parameters of one name) listed twice.
    #[error("{op}: parameter `{name}` is listed twice")]
    DuplicateParam {
        /// The op that failed.
        op: &'static str,
        /// The parameter's name.
        name: String,
    },
    /// An optimizer state dict that does not fit the optimizer.
    #[error("{op}: {problem}")]
    OptimizerState {
        /// The op that failed.
        op: &'static str,
        /// What does not fit.
        problem: StateProblem,
    },
    /// A target/rank/layers pattern that is not a supported regular expression.
    #[error("{op}: pattern `{pattern}` is not a supported regular expression: {source}")]
    Pattern {
        /// Which pattern field.
        op: &'static str,
        /// The pattern.
        pattern: String,
        /// The regex crate's error.
        #[source]
        source: Box<regex::Error>,
    },
    /// A named choice this library does not implement (an activation, a dtype, a merge method).
    #[error("{op}: {what} `{value}` is not supported{}", if expected.is_empty() { String::new() } else { format!(" (expected {expected})") })]
    Unsupported {
        /// The op that failed.
        op: &'static str,
        /// The kind of choice.
        what: &'static str,
        /// The value given.
        value: String,
        /// The accepted values, when there is a fixed set.
        expected: &'static str,
    },
    /// A numerical procedure that cannot proceed on this input (a singular matrix, a zero covariance, a failed
    /// decomposition).
    #[error("{op}: {reason}")]
    Numerical {
        /// The op that failed.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A typed error of a method crate (peft-lora, peft-models, ...) raised where peft-core's traits
    /// (`Tuner`, `Module`, site adapters) return this type; [`Error::method_error`] recovers it.
    #[error("{method}: {source}")]
    Method {
        /// The crate or method that raised it.
        method: &'static str,
        /// The crate's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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

impl Error {
    /// An [`Error::Arg`].
    pub fn arg(op: &'static str, arg: impl Into<String>, value: impl std::fmt::Display, rule: &'static str) -> Self {
        Error::Arg { op, arg: arg.into(), value: value.to_string(), rule }
    }

    /// An [`Error::Method`] wrapping a method crate's error.
    pub fn method(method: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Method { method, source: Box::new(source) }
    }

    /// The method crate's error inside an [`Error::Method`], if it is a `T`.
    pub fn method_error<T: std::error::Error + 'static>(&self) -> Option<&T> {
        match self {
            Error::Method { source, .. } => source.downcast_ref::<T>(),
            _ => None,
        }
    }

    /// Prefixes the site (or tensor) path to errors that do not name one, keeping the variant.
    #[must_use]
    pub fn at(self, path: &str) -> Self {
        match self {
            Error::Numerical { op, reason } => Error::Numerical { op, reason: format!("`{path}`: {reason}") },
            Error::NonFinite { what } => Error::NonFinite { what: format!("{what} of `{path}`") },
            Error::Arg { op, arg, value, rule } => Error::Arg { op, arg: format!("{arg} at `{path}`"), value, rule },
            e => e,
        }
    }
}

/// What stands in the way of an operation on an adapter attached to a site ([`Error::AdapterState`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdapterProblem {
    /// An adapter of that name is attached already.
    Exists,
    /// It is merged already (merge asked twice).
    Merged,
    /// It is not merged (unmerge without merge).
    NotMerged,
    /// Its method has no exact merge (the adapter kind).
    NotMergeable(String),
    /// It has a bias term but the base layer has no bias.
    BiasWithoutBaseBias,
    /// It is merged while a mixed-adapter batch runs.
    MergedInMixedBatch,
    /// It scales its input (IA3-style) and cannot serve a mixed batch (the adapter kind).
    ScalesInput(String),
    /// It (or another adapter) is merged and the operation rewrites the base weight.
    MergedBase,
    /// Cached merge state is missing (e.g. DoRA norms for unmerge).
    NoMergeCache,
}

impl std::fmt::Display for AdapterProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterProblem::Exists => f.write_str("exists already"),
            AdapterProblem::Merged => f.write_str("is merged already"),
            AdapterProblem::NotMerged => f.write_str("is not merged"),
            AdapterProblem::NotMergeable(k) => write!(f, "({k}) cannot be merged exactly"),
            AdapterProblem::BiasWithoutBaseBias => f.write_str("has a bias term but the base layer has no bias"),
            AdapterProblem::MergedInMixedBatch => {
                f.write_str("is merged during a mixed-adapter batch: unmerge it first")
            }
            AdapterProblem::ScalesInput(k) => write!(f, "({k}) scales its input and cannot serve a mixed batch"),
            AdapterProblem::MergedBase => f.write_str("is merged: unmerge the adapters of this site first"),
            AdapterProblem::NoMergeCache => f.write_str("has no cached merge state"),
        }
    }
}

/// What does not fit in an optimizer state dict ([`Error::OptimizerState`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateProblem {
    /// The dict was written by another optimizer kind.
    Kind {
        /// The kind in the dict.
        found: String,
        /// This optimizer's kind.
        expected: String,
    },
    /// A parameter's state lacks a buffer.
    MissingBuffer {
        /// The parameter.
        param: String,
        /// The buffer.
        buffer: String,
    },
    /// A parameter's state has a buffer this optimizer does not keep.
    UnexpectedBuffer {
        /// The parameter.
        param: String,
        /// The buffer.
        buffer: String,
    },
}

impl std::fmt::Display for StateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateProblem::Kind { found, expected } => {
                write!(f, "state dict of a `{found}` optimizer cannot be loaded into `{expected}`")
            }
            StateProblem::MissingBuffer { param, buffer } => write!(f, "state of `{param}` lacks buffer `{buffer}`"),
            StateProblem::UnexpectedBuffer { param, buffer } => {
                write!(f, "state of `{param}` has unexpected buffer `{buffer}`")
            }
        }
    }
}

/// Result alias for peft-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error, PartialEq)]
    #[error("rank {0} is too large")]
    struct MyError(usize);

    #[test]
    fn a_method_crate_error_is_recovered_by_type() {
        let e = Error::method("my-crate", MyError(9));
        assert_eq!(e.method_error::<MyError>(), Some(&MyError(9)));
        assert!(e.method_error::<std::io::Error>().is_none());
        assert_eq!(e.to_string(), "my-crate: rank 9 is too large");
        assert!(std::error::Error::source(&e).is_some());
        assert!(Error::Empty { op: "x", what: "y" }.method_error::<MyError>().is_none());
    }

    #[test]
    fn at_names_the_path_and_keeps_the_variant() {
        let e = Error::Numerical { op: "svd", reason: "did not converge".into() }.at("layer.0.query");
        assert!(matches!(&e, Error::Numerical { reason, .. } if reason == "`layer.0.query`: did not converge"));
        let e = Error::arg("dropout", "p", 1.5, "must lie in [0, 1)");
        assert_eq!(e.to_string(), "dropout: `p` = 1.5: must lie in [0, 1)");
        let s =
            Error::AdapterState { op: "merge", site: "q".into(), adapter: "a".into(), problem: AdapterProblem::Merged };
        assert_eq!(s.to_string(), "merge: `q`: adapter `a` is merged already");
    }
}
