//! `LoraConfig`: PEFT's `adapter_config.json` for LoRA (field names and defaults as `peft.LoraConfig`).

use peft_core::adapter::{ModulePattern, PatternMap, TargetSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// Which bias terms train alongside the adapter (`bias` in PEFT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias trains (the default).
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// Only biases of adapted sites train.
    LoraOnly,
}

/// `init_lora_weights`: `true`, `false`, or a named initialisation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform, B zero (identity at init); `false`: both random (not an identity).
    Bool(bool),
    /// `"gaussian"`, `"pissa"`, `"pissa_niter_N"`, `"olora"` (others are rejected by [`LoraConfig::validate`]).
    Named(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

/// The parsed initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// A Kaiming-uniform(a = √5), B zero.
    Default,
    /// A and B both Kaiming-uniform (`init_lora_weights = false`): the adapter is not an identity.
    Random,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
    /// PiSSA (Meng et al., 2024): principal singular vectors; `niter` = fast randomised SVD (computed exactly here).
    Pissa {
        /// `Some(n)` for `pissa_niter_n` (PEFT's randomised SVD; we use the exact SVD, which it approximates).
        niter: Option<usize>,
    },
    /// OLoRA (Büyükakyüz, 2024): thin QR of the base weight.
    Olora,
}

impl Init {
    /// True for inits that rewrite the base weight (PiSSA, OLoRA).
    pub fn mutates_base(self) -> bool {
        matches!(self, Init::Pissa { .. } | Init::Olora)
    }
}

/// `layers_to_transform`: one index or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrList {
    /// One layer index.
    One(usize),
    /// Several layer indices.
    Many(Vec<usize>),
}

/// `layers_pattern`: one name or a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StrOrList {
    /// One name.
    One(String),
    /// Several names.
    Many(Vec<String>),
}

/// A config value that is out of range or unsupported.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// `r` (or a `rank_pattern` value) is zero or not a positive integer.
    #[error("LoraConfig: rank must be a positive integer, got {what}")]
    BadRank {
        /// The offending value.
        what: String,
    },
    /// `lora_alpha` (or an `alpha_pattern` value) is not a finite number.
    #[error("LoraConfig: alpha must be a finite number, got {what}")]
    BadAlpha {
        /// The offending value.
        what: String,
    },
    /// `lora_dropout` outside `[0, 1)`.
    #[error("LoraConfig: lora_dropout must be in [0, 1), got {0}")]
    BadDropout(f64),
    /// `target_modules` is missing (PEFT falls back to per-architecture defaults; peft-rs needs them explicit).
    #[error("LoraConfig: target_modules is required")]
    NoTargets,
    /// An `init_lora_weights` string peft-rs does not know.
    #[error("LoraConfig: unsupported init_lora_weights {0:?}")]
    BadInit(String),
    /// Combinations PEFT rejects, or features peft-rs does not implement.
    #[error("LoraConfig: {0}")]
    Unsupported(String),
}

fn d_r() -> usize {
    8
}
fn d_alpha() -> Number {
    Number::from(8)
}
fn d_peft_type() -> String {
    "LORA".into()
}

/// PEFT's `LoraConfig` as stored in `adapter_config.json`. Defaults are PEFT's (`r = 8`, `lora_alpha = 8`,
/// `lora_dropout = 0.0`, `init_lora_weights = true`, `bias = "none"`). Keys peft-rs does not model are kept in
/// `extra` (so files round-trip) and reported by [`LoraConfig::from_json`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "d_r")]
    pub r: usize,
    /// Scaling numerator (kept as a JSON number so `16` and `16.0` round-trip as written).
    #[serde(default = "d_alpha")]
    pub lora_alpha: Number,
    /// Sites to adapt.
    #[serde(default)]
    pub target_modules: Option<ModulePattern>,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Dropout on the adapter input in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// True when the base stores weights as `[in, out]` (GPT-2 `Conv1D`). Every peft-rs site is a linear layer
    /// storing `[out, in]`, so, as PEFT does for a `torch.nn.Linear` target, a `true` here is reset to `false`:
    /// with a warning by [`LoraConfig::from_json`], silently when injected.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train.
    #[serde(default)]
    pub bias: Bias,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules (by name or suffix) trained in full and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Initialisation.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Only layers with these indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<IntOrList>,
    /// The path segment(s) before the layer index.
    #[serde(default)]
    pub layers_pattern: Option<StrOrList>,
    /// Per-site rank overrides (ordered in memory; first matching key wins). Files store keys sorted, as PEFT's
    /// `json.dumps(sort_keys=True)` does.
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Per-site alpha overrides (ordered; first matching key wins).
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    /// DoRA (Liu et al., 2024): weight-decomposed LoRA with a trained magnitude vector.
    #[serde(default)]
    pub use_dora: bool,
    /// Always `"LORA"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// `"SEQ_CLS"`, `"CAUSAL_LM"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// True for adapters loaded for inference only (parameters frozen).
    #[serde(default)]
    pub inference_mode: bool,
    /// Base model revision (informational).
    #[serde(default)]
    pub revision: Option<String>,
    /// A trainable bias on `lora_B` (PEFT ≥ 0.14), merged into the base bias; only with `init_lora_weights`
    /// true or false and without DoRA (as PEFT). Merging needs a base bias.
    #[serde(default)]
    pub lora_bias: bool,
    /// Keys peft-rs does not model, kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Keys PEFT writes that peft-rs keeps but does not interpret; a non-default value is rejected by `validate`.
