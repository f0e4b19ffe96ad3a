//! peft-core's own tuners, the baselines every comparison needs:
//! - [`DeltaConfig`] (`peft_type = "PARAM_DELTA"`): a dense, trainable delta on every parameter whose name
//!   matches `target_parameters`, through the parameter-delta site. BitFit ([`DeltaConfig::bitfit`]: biases only,
//!   Ben Zaken et al. 2022) and LayerNorm tuning ([`DeltaConfig::layer_norm`]) are presets. The delta starts at
//!   zero (identity), merges exactly into the parameter, and is what the adapter file stores
//!   (`<param>.delta`).
//! - [`BaseTuneConfig`] (`peft_type = "BASE_TUNE"`): trains base parameters in place: full fine-tuning (every
//!   parameter) or a head-only probe (none: only `modules_to_save`). The file stores the trained tensors under
//!   their own names.

use std::any::Any;
use std::sync::Arc;

use ndarray::ArrayD;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapter::attach::not_supported;
use crate::adapter::error::{AdapterError, AdapterResult};
use crate::adapter::registry::PeftConfig;
use crate::adapter::target::ModulePattern;
use crate::adapter::tuner::{InjectCx, Tuner, TunerConfig};
use crate::nn::Module;
use crate::param::{Param, ParamDelta};
use crate::tensor::Tensor;

fn module_of(pname: &str) -> &str {
    pname.rsplit_once('.').map_or("", |(m, _)| m)
}

fn in_modules(pname: &str, modules: &[String]) -> bool {
    let m = module_of(pname);
    modules.iter().any(|t| m == t || m.ends_with(&format!(".{t}")) || m.starts_with(&format!("{t}.")))
}

/// Whole-name matching of a parameter name: a regex (full match) or a list of names / dotted suffixes.
fn param_matches(p: &ModulePattern, re: Option<&Regex>, name: &str) -> bool {
    match p {
        ModulePattern::Regex(_) => re.is_some_and(|r| r.is_match(name)),
        ModulePattern::List(v) => v.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
    }
}

fn compile(p: &ModulePattern, method: &str) -> AdapterResult<Option<Regex>> {
    match p {
        ModulePattern::Regex(s) => Regex::new(&format!(r"\A(?:{s})\z"))
            .map(Some)
            .map_err(|e| AdapterError::config(method, "target_parameters", e.to_string())),
        ModulePattern::List(_) => Ok(None),
    }
}

/// Unknown keys of a config object, as load-report lines.
fn unknown_keys(v: &Value, known: &[&str], method: &str) -> Vec<String> {
    v.as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !known.contains(&k.as_str()))
                .map(|k| format!("`{k}` is not a {method} option and was ignored"))
                .collect()
        })
        .unwrap_or_default()
}

fn parse<C: serde::de::DeserializeOwned>(v: &Value, method: &str) -> AdapterResult<C> {
    serde_json::from_value(v.clone()).map_err(|e| AdapterError::config(method, "<config>", e.to_string()))
}

/// A dense delta on every parameter whose name matches `target_parameters`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaConfig {
    /// Always `"PARAM_DELTA"`.
    pub peft_type: String,
    /// Parameter names (full match of a regex, or names / dotted suffixes).
    pub target_parameters: ModulePattern,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl DeltaConfig {
    /// Deltas on the parameters matching `target`.
    pub fn new(target: ModulePattern) -> Self {
        DeltaConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: target,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// BitFit: every bias.
    pub fn bitfit() -> Self {
        Self::new(ModulePattern::Regex(r".*\.bias".into()))
    }

    /// LayerNorm tuning: the weights and biases of every normalisation layer (`LayerNorm`, `norm1`, `ln_f`,
    /// `layer_norm`, `*_layernorm` as BERT, DINOv2, Whisper and LLaMA name them).
    pub fn layer_norm() -> Self {
        Self::new(ModulePattern::Regex(
            r".*(?:LayerNorm|layernorm|layer_norm|(?:^|\.)norm\d*|(?:^|\.)ln_\w+)\.(?:weight|bias)".into(),
        ))
    }
}

impl TunerConfig for DeltaConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        let t = match &self.target_parameters {
            ModulePattern::Regex(s) => s.clone(),
            ModulePattern::List(v) => v.join(","),
        };
        format!("dense delta on parameters {t}")
    }
    fn to_json(&self) -> AdapterResult<Value> {
        serde_json::to_value(self).map_err(|e| AdapterError::config(Self::PEFT_TYPE, "<config>", e.to_string()))
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
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        let re = compile(&self.target_parameters, Self::PEFT_TYPE)?;
        let mts = self.modules_to_save();
        let targets: Vec<&Param> = cx
            .base_params
            .iter()
            .filter(|p| !in_modules(p.name(), &mts) && param_matches(&self.target_parameters, re.as_ref(), p.name()))
            .collect();
        if targets.is_empty() {
            let pat = match &self.target_parameters {
                ModulePattern::Regex(s) => vec![s.clone()],
                ModulePattern::List(v) => v.clone(),
            };
            return Err(crate::Error::NoTargetMatched { patterns: pat }.into());
        }
        let mut tuner = DeltaTuner { name: cx.name.into(), deltas: Vec::new() };
        for p in targets {
            let d = Arc::new(DenseDelta {
                name: cx.name.into(),
                delta: Param::new(format!("{}.delta.{}", p.name(), cx.name), ArrayD::zeros(p.shape()), true),
            });
            if let Err(e) = p.attach_delta(d.clone()) {
                let _ = tuner.detach(false);
                return Err(e.into());
            }
            tuner.deltas.push((p.clone(), d));
        }
        Ok(Box::new(tuner))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for DeltaConfig {
    const PEFT_TYPE: &'static str = "PARAM_DELTA";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let ignored =
            unknown_keys(v, &["peft_type", "target_parameters", "modules_to_save", "inference_mode"], "PARAM_DELTA");
        Ok((parse(v, Self::PEFT_TYPE)?, ignored))
    }
}

