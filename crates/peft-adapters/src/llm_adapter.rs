//! LLM-Adapters' bottleneck adapters (Hu et al., 2023, "LLM-Adapters: An Adapter Family for Parameter-Efficient
//! Fine-Tuning of Large Language Models"): series and parallel bottlenecks on the **linear** layers of a decoder,
//! as the authors' PEFT fork (`tuners/bottleneck.py`) places them, not on the residual stream as AdapterHub does
//! ([`crate::bottleneck`]).
//!
//! `A(u) = up(act(down(drop(u))))·s`, `down: d_in → m`, `up: m → d`, no biases. On a target layer `y = xWᵀ + b`:
//! - **input series** (the fork's `mh_adapter`; LLaMA's `gate_proj` / `up_proj`): `y = (x + A(x))Wᵀ + b`, through
//!   the linear site's input hook, `d = d_in`;
//! - **output series** (`output_adapter`; LLaMA's `down_proj`): `y = h + A(h)` with `h = xWᵀ + b`, `d = d_out`;
//! - **parallel** (`use_parallel_adapter`): `y = xWᵀ + b + A(x)`, `down: d_in → m`, `up: m → d_out`.
//!
//! Which series placement a target gets is the fork's per-architecture table
//! (`TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING`): here [`LlmAdapterConfig::output_modules`] names the targets
//! that take the output placement (LLaMA's mapping: `down_proj`), every other target the input placement; parallel
//! adapters ignore it.
//!
//! Defaults are the fork's: `bottleneck_size = 256`, `non_linearity = "tanh"`, `adapter_dropout = 0`,
//! `scaling = 1.0` (or `"learned"`: a scalar parameter starting at 1), `init_weights = "bert"`: **both** down and
//! up N(0, 0.02), so the model is *not* the base model at init (the spec's documented non-identity: on
//! SmolLM2-135M the parallel recipe at m = 16 moves the logits of a 6-token input by up to 0.45, against a largest
//! logit of 31; `tests/llm_adapters_smollm2.rs`). `"mam_adapter"` (down Kaiming-uniform, up zero) is exact identity
//! at init. The fork computes the adapter in f32 and casts back; everything here is f32.
//!
//! Not mergeable (the non-linearity): `merge` fails with a typed error. Files: `adapter_config.json` with
//! `peft_type = "LLM_ADAPTER"` (the fork writes `"BOTTLENECK"`, which this crate's AdapterHub-style
//! [`crate::bottleneck::BottleneckConfig`] already uses, so the fork's files are not read as they are: no fixture
//! from the fork was made, the field names are the fork's); tensors `<module>.adapter_down.weight`,
//! `<module>.adapter_up.weight` and, with learned scaling, `<module>.adapter_scale` (`[1]`).
//!
//! ```
//! use peft_adapters::llm_adapter::LlmAdapterConfig;
//! use peft_core::adapter::PeftModel;
//! use peft_models::llama::{Llama, LlamaSpec};
//!
//! let spec = LlamaSpec { vocab: 16, hidden: 8, intermediate: 12, layers: 1, heads: 2, kv_heads: 1, head_dim: 4,
//!     eps: 1e-5, rope_theta: 1e4, max_positions: 16, tie_embeddings: true, bos: None, eos: vec![] };
//! let base = Llama::random(&spec, 0, 0.2)?;
//! // Series adapters on the inputs of gate_proj and up_proj, 4 wide: 2 x (8·4 + 4·8) parameters.
//! let cfg = LlmAdapterConfig::series(["gate_proj", "up_proj"], 4);
//! let model = PeftModel::new(base, cfg, "default", 0)?;
//! assert_eq!(model.param_counts().0, 2 * (8 * 4 + 4 * 8));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;

