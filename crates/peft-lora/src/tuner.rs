//! LoRA as a peft-core tuner: [`LoraConfig`] injects a [`LoraLinear`] on every selected linear site (through
//! [`LinearTuner`]); [`LoraModelExt`] adds LoRA's own operations to a [`PeftModel`] (its layers, saving a
//! PiSSA/OLoRA/CorDA adapter for the original base).
//!
//! Loading (`PeftModel::load_adapter`): the config is checked against the file before anything is allocated
//! (every targeted site's `lora_A` must exist with shape `[r, in]`); PiSSA and OLoRA adapters replay their init on
//! the base they are loaded onto (as PEFT does: the base becomes `W_res` again, then `A`, `B` are read), so a
//! PiSSA adapter saved without conversion works on the original model; CorDA adapters saved that way are refused
//! (their init needs the calibration data; save them with [`LoraModelExt::save_mutated_as_lora`]).

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use peft_core::adapter::{
    adapter_dir, not_supported, select_linear, site_rng, AdapterError, AdapterResult, AdapterTensors, InjectCx,
    LinearTuner, PeftConfig, PeftModel, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Linear, Module};
use peft_core::Param;
use serde_json::Value;

use crate::config::{num, Bias, ConfigError, Init, InitLoraWeights, LoraConfig};
use crate::layer::{convert_mutated_to_lora, LoraLinear, LoraSpec};

impl From<ConfigError> for AdapterError {
    fn from(e: ConfigError) -> Self {
        let field = match &e {
            ConfigError::BadRank { .. } => "r",
            ConfigError::BadAlpha { .. } => "lora_alpha",
            ConfigError::BadDropout(_) => "lora_dropout",
            ConfigError::NoTargets => "target_modules",
            ConfigError::BadInit(_) => "init_lora_weights",
            ConfigError::Unsupported(_) => "<combination>",
        };
        AdapterError::InvalidConfig { method: "LORA".into(), field: field.into(), reason: e.to_string() }
    }
}

impl SavedTensors for LoraLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        let mut v =
            vec![("lora_A.weight".to_string(), self.lora_a().clone()), ("lora_B.weight".into(), self.lora_b().clone())];
        if let Some(m) = self.magnitude() {
            v.push(("lora_magnitude_vector".into(), m.clone()));
        }
        if let Some(b) = self.lora_b_bias() {
            v.push(("lora_B.bias".into(), b.clone()));
        }
        v
    }
}

/// The sites `config` targets in `model`.
///
/// # Errors
/// [`peft_core::Error::NoTargetMatched`]; regex errors.
pub fn lora_sites(model: &dyn Module, config: &LoraConfig) -> AdapterResult<Vec<Linear>> {
    select_linear(model, &config.target_spec()?)
}

/// LoRA's spec at `site` under `config`.
///
/// # Errors
/// Pattern and init errors.
pub fn spec_at(config: &LoraConfig, site: &Linear) -> AdapterResult<LoraSpec> {
    let (r, alpha) = config.rank_alpha(site.path())?;
    Ok(LoraSpec {
        r,
        alpha,
        use_rslora: config.use_rslora,
        dropout: config.lora_dropout,
        init: config.init()?,
        use_dora: config.use_dora,
        lora_bias: config.lora_bias,
    })
}

/// Attaches one [`LoraLinear`] per site under `cx.name`, each built by `make(site, spec, rng)`. PiSSA/OLoRA
/// inits are refused on a site with a merged adapter (they rewrite the base).
///
/// # Errors
/// As `make`; a mutating init on a merged site.
pub fn attach_lora(
    config: &LoraConfig,
    sites: &[Linear],
    name: &str,
    seed: u64,
    mut make: impl FnMut(&Linear, LoraSpec, &mut rand::rngs::StdRng) -> AdapterResult<LoraLinear>,
) -> AdapterResult<LinearTuner<LoraLinear>> {
    let init = config.init()?;
    if init.mutates_base() {
        for site in sites {
            for a in site.adapters() {
                if site.is_merged(a.name())? {
                    return Err(not_supported(
                        name,
                        "LORA",
                        "init",
                        format!("{init:?} rewrites `{}`, which has a merged adapter", site.path()),
                    ));
                }
            }
        }
    }
    LinearTuner::attach(name, if config.use_dora { "DORA" } else { "LORA" }, sites, |site| {
        let spec = spec_at(config, site)?;
        make(site, spec, &mut site_rng(seed, name, site.path()))
    })
}