const PASSIVE: [(&str, &str); 8] = [
    ("qalora_group_size", "16"),
    ("auto_mapping", "null"),
    ("peft_version", "null"),
    ("layer_replication", "null"),
    ("loftq_config", "{}"),
    ("megatron_config", "null"),
    ("megatron_core", "\"megatron.core\""),
    ("eva_config", "null"),
];

impl Default for LoraConfig {
    fn default() -> Self {
        let mut extra = Map::new();
        for (k, v) in PASSIVE.iter().filter(|(k, _)| *k != "peft_version") {
            extra.insert((*k).into(), serde_json::from_str(v).expect("peft-rs bug: PASSIVE json"));
        }
        LoraConfig {
            r: 8,
            lora_alpha: d_alpha(),
            target_modules: None,
            exclude_modules: None,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: Bias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            use_dora: false,
            peft_type: d_peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            inference_mode: false,
            revision: None,
            lora_bias: false,
            extra,
        }
    }
}

impl LoraConfig {
    /// A default config with rank `r`, `lora_alpha = alpha` and list targets.
    pub fn new<S: Into<String>>(r: usize, alpha: f64, targets: impl IntoIterator<Item = S>) -> Self {
        LoraConfig {
            r,
            lora_alpha: num(alpha),
            target_modules: Some(ModulePattern::list(targets)),
            ..Default::default()
        }
    }

    /// Parses `adapter_config.json` text; returns the config and one warning per key peft-rs ignores.
    ///
    /// # Errors
    /// [`crate::LoraError::Json`] (inside [`peft_core::Error::Method`]) for malformed JSON or wrongly typed known
    /// fields.
    pub fn from_json(text: &str) -> peft_core::Result<(Self, Vec<String>)> {
        let v: Value = serde_json::from_str(text).map_err(crate::LoraError::Json)?;
        Self::from_value(v)
    }

    /// [`LoraConfig::from_json`] on a parsed JSON value.
    ///
    /// # Errors
    /// [`crate::LoraError::Json`] (inside [`peft_core::Error::Method`]) for wrongly typed known fields.
    pub fn from_value(v: Value) -> peft_core::Result<(Self, Vec<String>)> {
        let mut cfg: LoraConfig = serde_json::from_value(v).map_err(crate::LoraError::Json)?;
        let mut warnings: Vec<String> = cfg
            .extra
            .iter()
            .filter(|(k, v)| !PASSIVE.iter().any(|(p, _)| p == k) && !inert(v))
            .map(|(k, v)| format!("adapter_config.json: key `{k}` (= {v}) is not used by peft-rs and is ignored"))
            .collect();
        if cfg.fan_in_fan_out {
            cfg.fan_in_fan_out = false;
            warnings.push(
                "adapter_config.json: fan_in_fan_out is true but peft-rs sites are linear layers storing [out, in]; \
                 set to false (as PEFT does for torch.nn.Linear targets)"
                    .into(),
            );
        }
        Ok((cfg, warnings))
    }

    /// The file text as PEFT writes it (`json.dumps(indent=2, sort_keys=True)`).
    pub fn to_json_string(&self) -> String {
        let v = serde_json::to_value(self).expect("peft-rs bug: LoraConfig serialises");
        peft_core::adapter::pyjson::dumps(&v)
    }