use ndarray::ArrayD;
use peft_core::adapter::{
    select_linear, site_rng, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern, PeftConfig,
    SavedTensors, TargetSpec, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Param, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::bottleneck::{bottleneck_map, AdapterInit};
use crate::common::{config_json, expect_tensor, kaiming, normal, parse_config, Activation};
use crate::error::{AdaptersError, Result};

/// This method's `peft_type`.
pub const LLM_ADAPTER_TYPE: &str = "LLM_ADAPTER";

fn d_peft_type() -> String {
    LLM_ADAPTER_TYPE.into()
}
fn d_size() -> usize {
    256
}
fn d_act() -> Activation {
    Activation::Tanh
}
fn d_scaling() -> LlmScaling {
    LlmScaling::Fixed(1.0)
}
fn d_init() -> AdapterInit {
    AdapterInit::Bert
}

/// The word `"learned"` (the fork's `scaling = "learned"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Learned {
    /// `"learned"`.
    #[serde(rename = "learned")]
    Learned,
}

/// The adapter output's scale: a number, or `"learned"` (a trainable scalar starting at 1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LlmScaling {
    /// A fixed factor.
    Fixed(f64),
    /// A trainable scalar.
    Learned(Learned),
}

/// Where one adapter sits on its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// `x + A(x)` replaces the layer's input.
    InputSeries,
    /// `h + A(h)` replaces the layer's output.
    OutputSeries,
    /// `A(x)` is added to the layer's output.
    Parallel,
}

/// LLM-Adapters' `BottleneckConfig` (the fork's field names), as stored in `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlmAdapterConfig {
    /// Always `"LLM_ADAPTER"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// `"CAUSAL_LM"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Layers to adapt.
    pub target_modules: ModulePattern,
    /// Layers never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Series targets that take the output placement (the rest take the input placement); LLaMA's table:
    /// `["down_proj"]`.
    #[serde(default)]
    pub output_modules: Option<ModulePattern>,
    /// Bottleneck width `m`.
    #[serde(default = "d_size")]
    pub bottleneck_size: usize,
    /// Non-linearity between down and up.
    #[serde(default = "d_act")]
    pub non_linearity: Activation,
    /// Dropout on the adapter input while training.
    #[serde(default)]
    pub adapter_dropout: f64,
    /// Parallel (`true`) or series adapters.
    #[serde(default)]
    pub use_parallel_adapter: bool,
    /// Output scale.
    #[serde(default = "d_scaling")]
    pub scaling: LlmScaling,
    /// `"bert"` (the fork's default, not identity) or `"mam_adapter"` (identity).
    #[serde(default = "d_init")]
    pub init_weights: AdapterInit,
    /// Modules trained and saved in full next to the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
    /// Any other key the file held, kept so that load -> save writes it back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "task_type",
    "target_modules",
    "exclude_modules",
    "output_modules",
    "bottleneck_size",
    "non_linearity",
    "adapter_dropout",
    "use_parallel_adapter",
    "scaling",
    "init_weights",
    "modules_to_save",
    "inference_mode",
];

impl LlmAdapterConfig {
    fn base(targets: ModulePattern, bottleneck_size: usize, parallel: bool) -> Self {
        LlmAdapterConfig {
            peft_type: d_peft_type(),
            task_type: None,
            target_modules: targets,
            exclude_modules: None,
            output_modules: None,
            bottleneck_size,
            non_linearity: d_act(),
            adapter_dropout: 0.0,
            use_parallel_adapter: parallel,
            scaling: d_scaling(),
            init_weights: d_init(),
            modules_to_save: None,
            inference_mode: false,
            extra: Map::new(),
        }
    }

    /// Input-series adapters `m` wide on `targets`.
    pub fn series<S: Into<String>>(targets: impl IntoIterator<Item = S>, bottleneck_size: usize) -> Self {
        Self::base(ModulePattern::list(targets), bottleneck_size, false)
    }

    /// Parallel adapters `m` wide on `targets`.
    pub fn parallel<S: Into<String>>(targets: impl IntoIterator<Item = S>, bottleneck_size: usize) -> Self {
        Self::base(ModulePattern::list(targets), bottleneck_size, true)
    }

    /// The fork's LLaMA series recipe (`math_running_commands`): input series on `gate_proj` and `up_proj`, with
    /// LLaMA's placement table (`down_proj` would take the output placement).
    pub fn llama_series(bottleneck_size: usize) -> Self {
        LlmAdapterConfig {
            output_modules: Some(ModulePattern::list(["down_proj"])),
            ..Self::series(["gate_proj", "up_proj"], bottleneck_size)
        }
    }

