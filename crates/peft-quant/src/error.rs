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
    /// A size derived from file contents (a shape's element count, a byte count) that does not fit in `usize`.
    #[error("{what}: shape {shape:?} has more elements than this machine can address")]
    Overflow {
        /// What was being sized (a tensor or quant_state name).
        what: String,
        /// The shape.
        shape: Vec<usize>,
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
    /// A quantizer configuration outside the supported range (LQ-LoRA's NF-b quantizer).
    #[error("unsupported quantizer config: {0}")]
    BadConfig(String),
    /// An operation the stored format does not support (saving LQ-LoRA's NF-b storage in bitsandbytes' layout).
    #[error("{what}: not supported for {format}")]
    Unsupported {
        /// The operation.
        what: &'static str,
        /// The format.
        format: String,
    },
    /// A bit width the low-bit quantizer does not support.
    #[error("{op}: {bits} bits: supported are 1, 2, 3 and 4")]
    Bits {
        /// The function that refused it.
        op: &'static str,
        /// The width given.
        bits: u8,
    },
    /// A serialized low-bit weight whose bytes end early or disagree with its header.
    #[error("{what}: {problem}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// What is wrong ("empty", "truncated header", ...).
        problem: &'static str,
    },
    /// A model with no quantized linear site where one is needed.
    #[error("{op}: the model has no quantized linear site")]
    NoQuantizedSite {
        /// The operation.
        op: &'static str,
    },
    /// A site LQ-LoRA cannot initialise (a DoRA adapter, or merged adapters on it).
    #[error("{op}: `{site}`: DoRA adapters and merged sites are not supported")]
    SiteNotSupported {
        /// The operation.
        op: &'static str,
        /// The site's path.
        site: String,
    },
    /// An array that does not have the shape an adapter needs.
    #[error("{what}: {source}")]
    Layout {
        /// The tensor concerned.
        what: &'static str,
        /// ndarray's error.
        #[source]
        source: ndarray::ShapeError,
    },
    /// An adapter-layer error.
    #[error(transparent)]
    Adapter(#[from] peft_core::adapter::AdapterError),
    /// A file-system error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A file-system error on a named file (reading or writing a checkpoint).
    #[error(transparent)]
    File(#[from] peft_core::io::IoError),
    /// A malformed safetensors file.
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// An error from the tensor engine.
    #[error(transparent)]
    Core(#[from] peft_core::Error),
}

/// Result alias for peft-quant.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

impl QuantError {
    /// The `QuantError` inside a peft-core error (raised through a peft-core trait), if there is one.
    pub fn of(e: &peft_core::Error) -> Option<&QuantError> {
        e.method_error::<QuantError>()
    }
}

impl From<QuantError> for peft_core::adapter::AdapterError {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Adapter(a) => a,
            e => peft_core::adapter::AdapterError::Core(e.into()),
        }
    }
}

impl From<QuantError> for peft_core::Error {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Core(e) => e,
            QuantError::NonFinite(what) => peft_core::Error::NonFinite { what },
            QuantError::Adapter(peft_core::adapter::AdapterError::Core(e)) => e,
            other => peft_core::Error::method("peft-quant", other),
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

/// The element count of `shape`, or [`QuantError::Overflow`] (naming `what`) when it does not fit in `usize`: a
/// plain `product()` wraps in release builds, so a hostile shape such as `[2^32, 2^32]` would count as 0.
///
/// # Errors
/// [`QuantError::Overflow`].
pub fn checked_numel(what: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| QuantError::Overflow { what: what.to_string(), shape: shape.to_vec() })
}