    /// `lora_alpha` as f64.
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.as_f64().unwrap_or(f64::NAN)
    }

    /// The parsed `init_lora_weights`.
    ///
    /// # Errors
    /// [`ConfigError::BadInit`] for an unknown name.
    pub fn init(&self) -> Result<Init, ConfigError> {
        Ok(match &self.init_lora_weights {
            InitLoraWeights::Bool(true) => Init::Default,
            InitLoraWeights::Bool(false) => Init::Random,
            InitLoraWeights::Named(s) if s == "gaussian" => Init::Gaussian,
            InitLoraWeights::Named(s) if s == "pissa" => Init::Pissa { niter: None },
            InitLoraWeights::Named(s) if s == "olora" => Init::Olora,
            InitLoraWeights::Named(s) if s == "corda" || s == "eva" => {
                return Err(ConfigError::Unsupported(format!(
                    "init_lora_weights {s:?} needs calibration data: use peft_lora::corda::CordaLoraConfig or peft_lora::eva::EvaLoraConfig with PeftModel::add_adapter_calibrated"
                )))
            }
            InitLoraWeights::Named(s) => match s.strip_prefix("pissa_niter_").and_then(|n| n.parse().ok()) {
                Some(n) => Init::Pissa { niter: Some(n) },
                None => return Err(ConfigError::BadInit(s.clone())),
            },
        })
    }

    /// Checks ranges and combinations (as PEFT's `LoraConfig.__post_init__` and more).
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.r == 0 {
            return Err(ConfigError::BadRank { what: "r = 0".into() });
        }
        if !self.alpha().is_finite() {
            return Err(ConfigError::BadAlpha { what: self.lora_alpha.to_string() });
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(ConfigError::BadDropout(self.lora_dropout));
        }
        if self.target_modules.is_none() {
            return Err(ConfigError::NoTargets);
        }
        self.init()?;
        if self.peft_type != "LORA" {
            return Err(ConfigError::Unsupported(format!("peft_type {:?} is not LORA", self.peft_type)));
        }
        if self.lora_bias && self.use_dora {
            return Err(ConfigError::Unsupported("lora_bias with DoRA (as in PEFT)".into()));
        }
        if self.lora_bias && !matches!(self.init_lora_weights, InitLoraWeights::Bool(_)) {
            return Err(ConfigError::Unsupported(
                "lora_bias needs init_lora_weights true or false (as in PEFT)".into(),
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(ConfigError::Unsupported("layers_pattern needs layers_to_transform".into()));
        }
        if matches!(self.target_modules, Some(ModulePattern::Regex(_))) && self.layers_to_transform.is_some() {
            return Err(ConfigError::Unsupported("layers_to_transform cannot be used with a regex target".into()));
        }
        for (k, v) in &self.rank_pattern {
            if v.as_u64().is_none_or(|r| r == 0) {
                return Err(ConfigError::BadRank { what: format!("rank_pattern[{k:?}] = {v}") });
            }
        }
        for (k, v) in &self.alpha_pattern {
            if !v.as_f64().is_some_and(f64::is_finite) {
                return Err(ConfigError::BadAlpha { what: format!("alpha_pattern[{k:?}] = {v}") });
            }
        }
        for (k, default) in PASSIVE {
            if let Some(v) = self.extra.get(k) {
                let d: Value = serde_json::from_str(default).expect("peft-rs bug: PASSIVE json");
                if *v != d && !matches!(k, "megatron_core" | "auto_mapping" | "peft_version" | "eva_config") {
                    return Err(ConfigError::Unsupported(format!("{k} = {v}")));
                }
            }
        }
        Ok(())
    }

    /// The compiled site selection.
    ///
    /// # Errors
    /// [`ConfigError::NoTargets`]; regex compile errors.
    pub fn target_spec(&self) -> peft_core::Result<TargetSpec> {
        let target = self.target_modules.as_ref().ok_or(ConfigError::NoTargets)?;
        let layers = self.layers_to_transform.as_ref().map(|l| match l {
            IntOrList::One(i) => vec![*i],
            IntOrList::Many(v) => v.clone(),
        });
        let pattern = self.layers_pattern.as_ref().map(|l| match l {
            StrOrList::One(s) => vec![s.clone()],
            StrOrList::Many(v) => v.clone(),
        });
        TargetSpec::new(
            target,
            self.exclude_modules.as_ref(),
            layers.as_deref(),
            pattern.as_deref(),
            self.modules_to_save.as_deref().unwrap_or(&[]),
        )
    }

    /// Rank and alpha at site `path` after `rank_pattern` / `alpha_pattern`.
    ///
    /// # Errors
    /// Regex compile errors in the pattern keys.
    pub fn rank_alpha(&self, path: &str) -> peft_core::Result<(usize, f64)> {
        let rp = PatternMap::new(self.rank_pattern.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0) as usize)))?;
        let ap = PatternMap::new(self.alpha_pattern.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN))))?;
        Ok((rp.lookup(path).unwrap_or(self.r), ap.lookup(path).unwrap_or(self.alpha())))
    }

    /// The LoRA scaling for rank `r` and `alpha`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// `null`, `false`, `{}`, `[]`: an option left at "off", safe to ignore without a warning.