impl TunerConfig for LoraConfig {
    fn peft_type(&self) -> &str {
        "LORA"
    }
    fn describe(&self) -> String {
        let t = match &self.target_modules {
            Some(peft_core::adapter::ModulePattern::List(v)) => v.join(","),
            Some(peft_core::adapter::ModulePattern::Regex(s)) => s.clone(),
            None => "-".into(),
        };
        let kind = match (&self.init_lora_weights, self.use_dora) {
            (_, true) => "DoRA",
            (InitLoraWeights::Named(s), _) if s.starts_with("pissa") => "PiSSA",
            (InitLoraWeights::Named(s), _) if s == "olora" => "OLoRA",
            _ => "LoRA",
        };
        format!("{kind} r={} alpha={} on {t}", self.r, self.alpha())
    }
    fn to_json(&self) -> AdapterResult<Value> {
        serde_json::to_value(self).map_err(|e| AdapterError::config("LORA", "<config>", e.to_string()))
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
    fn trains_base_param(&self, name: &str, wrapped: &[String]) -> bool {
        name.ends_with(".bias")
            && match self.bias {
                Bias::None => false,
                Bias::All => true,
                Bias::LoraOnly => wrapped.iter().any(|w| name == format!("{w}.bias")),
            }
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        if self.needs_calibration() {
            return Err(AdapterError::Unsupported {
                method: "LORA".into(),
                what: format!("init_lora_weights = {:?}", self.init_lora_weights),
                reason:
                    "a data-driven init: use peft_lora::corda::CordaLoraConfig / peft_lora::eva::EvaLoraConfig with \
                         PeftModel::add_adapter_calibrated"
                        .into(),
            });
        }
        self.validate()?;
        let sites = lora_sites(model, self)?;
        let tuner = attach_lora(self, &sites, cx.name, cx.seed, |site, spec, rng| {
            Ok(LoraLinear::new(site.path(), cx.name, site.base().as_ref(), spec, rng)?)
        })?;
        if self.fan_in_fan_out {
            // Every peft-rs site is a linear layer storing [out, in]: PEFT resets the flag for such targets too.
            return Ok(Box::new(
                tuner.with_saved_config(Box::new(LoraConfig { fan_in_fan_out: false, ..self.clone() })),
            ));
        }
        Ok(Box::new(tuner))
    }
    fn needs_calibration(&self) -> bool {
        matches!(&self.init_lora_weights, InitLoraWeights::Named(s) if s == "corda" || s == "eva")
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.target_spec()?;
        for site in lora_sites(model, self)? {
            let (r, _) = self.rank_alpha(site.path())?;
            let key = format!("{}.lora_A.weight", site.path());
            let want = [r, site.in_features()];
            match file.shape(&key) {
                None => {
                    return Err(AdapterError::MissingTensor {
                        file: file.path().to_path_buf(),
                        key: format!("base_model.model.{key}"),
                    })
                }
                Some(s) if s != want => {
                    return Err(AdapterError::TensorShape {
                        file: file.path().to_path_buf(),
                        key: format!("base_model.model.{key}"),
                        expected: want.to_vec(),
                        found: s,
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
    fn for_loading(&self) -> AdapterResult<Box<dyn TunerConfig>> {
        let mut c = self.clone();
        match &self.init_lora_weights {
            InitLoraWeights::Named(s) if s == "corda" => {
                return Err(AdapterError::Unsupported {
                    method: "LORA".into(),
                    what: "init_lora_weights = \"corda\"".into(),
                    reason: "the adapter expects the residual base CorDA made from its calibration data, which cannot \
                             be replayed here; save it with save_mutated_as_lora (a plain LoRA for the original base)"
                        .into(),
                })
            }
            // EVA leaves the base alone: its A is in the file.
            InitLoraWeights::Named(s) if s == "eva" => c.init_lora_weights = InitLoraWeights::Bool(true),
            // PiSSA / OLoRA replay (the base becomes W_res); the plain inits are overwritten by the file anyway.
            _ => {}
        }
        Ok(Box::new(c))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for LoraConfig {
    const PEFT_TYPE: &'static str = "LORA";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, warnings) = LoraConfig::from_value(v.clone())?;
        // A CorDA/EVA-initialised adapter is read as LoRA (its init is handled by `for_loading`).
        let mut check = c.clone();
        if c.needs_calibration() {
            check.init_lora_weights = InitLoraWeights::Bool(true);
        }
        check.validate()?;
        Ok((c, warnings))
    }
}

/// LoRA's operations on a [`PeftModel`].
pub trait LoraModelExt {
    /// The LoRA layers of adapter `name` (site and adapter), in site order.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`]; [`AdapterError::NotSupportedBy`] when `name` is not a LoRA adapter.
    fn lora_layers(&self, name: &str) -> AdapterResult<Vec<(Linear, Arc<LoraLinear>)>>;

    /// Saves adapter `name`, trained from a base-mutating init (PiSSA, OLoRA, CorDA), as a plain LoRA adapter for
    /// the *original* base weights (PEFT's `path_initial_model_for_weight_conversion`): `A' = [A; A₀]`,
    /// `B' = [B, −B₀]`, rank and `rank_pattern` doubled, alpha (and `alpha_pattern`) doubled (× √2 under rsLoRA),
    /// `init_lora_weights = true`.
    ///
    /// # Errors
    /// [`AdapterError::NotSupportedBy`] when the adapter was not made by a base-mutating init; IO errors.
    fn save_mutated_as_lora(&self, dir: &Path, name: &str) -> AdapterResult<u64>;
}

impl<M: Module> LoraModelExt for PeftModel<M> {
    fn lora_layers(&self, name: &str) -> AdapterResult<Vec<(Linear, Arc<LoraLinear>)>> {
        let t = self.tuner(name)?;
        match t.as_any().downcast_ref::<LinearTuner<LoraLinear>>() {
            Some(lt) => Ok(lt.layers().to_vec()),
            None => Err(not_supported(name, t.kind(), "lora_layers", "not a LoRA adapter")),
        }
    }

    fn save_mutated_as_lora(&self, dir: &Path, name: &str) -> AdapterResult<u64> {
        let layers = self.lora_layers(name)?;
        let Some(cfg) = self.config(name)?.as_any().downcast_ref::<LoraConfig>() else {
            return Err(not_supported(name, "?", "save_mutated_as_lora", "not a LoRA adapter"));
        };
        let mut tensors = self.state_dict(name)?;
        for (site, l) in &layers {
            let Some((a0, b0)) = l.initial() else {
                return Err(not_supported(
                    name,
                    "LORA",
                    "save_mutated_as_lora",
                    format!("`{}` has no base-mutating init", site.path()),
                ));
            };
            let (a2, b2) =
                convert_mutated_to_lora(&l.lora_a().value().to_owned(), &l.lora_b().value().to_owned(), a0, b0)?;
            let p = format!("base_model.model.{}", site.path());
            tensors.insert(format!("{p}.lora_A.weight"), a2);
            tensors.insert(format!("{p}.lora_B.weight"), b2);
        }
        let mut cfg =
            LoraConfig { inference_mode: true, init_lora_weights: InitLoraWeights::Bool(true), ..cfg.clone() };
        let f = if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
        cfg.r *= 2;
        cfg.lora_alpha = num(cfg.alpha() * f);
        for v in cfg.rank_pattern.values_mut() {
            *v = (v.as_u64().unwrap_or(0) * 2).into();
        }
        for v in cfg.alpha_pattern.values_mut() {
            *v = Value::Number(num(v.as_f64().unwrap_or(f64::NAN) * f));
        }
        peft_core::adapter::files::write_adapter_files(&adapter_dir(dir, name), &cfg.to_json()?, &tensors)
    }
}

/// The init of `config` (for callers that need the parsed form).
///
/// # Errors
/// [`ConfigError::BadInit`] as an adapter error.
pub fn init_of(config: &LoraConfig) -> AdapterResult<Init> {
    Ok(config.init()?)
}

#[cfg(test)]
#[path = "tuner_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "tuner_io_tests.rs"]
mod io_tests;