    /// The fork's LLaMA parallel recipe: parallel adapters on `up_proj` and `down_proj`.
    pub fn llama_parallel(bottleneck_size: usize) -> Self {
        Self::parallel(["up_proj", "down_proj"], bottleneck_size)
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f, r: String| Err(AdaptersError::config(LLM_ADAPTER_TYPE, f, r));
        if self.bottleneck_size == 0 {
            return bad("bottleneck_size", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.adapter_dropout) {
            return bad("adapter_dropout", format!("must be in [0, 1), got {}", self.adapter_dropout));
        }
        if let LlmScaling::Fixed(s) = self.scaling {
            if !s.is_finite() {
                return bad("scaling", format!("{s} is not finite"));
            }
        }
        Ok(())
    }

    /// The adapted sites of `model`, each with its placement.
    ///
    /// # Errors
    /// [`peft_core::Error::NoTargetMatched`]; invalid regexes.
    pub fn sites(&self, model: &dyn Module) -> Result<Vec<(Linear, Placement)>> {
        let spec = TargetSpec::new(&self.target_modules, self.exclude_modules.as_ref(), None, None, &[])?;
        let sites = select_linear(model, &spec)?;
        let out = self.output_modules.as_ref().map(|f| TargetSpec::new(f, None, None, None, &[])).transpose()?;
        Ok(sites
            .into_iter()
            .map(|s| {
                let p = if self.use_parallel_adapter {
                    Placement::Parallel
                } else if out.as_ref().is_some_and(|o| o.matches(s.path(), false)) {
                    Placement::OutputSeries
                } else {
                    Placement::InputSeries
                };
                (s, p)
            })
            .collect())
    }

    /// `(down, up)` shapes on a layer `in → out` with `placement`.
    pub fn shapes(&self, placement: Placement, d_in: usize, d_out: usize) -> ([usize; 2], [usize; 2]) {
        let m = self.bottleneck_size;
        let (a, b) = match placement {
            Placement::InputSeries => (d_in, d_in),
            Placement::OutputSeries => (d_out, d_out),
            Placement::Parallel => (d_in, d_out),
        };
        ([m, a], [b, m])
    }
}

/// One LLM-Adapters bottleneck on one linear site.
pub struct LlmAdapterLinear {
    name: String,
    placement: Placement,
    down: Param,
    up: Param,
    /// The learned scale (`[1]`), when `scaling = "learned"`.
    scale_param: Option<Param>,
    scale: f64,
    act: Activation,
    dropout: f64,
}

impl LlmAdapterLinear {
    /// Adapter `name` at `path` over `base` with `placement`.
    pub fn new(
        path: &str,
        name: &str,
        base: &dyn LinearBase,
        placement: Placement,
        cfg: &LlmAdapterConfig,
        rng: &mut impl rand::Rng,
    ) -> Self {
        let (ds, us) = cfg.shapes(placement, base.in_features(), base.out_features());
        let (dw, uw) = match cfg.init_weights {
            AdapterInit::MamAdapter => (kaiming(ds[0], ds[1], rng), ArrayD::zeros(us.to_vec())),
            AdapterInit::Bert => (normal(&ds, 0.02, rng), normal(&us, 0.02, rng)),
        };
        let (scale_param, scale) = match cfg.scaling {
            LlmScaling::Fixed(s) => (None, s),
            LlmScaling::Learned(_) => {
                (Some(Param::new(format!("{path}.adapter_scale.{name}"), ArrayD::ones(vec![1]), true)), 1.0)
            }
        };
        LlmAdapterLinear {
            name: name.into(),
            placement,
            down: Param::new(format!("{path}.adapter_down.{name}.weight"), dw, true),
            up: Param::new(format!("{path}.adapter_up.{name}.weight"), uw, true),
            scale_param,
            scale,
            act: cfg.non_linearity,
            dropout: cfg.adapter_dropout,
        }
    }

    /// Where it sits.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// `(down, up)` weights.
    pub fn weights(&self) -> (&Param, &Param) {
        (&self.down, &self.up)
    }

    /// The learned scale, if any.
    pub fn scale_param(&self) -> Option<&Param> {
        self.scale_param.as_ref()
    }