fn inert(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// A JSON number that stays an integer when `x` is integral (as Python writes `16` for an int).
pub fn num(x: f64) -> Number {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Number::from(x as i64)
    } else {
        Number::from_f64(x).unwrap_or_else(|| Number::from(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_peft() {
        let (c, w) = LoraConfig::from_json(r#"{"target_modules": ["q"], "foo": 1}"#).unwrap();
        assert_eq!((c.r, c.alpha(), c.lora_dropout, c.bias), (8, 8.0, 0.0, Bias::None));
        assert_eq!(c.init().unwrap(), Init::Default);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("foo"));
        c.validate().unwrap();
    }

    #[test]
    fn config_round_trips_through_json_and_keeps_pattern_order() {
        let mut c = LoraConfig::new(4, 16.0, ["query", "value"]);
        c.rank_pattern.insert("value".into(), 2.into());
        c.rank_pattern.insert("query".into(), 6.into());
        c.alpha_pattern.insert("z".into(), Value::Number(Number::from_f64(0.5).unwrap()));
        c.init_lora_weights = InitLoraWeights::Named("pissa_niter_4".into());
        c.lora_dropout = 0.1;
        let text = c.to_json_string();
        assert!(text.contains("\"lora_alpha\": 16,"), "{text}");
        assert!(text.contains("\"lora_dropout\": 0.1,"));
        let (back, warnings) = LoraConfig::from_json(&text).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(back.rank_pattern.len(), 2);
        assert_eq!((back.r, back.lora_dropout, &back.init_lora_weights), (c.r, c.lora_dropout, &c.init_lora_weights));
        assert_eq!(back.to_json_string(), text);
        // In memory the insertion order is kept; on disk (like PEFT's sort_keys=True) nested keys are sorted.
        assert_eq!(c.rank_pattern.keys().collect::<Vec<_>>(), ["value", "query"]);
        assert_eq!(back.rank_pattern.keys().collect::<Vec<_>>(), ["query", "value"]);
        assert_eq!(back.init().unwrap(), Init::Pissa { niter: Some(4) });
        // A float alpha stays a float.
        let (f, _) = LoraConfig::from_json(r#"{"lora_alpha": 16.0, "target_modules": "x"}"#).unwrap();
        assert!(f.to_json_string().contains("\"lora_alpha\": 16.0,"));
    }

    #[test]
    fn validate_reports_typed_errors() {
        let ok = LoraConfig::new(4, 8.0, ["q"]);
        ok.validate().unwrap();
        let bad = |f: &dyn Fn(&mut LoraConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(bad(&|c| c.r = 0), ConfigError::BadRank { .. }));
        assert!(matches!(bad(&|c| c.lora_dropout = 1.0), ConfigError::BadDropout(_)));
        assert!(matches!(bad(&|c| c.target_modules = None), ConfigError::NoTargets));
        assert!(matches!(
            bad(&|c| c.init_lora_weights = InitLoraWeights::Named("loftq".into())),
            ConfigError::BadInit(_)
        ));
        assert!(matches!(
            bad(&|c| {
                c.rank_pattern.insert("q".into(), 0.into());
            }),
            ConfigError::BadRank { .. }
        ));
        assert!(matches!(
            bad(&|c| c.layers_pattern = Some(StrOrList::One("layer".into()))),
            ConfigError::Unsupported(_)
        ));
        // lora_bias: only plain LoRA with init true/false, as PEFT's __post_init__.
        let mut lb = ok.clone();
        lb.lora_bias = true;
        lb.validate().unwrap();
        assert!(matches!(
            bad(&|c| {
                c.lora_bias = true;
                c.use_dora = true;
            }),
            ConfigError::Unsupported(_)
        ));
        assert!(matches!(
            bad(&|c| {
                c.lora_bias = true;
                c.init_lora_weights = InitLoraWeights::Named("pissa".into());
            }),
            ConfigError::Unsupported(_)
        ));
        assert!(matches!(
            bad(&|c| {
                c.target_modules = Some(ModulePattern::Regex(".*q".into()));
                c.layers_to_transform = Some(IntOrList::One(0));
            }),
            ConfigError::Unsupported(_)
        ));
    }

    #[test]
    fn rank_alpha_patterns_first_hit_wins_and_rslora_scales_by_sqrt_r() {
        let mut c = LoraConfig::new(8, 16.0, ["q", "v"]);
        c.rank_pattern.insert("layer.0.q".into(), 2.into());
        c.rank_pattern.insert("q".into(), 4.into());
        c.alpha_pattern.insert("v".into(), 32.into());
        assert_eq!(c.rank_alpha("enc.layer.0.q").unwrap(), (2, 16.0));
        assert_eq!(c.rank_alpha("enc.layer.1.q").unwrap(), (4, 16.0));
        assert_eq!(c.rank_alpha("enc.layer.1.v").unwrap(), (8, 32.0));
        assert_eq!(c.scaling(16, 16.0), 1.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(16, 16.0), 4.0);
    }
}
