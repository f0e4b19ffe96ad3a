//! [`IoError`]: every failure of checkpoint and config IO, carrying the file path and, where one exists, the tensor
//! or key name.

use std::path::{Path, PathBuf};

/// Errors raised while reading or writing checkpoints (safetensors, GGUF) and configs (`config.json`).
///
/// Every variant names the file it concerns; tensor-level variants also name the tensor. Nothing in this module
/// panics on a malformed file: every way a file can be wrong maps to one of these variants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The file does not exist.
    #[error("{}: file not found", path.display())]
    NotFound {
        /// The file asked for.
        path: PathBuf,
    },
    /// An operating-system error while opening, mapping, reading, writing, syncing or renaming.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file ends before the structure it announces (header, tensor data, metadata value) is complete.
    #[error("{}: truncated file: {reason}", path.display())]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// What was cut off.
        reason: String,
    },
    /// The header is structurally wrong: bad magic, wrong field types, invalid UTF-8, absurd sizes.
    #[error("{}: corrupt header: {reason}", path.display())]
    CorruptHeader {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The header lies about where a tensor's bytes are: offsets beyond the data, a byte count that does not
    /// match shape × dtype size, overlapping tensors or holes in the data buffer.
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    HeaderSizeMismatch {
        /// The file concerned.
        path: PathBuf,
        /// The tensor whose extent is wrong (`<data>` when no single tensor is to blame).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A file-format version this reader does not understand.
    #[error("{}: unsupported {format} version {version}", path.display())]
    UnsupportedVersion {
        /// The file concerned.
        path: PathBuf,
        /// The format ("GGUF").
        format: &'static str,
        /// The version found.
        version: u32,
    },
    /// A tensor stored in a dtype that the requested conversion does not support (e.g. `I64` read as f32, or a
    /// GGUF quantisation type without a dequantiser).
    #[error("{}: tensor `{name}` has unsupported dtype {dtype}", path.display())]
    UnsupportedDType {
        /// The file concerned.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The dtype found (as the format spells it).
        dtype: String,
    },
    /// A tensor whose shape differs from the one expected.
    #[error("{}: tensor `{name}`: expected shape {expected:?}, found {found:?}", path.display())]
    ShapeMismatch {
        /// The file concerned.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape the caller needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor the caller needs is not in the file.
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor {
        /// The file concerned.
        path: PathBuf,
        /// The tensor asked for.
        name: String,
    },
    /// A tensor in the file that nothing consumed (strict loading).
    #[error("{}: unknown tensor `{name}`", path.display())]
    UnknownTensor {
        /// The file concerned.
        path: PathBuf,
        /// The tensor in the file.
        name: String,
    },
    /// Checkpoint tensors the model built from the config did not read although they belong to the same family
    /// as tensors it did (more layers in the file than in the config): loading would give a truncated model.
    #[error(
        "{}: {count} tensor(s) of the checkpoint are not used by the model its config describes, e.g. `{first}`: \
         the config ({hint}) describes fewer layers than the file holds",
        path.display()
    )]
    UnusedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// How many tensors were left unread.
        count: usize,
        /// The first of them (sorted by name).
        first: String,
        /// The config value to compare, e.g. `num_hidden_layers = 2`.
        hint: String,
    },
    /// Two tensors with the same name were given to a writer.
    #[error("{}: duplicate tensor name `{name}`", path.display())]
    DuplicateTensor {
        /// The file being written.
        path: PathBuf,
        /// The repeated name.
        name: String,
    },
    /// A metadata key (GGUF) or config field that is required but absent.
    #[error("{}: missing metadata key `{key}`", path.display())]
    MissingKey {
        /// The file concerned.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value of the wrong type (e.g. a GGUF `llama.block_count` stored as a string).
    #[error("{}: metadata key `{key}`: expected {expected}, found {found}", path.display())]
    MetadataType {
        /// The file concerned.
        path: PathBuf,
        /// The key.
        key: String,
        /// The type the caller asked for.
        expected: &'static str,
        /// The type stored.
        found: String,
    },
    /// Invalid JSON, or JSON that does not match the expected schema.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A config whose `model_type` / `architectures` name no architecture peft-rs knows.
    #[error(
        "{}: unknown architecture (model_type {model_type:?}, architectures {architectures:?}); supported: bert, \
         dinov2, whisper, llama",
        path.display()
    )]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `model_type` field, if present.
        model_type: Option<String>,
        /// The `architectures` field (may be empty).
        architectures: Vec<String>,
    },
    /// A config whose values are inconsistent (e.g. `hidden_size` not divisible by `num_attention_heads`).
    #[error("{}: invalid config field `{field}`: {reason}", path.display())]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A core error (shape or argument) raised while building tensors from file contents.
    #[error(transparent)]
    Core(#[from] crate::Error),
}

impl IoError {
    /// Wraps an OS error with the file it concerns, mapping "not found" to [`IoError::NotFound`].
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        if source.kind() == std::io::ErrorKind::NotFound {
            IoError::NotFound { path }
        } else {
            IoError::Io { path, source }
        }
    }

    /// The file this error concerns, if it names one (every variant except [`IoError::Core`]).
    pub fn path(&self) -> Option<&Path> {
        use IoError::*;
        match self {
            NotFound { path }
            | Io { path, .. }
            | Truncated { path, .. }
            | CorruptHeader { path, .. }
            | HeaderSizeMismatch { path, .. }
            | UnsupportedVersion { path, .. }
            | UnsupportedDType { path, .. }
            | ShapeMismatch { path, .. }
            | MissingTensor { path, .. }
            | UnknownTensor { path, .. }
            | UnusedTensors { path, .. }
            | DuplicateTensor { path, .. }
            | MissingKey { path, .. }
            | MetadataType { path, .. }
            | Json { path, .. }
            | UnknownArchitecture { path, .. }
            | InvalidConfig { path, .. } => Some(path),
            Core(_) => None,
        }
    }
}

/// Result alias for the io module.
pub type IoResult<T> = std::result::Result<T, IoError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_maps_not_found_and_keeps_path() {
        let e = IoError::io("/x/y.safetensors", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(matches!(e, IoError::NotFound { .. }));
        assert_eq!(e.path(), Some(Path::new("/x/y.safetensors")));
        let e = IoError::io("/x/y", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(e, IoError::Io { .. }));
        assert!(e.to_string().starts_with("/x/y: "), "{e}");
    }

    #[test]
    fn messages_name_file_and_tensor() {
        let e = IoError::ShapeMismatch {
            path: "m.safetensors".into(),
            name: "w".into(),
            expected: vec![2],
            found: vec![3],
        };
        assert_eq!(e.to_string(), "m.safetensors: tensor `w`: expected shape [2], found [3]");
        let core: IoError = crate::Error::NoGraph.into();
        assert!(core.path().is_none());
    }
}