/// `value + Δ`, `Δ` a trainable tensor of the parameter's shape.
struct DenseDelta {
    name: String,
    delta: Param,
}

impl ParamDelta for DenseDelta {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "dense-delta"
    }
    fn apply(&self, base: &Tensor) -> crate::Result<Tensor> {
        base.add(&self.delta.tensor())
    }
    fn delta_value(&self) -> crate::Result<ArrayD<f32>> {
        Ok(self.delta.value().to_owned())
    }
    fn params(&self) -> Vec<Param> {
        vec![self.delta.clone()]
    }
}

struct DeltaTuner {
    name: String,
    deltas: Vec<(Param, Arc<DenseDelta>)>,
}

impl Tuner for DeltaTuner {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "PARAM_DELTA"
    }
    fn params(&self) -> Vec<Param> {
        self.deltas.iter().map(|(_, d)| d.delta.clone()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        self.deltas.iter().map(|(p, d)| (format!("{}.delta", p.name()), d.delta.clone())).collect()
    }
    fn set_active(&self, on: bool) {
        for (p, _) in &self.deltas {
            p.activate_delta(&self.name, on);
        }
    }
    fn merge(&self) -> AdapterResult<()> {
        for (i, (p, _)) in self.deltas.iter().enumerate() {
            if let Err(e) = p.merge_delta(&self.name) {
                for (q, _) in &self.deltas[..i] {
                    let _ = q.unmerge_delta(&self.name);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        for (p, _) in &self.deltas {
            if p.is_delta_merged(&self.name)? {
                p.unmerge_delta(&self.name)?;
            }
        }
        Ok(())
    }
    fn is_merged(&self) -> bool {
        self.deltas.first().is_some_and(|(p, _)| p.is_delta_merged(&self.name).unwrap_or(false))
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        for (p, _) in &self.deltas {
            if keep_merged {
                p.detach_delta_keep_merged(&self.name)?;
            } else {
                p.detach_delta(&self.name)?;
            }
        }
        Ok(())
    }
}

/// Trains base parameters in place: all of them (full fine-tuning) or none (head-only probe, with the head in
/// `modules_to_save`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseTuneConfig {
    /// Always `"BASE_TUNE"`.
    pub peft_type: String,
    /// Whether every base parameter trains (`false`: only `modules_to_save`).
    pub train_all: bool,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl BaseTuneConfig {
    /// Full fine-tuning.
    pub fn full() -> Self {
        BaseTuneConfig {
            peft_type: Self::PEFT_TYPE.into(),
            train_all: true,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// A frozen backbone: only `modules_to_save` train (a linear probe when that is the head).
    pub fn head_only() -> Self {
        BaseTuneConfig { train_all: false, ..Self::full() }
    }
}

impl TunerConfig for BaseTuneConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        if self.train_all {
            "full fine-tuning (all parameters)".into()
        } else {
            "head only (frozen backbone, linear probe)".into()
        }
    }
    fn to_json(&self) -> AdapterResult<Value> {
        serde_json::to_value(self).map_err(|e| AdapterError::config(Self::PEFT_TYPE, "<config>", e.to_string()))
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
    fn trains_base_param(&self, name: &str, _wrapped: &[String]) -> bool {
        self.train_all && !in_modules(name, &self.modules_to_save())
    }
    fn key_prefix(&self) -> &str {
        ""
    }
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        Ok(Box::new(NoTuner(cx.name.into())))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for BaseTuneConfig {
    const PEFT_TYPE: &'static str = "BASE_TUNE";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let ignored = unknown_keys(v, &["peft_type", "train_all", "modules_to_save", "inference_mode"], "BASE_TUNE");
        Ok((parse(v, Self::PEFT_TYPE)?, ignored))
    }
}

/// An adapter with no parameters of its own (the base parameters train in place).
struct NoTuner(String);

impl Tuner for NoTuner {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn kind(&self) -> &str {
        "BASE_TUNE"
    }
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        Vec::new()
    }
    fn set_active(&self, _on: bool) {}
    fn merge(&self) -> AdapterResult<()> {
        // The trained values are the base values already.
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        Err(not_supported(&self.0, "BASE_TUNE", "unmerge", "base parameters were trained in place"))
    }
    fn detach(&self, _keep_merged: bool) -> AdapterResult<()> {
        Ok(())
    }
}
