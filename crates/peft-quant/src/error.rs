//! The error type of peft-quant: bad quantisation arguments and corrupt or inconsistent serialized state.

/// Errors raised by quantisation, dequantisation and the bitsandbytes safetensors layout.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// A blocksize bitsandbytes does not accept.
    #[error("invalid blocksize {0}: bitsandbytes accepts 32, 64, 128, 256, 512, 1024, 2048 or 4096")]
    Blocksize(usize),
    /// An input with no elements.
    #[error("{0}: cannot quantize an empty tensor")]
    Empty(&'static str),
    /// A NaN or infinite input value (the block scale would be meaningless).
    #[error("non-finite value in {0}")]
    NonFinite(String),
    /// Two sizes that must agree do not (tensor lengths, shapes, block counts).
    #[error("{what}: expected {expected}, got {got}")]
    Size {
        /// What was measured.
        what: String,
        /// The size implied by the rest of the state.
        expected: usize,
        /// The size found.
        got: usize,
    },
    /// A required tensor is absent from a checkpoint.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A 4-bit weight without its `quant_state.bitsandbytes__nf4|fp4` entry.
    #[error("`{0}`: no `quant_state.bitsandbytes__nf4` or `__fp4` entry next to the packed weight")]
    MissingQuantState(String),
    /// A quant_state entry that is not the JSON bitsandbytes writes, or that contradicts the tensors.
    #[error("bad quant state `{key}`: {msg}")]
    BadQuantState {
        /// The quant_state key.
        key: String,
        /// What was wrong.
        msg: String,
    },
    /// A tensor stored with an unexpected dtype.
    #[error("`{name}`: dtype {got}, expected {expected}")]
    Dtype {
        /// The tensor name.
        name: String,
        /// The dtype(s) accepted.
        expected: String,
        /// The dtype found.
        got: String,
    },
    /// A file-system error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A malformed safetensors file.
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// An error from the tensor engine.
    #[error(transparent)]
    Core(#[from] peft_core::Error),
}

/// Result alias for peft-quant.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

impl From<QuantError> for peft_core::Error {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Core(e) => e,
            QuantError::NonFinite(what) => peft_core::Error::NonFinite { what },
            other => peft_core::Error::Invalid { op: "quant", msg: other.to_string() },
        }
    }
}

pub(crate) fn size(what: impl Into<String>, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Size { what: what.into(), expected, got })
    }
}
