//! [`LoraError`]: the typed failures of peft-lora's own code (ranks, config fields, decompositions, weighted
//! merges, routing). Where peft-core's traits (`Tuner`, `LinearAdapter`, `Module`) carry the error, it travels
//! inside [`peft_core::Error::Method`]; [`LoraError::of`] gets it back.

use crate::config::ConfigError;

/// Errors raised by peft-lora.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// A `LoraConfig` value out of range or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An `adapter_config.json` that is not JSON, or whose known fields have the wrong type.
    #[error("adapter_config.json: {0}")]
    Json(#[from] serde_json::Error),
    /// A rank outside `1..=max` for the site's weight (`min(out, in)`, or `in` for EVA).
    #[error("{method}: {}rank {r} must be in 1..={max}", at(site))]
    Rank {
        /// The method.
        method: &'static str,
        /// The site's path (empty when not known).
        site: String,
        /// The rank asked for.
        r: usize,
        /// The largest rank the site allows.
        max: usize,
    },
    /// A method hyper-parameter outside its range.
    #[error("{method}: `{field}` = {value}: {rule}")]
    Field {
        /// The method.
        method: &'static str,
        /// The config field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What it must satisfy.
        rule: &'static str,
    },
    /// A named choice this crate does not know (a merge method, a combination type).
    #[error("{what} `{value}` is not supported (expected {expected})")]
    Unknown {
        /// The kind of choice.
        what: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },
    /// Two features that cannot be used together.
    #[error("{method}: {}{what} cannot be combined with {with}", at(site))]
    Incompatible {
        /// The method.
        method: &'static str,
        /// The site's path (empty when not site-specific).
        site: String,
        /// The feature.
        what: &'static str,
        /// What it cannot be combined with.
        with: &'static str,
    },
    /// A weight or statistic on which the method's decomposition is undefined.
    #[error("{method}: {}{reason}", at(site))]
    Degenerate {
        /// The method.
        method: &'static str,
        /// The site's path (empty when not known).
        site: String,
        /// What is degenerate.
        reason: &'static str,
    },
    /// LoLDU's LU decomposition has a zero pivot among the first `r` (singular weight).
    #[error("loldu: {}pivot {pivot} of the LU decomposition is zero (singular weight)", at(site))]
    ZeroPivot {
        /// The site's path (empty when not known).
        site: String,
        /// The pivot's index.
        pivot: usize,
    },
    /// A tensor that must be a matrix (or a vector) is not.
    #[error("{method}: {what} must be {expected}, got shape {shape:?}")]
    NotMatrix {
        /// The method.
        method: &'static str,
        /// The tensor.
        what: String,
        /// "a matrix" or "a vector".
        expected: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A calibration source that yields no batch.
    #[error("{method}: the calibration data is empty")]
    EmptyCalibration {
        /// The method that needed it.
        method: String,
    },
    /// A site whose base exposes no dense `[out, in]` weight (a quantised base) where gradients of it are needed.
    #[error("`{site}` has no dense [out, in] weight parameter to take gradients of")]
    NoDenseWeight {
        /// The site's path.
        site: String,
    },
    /// Adapters that `add_weighted_adapter` cannot combine.
    #[error("add_weighted_adapter: {problem}")]
    Combine {
        /// What stands in the way.
        problem: CombineProblem,
    },
    /// A routed adapter run without its routing data.
    #[error("{method}: adapter `{adapter}` needs task ids (Ctx::with_task_ids)")]
    NoTaskIds {
        /// The method.
        method: &'static str,
        /// The adapter.
        adapter: String,
    },
    /// A feed-forward block whose projections do not form an FFN MixLoRA can wrap.
    #[error("mixlora: {}", if prefix.is_empty() { "a feed-forward block without projections".to_string() } else { format!("the projections of `{prefix}` do not form an FFN of width {width}") })]
    FfnShape {
        /// The block's path (empty when it has no projections at all).
        prefix: String,
        /// The model width.
        width: usize,
    },
}

/// What stands in the way of a weighted combination ([`LoraError::Combine`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CombineProblem {
    /// The combination needs adapters of equal rank at this site.
    UnequalRanks {
        /// The site.
        site: String,
    },
    /// An adapter using DoRA or `lora_bias`, which have no weighted combination.
    NotCombinable {
        /// The adapter.
        adapter: String,
    },
    /// Two adapters that target different sites.
    DifferentSites {
        /// The first adapter.
        first: String,
        /// The adapter whose sites differ.
        other: String,
    },
    /// Factors whose shapes do not concatenate at this site.
    ShapeMismatch {
        /// The site.
        site: String,
    },
    /// A combination type that needs a density.
    NeedsDensity {
        /// The combination type.
        combination: String,
    },
}

