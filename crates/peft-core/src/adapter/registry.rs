//! Registries: which `peft_type`s this build can load ([`ConfigRegistry`]), and the named, ready-to-train methods
//! the bench compares ([`MethodSpec`]: a tuner config plus a learning rate and seed, as plain data).
//!
//! Adding a method to the bench is one line in its crate's `methods()` list: `MethodSpec::new(NAME, config, lr)`.
//! Names are [`MethodName`] constants, and a test in each crate (and one across crates in xtask) checks that no two
//! methods share a name.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::adapter::error::{AdapterError, AdapterResult};
use crate::adapter::tuner::TunerConfig;

/// A config type that can be read from an `adapter_config.json`.
pub trait PeftConfig: TunerConfig + Sized {
    /// Its `peft_type`.
    const PEFT_TYPE: &'static str;
    /// Parses the config, returning it and the keys read but ignored (with the reason).
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] / [`AdapterError::Unsupported`] for values this library cannot honour.
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)>;
}

/// Parses one `peft_type`'s config into a boxed tuner config and the ignored keys.
pub type ConfigParser = fn(&Value) -> AdapterResult<(Box<dyn TunerConfig>, Vec<String>)>;

fn parse_as<C: PeftConfig>(v: &Value) -> AdapterResult<(Box<dyn TunerConfig>, Vec<String>)> {
    let (c, ignored) = C::from_json(v)?;
    Ok((Box::new(c), ignored))
}

/// The config types a loader knows, by `peft_type`. A file of any other type is an error, never loaded as
/// something else.
#[derive(Clone, Default)]
pub struct ConfigRegistry {
    parsers: Vec<(&'static str, ConfigParser)>,
}

impl ConfigRegistry {
    /// A registry with peft-core's own types ([`crate::adapter::DeltaConfig`], [`crate::adapter::BaseTuneConfig`]).
    pub fn new() -> Self {
        ConfigRegistry::default().with::<crate::adapter::DeltaConfig>().with::<crate::adapter::BaseTuneConfig>()
    }

    /// Adds config type `C` (a later registration of the same `peft_type` replaces the earlier one).
    pub fn with<C: PeftConfig>(mut self) -> Self {
        self.register(C::PEFT_TYPE, parse_as::<C>);
        self
    }

    /// Adds a parser for `peft_type`.
    pub fn register(&mut self, peft_type: &'static str, parser: ConfigParser) {
        self.parsers.retain(|(t, _)| *t != peft_type);
        self.parsers.push((peft_type, parser));
    }

    /// The registered types.
    pub fn peft_types(&self) -> Vec<&'static str> {
        self.parsers.iter().map(|(t, _)| *t).collect()
    }

    /// Parses `v` (read from `path`) by its `peft_type`.
    ///
    /// # Errors
    /// [`AdapterError::UnknownPeftType`] for a type not registered; the parser's errors.
    pub fn parse(&self, path: &Path, v: &Value) -> AdapterResult<(Box<dyn TunerConfig>, Vec<String>)> {
        let t = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
        match self.parsers.iter().find(|(p, _)| *p == t) {
            Some((_, parse)) => parse(v),
            None => Err(AdapterError::UnknownPeftType {
                path: path.to_path_buf(),
                peft_type: t.to_string(),
                registered: self.peft_types().iter().map(|s| s.to_string()).collect(),
            }),
        }
    }
}

/// A registry name of a method (`"lora"`, `"dora"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodName(pub &'static str);

impl std::fmt::Display for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A named method as the bench (or any trainer) runs it: the tuner config, the learning rate it is usually
/// trained at, the seed of its initialisation, and how many calibration batches a data-driven init reads.
#[derive(Clone, Debug)]
pub struct MethodSpec {
    /// Registry name.
    pub name: MethodName,
    /// The tuner config (targets, rank, ...).
    pub config: Arc<dyn TunerConfig>,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of the adapter initialisation (trainers set it to the run's seed).
    pub seed: u64,
    /// Calibration batches read by a data-driven init (`None`: all the trainer offers).
    pub calibration_batches: Option<usize>,
}

impl MethodSpec {
    /// `config` registered as `name`, trained at `lr`, seed 0, 32 calibration batches when it needs any.
    pub fn new(name: MethodName, config: impl TunerConfig, lr: f64) -> Self {
        MethodSpec { name, config: Arc::new(config), lr, seed: 0, calibration_batches: Some(32) }
    }

    /// The same method with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        self.config.describe()
    }

    /// A fresh boxed copy of the config.
    pub fn config(&self) -> Box<dyn TunerConfig> {
        self.config.clone_box()
    }
}

/// The first name used twice in `specs`, if any.
pub fn duplicate_name(specs: &[MethodSpec]) -> Option<MethodName> {
    let mut seen = std::collections::HashSet::new();
    specs.iter().map(|s| s.name).find(|n| !seen.insert(*n))
}