    /// `A(u)`.
    fn adapt(&self, u: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let u = if ctx.train && self.dropout > 0.0 {
            ctx.with_rng(|rng| u.dropout(self.dropout, true, rng))?
        } else {
            u.clone()
        };
        let a = bottleneck_map(&u, (&self.down.tensor(), None), (&self.up.tensor(), None), self.act, self.scale)?;
        match &self.scale_param {
            Some(s) => a.mul(&s.tensor()),
            None => Ok(a),
        }
    }
}

impl LinearAdapter for LlmAdapterLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "llm-adapter"
    }
    fn delta(
        &self,
        x: &Tensor,
        base_out: &Tensor,
        _base: &dyn LinearBase,
        ctx: &Ctx,
    ) -> peft_core::Result<Option<Tensor>> {
        match self.placement {
            Placement::InputSeries => Ok(None),
            Placement::OutputSeries => self.adapt(base_out, ctx).map(Some),
            Placement::Parallel => self.adapt(x, ctx).map(Some),
        }
    }
    fn transform_input(&self, x: &Tensor, ctx: &Ctx) -> peft_core::Result<Option<Tensor>> {
        if self.placement != Placement::InputSeries {
            return Ok(None);
        }
        x.add(&self.adapt(x, ctx)?).map(Some)
    }
    fn params(&self) -> Vec<Param> {
        self.saved_tensors().into_iter().map(|(_, p)| p).collect()
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> peft_core::Result<Option<ArrayD<f32>>> {
        // A non-linear bottleneck has no weight-space equivalent.
        Ok(None)
    }
}

impl SavedTensors for LlmAdapterLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        let mut v =
            vec![("adapter_down.weight".to_string(), self.down.clone()), ("adapter_up.weight".into(), self.up.clone())];
        v.extend(self.scale_param.clone().map(|p| ("adapter_scale".to_string(), p)));
        v
    }
}

/// An injected LLM-Adapters bottleneck.
pub type LlmAdapterTuner = LinearTuner<LlmAdapterLinear>;

impl TunerConfig for LlmAdapterConfig {
    fn peft_type(&self) -> &str {
        LLM_ADAPTER_TYPE
    }
    fn describe(&self) -> String {
        let list = |p: &ModulePattern| match p {
            ModulePattern::List(v) => v.join(","),
            ModulePattern::Regex(s) => s.clone(),
        };
        format!(
            "LLM-Adapters {} bottleneck m={} ({:?}) on {}",
            if self.use_parallel_adapter { "parallel" } else { "series" },
            self.bottleneck_size,
            self.non_linearity,
            list(&self.target_modules)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, LLM_ADAPTER_TYPE)?)
    }
    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
    fn set_modules_to_save(&mut self, modules: Vec<String>) -> AdapterResult<()> {
        self.modules_to_save = (!modules.is_empty()).then_some(modules);
        Ok(())
    }
    fn inference_mode(&self) -> bool {
        self.inference_mode
    }
    fn set_inference_mode(&mut self, on: bool) {
        self.inference_mode = on;
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let sites = self.sites(model)?;
        let linears: Vec<Linear> = sites.iter().map(|(s, _)| s.clone()).collect();
        let tuner = LinearTuner::attach(cx.name, LLM_ADAPTER_TYPE, &linears, |s| {
            let p = sites.iter().find(|(t, _)| t.path() == s.path()).map_or(Placement::InputSeries, |(_, p)| *p);
            let mut rng = site_rng(cx.seed, cx.name, s.path());
            Ok(LlmAdapterLinear::new(s.path(), cx.name, s.base().as_ref(), p, self, &mut rng))
        })?;
        Ok(Box::new(tuner))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        for (s, p) in self.sites(model)? {
            let (ds, us) = self.shapes(p, s.in_features(), s.out_features());
            expect_tensor(file, &format!("{}.adapter_down.weight", s.path()), &ds)?;
            expect_tensor(file, &format!("{}.adapter_up.weight", s.path()), &us)?;
            if matches!(self.scaling, LlmScaling::Learned(_)) {
                expect_tensor(file, &format!("{}.adapter_scale", s.path()), &[1])?;
            }
        }
        Ok(())
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for LlmAdapterConfig {
    const PEFT_TYPE: &'static str = LLM_ADAPTER_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, LLM_ADAPTER_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "llm_adapter_tests.rs"]
mod tests;