impl std::fmt::Display for CombineProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CombineProblem::UnequalRanks { site } => write!(f, "this combination needs equal ranks at `{site}`"),
            CombineProblem::NotCombinable { adapter } => {
                write!(f, "adapter `{adapter}` (DoRA or lora_bias) cannot be combined")
            }
            CombineProblem::DifferentSites { first, other } => {
                write!(f, "adapters `{first}` and `{other}` target different sites")
            }
            CombineProblem::ShapeMismatch { site } => write!(f, "factor shapes do not concatenate at `{site}`"),
            CombineProblem::NeedsDensity { combination } => write!(f, "`{combination}` needs a density"),
        }
    }
}

fn at(site: &str) -> String {
    if site.is_empty() {
        String::new()
    } else {
        format!("`{site}`: ")
    }
}

impl LoraError {
    /// The `LoraError` inside a peft-core error (raised through a peft-core trait), if there is one.
    pub fn of(e: &peft_core::Error) -> Option<&LoraError> {
        e.method_error::<LoraError>()
    }

    /// The `LoraError` inside an adapter-layer error, if there is one.
    pub fn of_adapter(e: &peft_core::adapter::AdapterError) -> Option<&LoraError> {
        match e {
            peft_core::adapter::AdapterError::Core(c) => Self::of(c),
            _ => None,
        }
    }

    /// The same error, naming the site it happened at (for errors raised before the site was known).
    #[must_use]
    pub fn at_site(self, path: &str) -> Self {
        match self {
            LoraError::Rank { method, r, max, .. } => LoraError::Rank { method, site: path.into(), r, max },
            LoraError::Degenerate { method, reason, .. } => LoraError::Degenerate { method, site: path.into(), reason },
            LoraError::ZeroPivot { pivot, .. } => LoraError::ZeroPivot { site: path.into(), pivot },
            e => e,
        }
    }
}

impl From<LoraError> for peft_core::Error {
    fn from(e: LoraError) -> Self {
        peft_core::Error::method("peft-lora", e)
    }
}

impl From<LoraError> for peft_core::adapter::AdapterError {
    fn from(e: LoraError) -> Self {
        peft_core::adapter::AdapterError::Core(e.into())
    }
}

impl From<ConfigError> for peft_core::Error {
    fn from(e: ConfigError) -> Self {
        LoraError::Config(e).into()
    }
}

/// Returns the error (converted with `Into`) from the current function.
macro_rules! fail {
    ($e:expr) => {
        return Err($crate::error::LoraError::from($e).into())
    };
}
pub(crate) use fail;

/// Prefixes the site path to a peft-lora error inside a peft-core error, and to peft-core's own path-less errors.
pub(crate) fn at_site(e: peft_core::Error, path: &str) -> peft_core::Error {
    match e {
        peft_core::Error::Method { method, source } => match source.downcast::<LoraError>() {
            Ok(l) => peft_core::Error::Method { method, source: Box::new(l.at_site(path)) },
            Err(source) => peft_core::Error::Method { method, source },
        },
        e => e.at(path),
    }
}
