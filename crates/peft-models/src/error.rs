//! [`ModelError`]: the typed failures of the backbones and their preprocessing. Raised through peft-core's
//! `Result` (the backbones implement peft-core traits), it travels inside [`peft_core::Error::Method`];
//! [`ModelError::of`] gets it back.

/// Errors raised by peft-models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A model config value this backbone cannot be built with.
    #[error("{model}: config `{field}` = {value}: {reason}")]
    Config {
        /// The backbone.
        model: &'static str,
        /// The config field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// A stored position table whose patch part is not a square grid (DINOv2 interpolation needs one).
    #[error("position_embeddings: {positions} stored patch positions are not a square grid")]
    PositionGrid {
        /// The number of stored patch positions.
        positions: usize,
    },
    /// The tokenizers crate's error.
    #[error("{op}: {source}")]
    Tokenizer {
        /// The tokenizer call.
        op: &'static str,
        /// The tokenizers crate's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `preprocessor_config.json` value this pipeline cannot use.
    #[error("preprocessor config `{field}`: {reason}")]
    Preprocess {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// An image the pipeline cannot process.
    #[error("{op}: {problem}")]
    Image {
        /// The step.
        op: &'static str,
        /// What is wrong.
        problem: ImageProblem,
    },
}

/// What is wrong with an image ([`ModelError::Image`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageProblem {
    /// An image (or a resize target) without pixels.
    Empty {
        /// Height.
        h: usize,
        /// Width.
        w: usize,
    },
    /// A center crop larger than the image.
    CropTooLarge {
        /// Crop height.
        ch: usize,
        /// Crop width.
        cw: usize,
        /// Image height.
        h: usize,
        /// Image width.
        w: usize,
    },
    /// More pixels than the allocation cap.
    TooLarge {
        /// What would be that large (the decoded image, the resize target).
        what: String,
        /// Height.
        h: usize,
        /// Width.
        w: usize,
        /// The cap in pixels.
        cap: usize,
    },
}

impl std::fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageProblem::Empty { h, w } => write!(f, "empty {h}x{w} image"),
            ImageProblem::CropTooLarge { ch, cw, h, w } => {
                write!(f, "center crop {ch}x{cw} larger than the {h}x{w} image")
            }
            ImageProblem::TooLarge { what, h, w, cap } => {
                write!(f, "{what} would be {h}x{w} pixels, more than the {cap}-pixel cap")
            }
        }
    }
}

impl ModelError {
    /// The `ModelError` inside a peft-core error, if there is one.
    pub fn of(e: &peft_core::Error) -> Option<&ModelError> {
        e.method_error::<ModelError>()
    }
}

impl From<ModelError> for peft_core::Error {
    fn from(e: ModelError) -> Self {
        peft_core::Error::method("peft-models", e)
    }
}

/// Returns the error (converted with `Into`) from the current function.
macro_rules! fail {
    ($e:expr) => {
        return Err($crate::error::ModelError::from($e).into())
    };
}
pub(crate) use fail;
