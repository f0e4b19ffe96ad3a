//! [`PeftModel`]: a model that owns its base model and any number of named adapters of any method, with PEFT's
//! model surface: add / set / disable / delete adapters, per-adapter `modules_to_save` copies, merge / unmerge,
//! `merge_and_unload`, and `save_pretrained` / `from_pretrained` in PEFT's folder layout.
//!
//! Forward goes through the model itself ([`std::ops::Deref`] to `M`): its sites route through the attached
//! adapters. The training hooks of the active adapters (auxiliary losses, gradient transforms, step hooks) are
//! reached through [`crate::train::TrainHooks`], which `PeftModel` implements, so a user's own loop trains every
//! method the way the bench does.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::Path;

use ndarray::ArrayD;

use crate::adapter::error::{AdapterError, AdapterResult};
use crate::adapter::files::{adapter_dir, read_config_json, write_adapter_files, WEIGHTS_NAME};
use crate::adapter::registry::ConfigRegistry;
use crate::adapter::report::LoadReport;
use crate::adapter::tuner::{AdapterTensors, InjectCx, Tuner, TunerConfig};
use crate::autograd::GradStore;
use crate::nn::{named_params, Ctx, Module};
use crate::param::Param;
use crate::tensor::Tensor;

/// The row name of a mixed batch that runs the base model only.
pub const BASE_ROW: &str = "__base__";

/// A calibration callback: `f(model, i)` runs calibration batch `i` forward and returns its loss, `None` past the
/// last batch.
pub type CalibFn<'a, M> = dyn FnMut(&M, usize) -> crate::Result<Option<Tensor>> + 'a;

struct Entry {
    name: String,
    config: Box<dyn TunerConfig>,
    tuner: Box<dyn Tuner>,
    /// This adapter's copy of each `modules_to_save` parameter (current when the adapter's copy is not the one
    /// loaded into the parameter; see `PeftModel::mts_loaded`).
    mts: Vec<(Param, ArrayD<f32>)>,
    /// Base parameters this adapter trains in place and saves (LoRA's bias rules, full fine-tuning).
    trained_base: Vec<Param>,
}

/// A base model `M` with adapters. See the module docs.
///
/// ```
/// use peft_core::adapter::{get_peft_model, DeltaConfig, PeftModel};
/// use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor};
/// use peft_core::Tensor;
///
/// struct Net(Linear);
/// impl Module for Net {
///     fn visit(&self, v: &mut dyn Visitor) {
///         self.0.visit(v);
///     }
/// }
/// let net = Net(Linear::load("proj", 4, 3, true, &RandomInit::new(0, 0.5))?);
/// let x = Tensor::ones(&[2, 4]);
/// let y0 = net.0.forward(&x, &Ctx::eval())?.to_vec();
/// let mut model = get_peft_model(net, DeltaConfig::bitfit())?; // BitFit: a delta on every bias
/// assert_eq!(model.trainable_params().len(), 1);
/// assert_eq!(model.0.forward(&x, &Ctx::eval())?.to_vec(), y0); // identity at init
/// model.trainable_params()[0].set(ndarray::ArrayD::ones(ndarray::IxDyn(&[3])))?;
/// let y1 = model.0.forward(&x, &Ctx::eval())?.to_vec();
/// let net = model.merge_and_unload()?; // the delta is folded into the bias
/// assert_eq!(net.0.forward(&x, &Ctx::eval())?.to_vec(), y1);
/// # Ok::<(), peft_core::adapter::AdapterError>(())
/// ```
pub struct PeftModel<M: Module> {
    model: M,
    base_params: Vec<Param>,
    adapters: Vec<Entry>,
    active: Vec<String>,
    disabled: bool,
    merged_order: Vec<String>,
    /// Original values of every parameter some adapter keeps a `modules_to_save` copy of.
    originals: Vec<(Param, ArrayD<f32>)>,
    /// The adapter whose `modules_to_save` copies are loaded into the parameters (`None`: the originals).
    mts_loaded: Option<String>,
    seed: u64,
}

/// Wraps `model` and adds `config` as adapter `"default"` (seed 0), active: PEFT's `get_peft_model`.
///
/// # Errors
/// As [`PeftModel::add_adapter`].
pub fn get_peft_model<M: Module>(model: M, config: impl TunerConfig) -> AdapterResult<PeftModel<M>> {
    PeftModel::new(model, config, "default", 0)
}

impl<M: Module> Deref for PeftModel<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.model
    }
}

fn module_of(pname: &str) -> &str {
    pname.rsplit_once('.').map_or("", |(m, _)| m)
}

/// PEFT's `modules_to_save` rule on a module path: the module is `t` or ends with `.t`; parameters of that
/// module or of its children belong to it.
fn in_saved_module(pname: &str, modules: &[String]) -> bool {
    let m = module_of(pname);
    modules.iter().any(|t| {
        m == t || m.ends_with(&format!(".{t}")) || m.starts_with(&format!("{t}.")) || m.contains(&format!(".{t}."))
    })
}

impl<M: Module> PeftModel<M> {
    /// Wraps `model` without adapters. Adapter init seeds derive from `seed`.
    pub fn wrap(model: M, seed: u64) -> Self {
        let base_params = named_params(&model);
        PeftModel {
            model,
            base_params,
            adapters: Vec::new(),
            active: Vec::new(),
            disabled: false,
            merged_order: Vec::new(),
            originals: Vec::new(),
            mts_loaded: None,
            seed,
        }
    }

    /// Wraps `model` and adds `config` as adapter `name`, active.
    ///
    /// # Errors
    /// As [`PeftModel::add_adapter`].
    pub fn new(model: M, config: impl TunerConfig, name: &str, seed: u64) -> AdapterResult<Self> {
        let mut me = Self::wrap(model, seed);
        me.add_adapter(name, config)?;
        me.set_adapter(name)?;
        Ok(me)
    }

    /// The base model (adapters attached: its forward runs them).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The seed adapter inits derive from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Sets the seed used by adapters added from now on.
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    /// Adds adapter `name` (inactive, as in PEFT; see [`PeftModel::set_adapter`]).
    ///
    /// # Errors
    /// [`AdapterError::AdapterExists`]; the config's errors (invalid values, no target matched, an init that needs
    /// calibration data).
    pub fn add_adapter(&mut self, name: &str, config: impl TunerConfig) -> AdapterResult<()> {
        self.add(name, Box::new(config), None)
    }

    /// [`PeftModel::add_adapter`] with a boxed config.
    ///
    /// # Errors
    /// As [`PeftModel::add_adapter`].
    pub fn add_adapter_boxed(&mut self, name: &str, config: Box<dyn TunerConfig>) -> AdapterResult<()> {
        self.add(name, config, None)
    }

    /// Adds adapter `name` whose init reads data: `calib(model, i)` runs calibration batch `i` forward and returns
    /// its loss, `None` past the last batch (see [`crate::train::calibration_ctx`] for the context to run it in).
    ///
    /// # Errors
    /// As [`PeftModel::add_adapter`], and the errors `calib` returns.
    pub fn add_adapter_calibrated(
        &mut self,
        name: &str,
        config: Box<dyn TunerConfig>,
        calib: &mut CalibFn<'_, M>,
    ) -> AdapterResult<()> {
        self.add(name, config, Some(calib))
    }

    fn add(
        &mut self,
        name: &str,
        config: Box<dyn TunerConfig>,
        calib: Option<&mut CalibFn<'_, M>>,
    ) -> AdapterResult<()> {
        if self.adapters.iter().any(|a| a.name == name) || name == BASE_ROW {
            return Err(AdapterError::AdapterExists { name: name.into() });
        }
        let model = &self.model;
        let tuner = match calib {
            Some(f) => {
                let mut run = |i: usize| f(model, i);
                let cx = InjectCx { name, seed: self.seed, calib: Some(&mut run), base_params: &self.base_params };
                config.inject(model, cx)?
            }
            None => {
                let cx = InjectCx { name, seed: self.seed, calib: None, base_params: &self.base_params };
                config.inject(model, cx)?
            }
        };
        let config = tuner.saved_config().unwrap_or(config);
        // modules_to_save: this adapter's copy starts from the original values (PEFT copies the module).
        let mts_names = config.modules_to_save();
        let mut mts = Vec::new();
        let saved: Vec<Param> =
            self.base_params.iter().filter(|p| in_saved_module(p.name(), &mts_names)).cloned().collect();
        for p in saved {
            let v = self.original_value(&p);
            mts.push((p, v));
        }
        if !mts_names.is_empty() && mts.is_empty() {
            let _ = tuner.detach(false);
            return Err(AdapterError::config(
                config.peft_type(),
                "modules_to_save",
                format!("{mts_names:?} match no module of the model"),
            ));
        }
        let wrapped = tuner.wrapped_modules();
        let trained_base = self
            .base_params
            .iter()
            .filter(|p| !in_saved_module(p.name(), &mts_names) && config.trains_base_param(p.name(), &wrapped))
            .cloned()
            .collect();
        self.adapters.push(Entry { name: name.into(), config, tuner, mts, trained_base });
        self.apply()
    }

    /// The original value of `p` (before any adapter's `modules_to_save` copy was loaded into it).
    fn original_value(&mut self, p: &Param) -> ArrayD<f32> {
        if let Some((_, v)) = self.originals.iter().find(|(q, _)| q.id() == p.id()) {
            return v.clone();
        }
        // Not recorded yet: no adapter's copy has ever been loaded into it, so its value is the original.
        let v = p.value().to_owned();
        self.originals.push((p.clone(), v.clone()));
        v
    }

    fn entry(&self, name: &str) -> AdapterResult<&Entry> {
        self.adapters.iter().find(|a| a.name == name).ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> AdapterError {
        AdapterError::UnknownAdapter { name: name.into(), have: self.adapter_names() }
    }

    /// The adapter names, in creation order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }

    /// The active adapter names.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// The config of adapter `name`.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`].
    pub fn config(&self, name: &str) -> AdapterResult<&dyn TunerConfig> {
        Ok(self.entry(name)?.config.as_ref())
    }

    /// The injected adapter `name`.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`].
    pub fn tuner(&self, name: &str) -> AdapterResult<&dyn Tuner> {
        Ok(self.entry(name)?.tuner.as_ref())
    }

    /// Makes `name` the only active adapter (and the only trainable one).
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`].
    pub fn set_adapter(&mut self, name: &str) -> AdapterResult<()> {
        self.set_adapters(&[name])
    }

    /// Activates several adapters at once (their effects add up in forward).
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`]; [`AdapterError::InvalidConfig`] when two of them keep their own copy of
    /// the same `modules_to_save` module (PEFT allows one).
    pub fn set_adapters(&mut self, names: &[&str]) -> AdapterResult<()> {
        for n in names {
            self.entry(n)?;
        }
        let with_mts: Vec<&&str> =
            names.iter().filter(|n| self.entry(n).map(|e| !e.mts.is_empty()).unwrap_or(false)).collect();
        if with_mts.len() > 1 {
            return Err(AdapterError::config(
                "PeftModel",
                "modules_to_save",
                format!("adapters {with_mts:?} each keep a copy of modules_to_save; only one can be active"),
            ));
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.apply()
    }

    /// Runs the base model only (adapters stay attached; `modules_to_save` modules go back to their originals).
    ///
    /// # Errors
    /// Never in practice (kept fallible for the `modules_to_save` swap).
    pub fn disable_adapters(&mut self) -> AdapterResult<()> {
        self.disabled = true;
        self.apply()
    }

    /// Undoes [`PeftModel::disable_adapters`].
    ///
    /// # Errors
    /// As [`PeftModel::disable_adapters`].
    pub fn enable_adapters(&mut self) -> AdapterResult<()> {
        self.disabled = false;
        self.apply()
    }

    /// Removes adapter `name` from every site (unmerging it first where merged); its `modules_to_save` copies go,
    /// and the original modules come back if they were its copies.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`]; site errors.
    pub fn delete_adapter(&mut self, name: &str) -> AdapterResult<()> {
        self.entry(name)?;
        self.stash_mts();
        if self.mts_loaded.as_deref() == Some(name) {
            self.load_mts(None)?;
        }
        let i = self.adapters.iter().position(|a| a.name == name).ok_or_else(|| self.unknown(name))?;
        self.adapters[i].tuner.detach(false)?;
        self.adapters.remove(i);
        self.active.retain(|a| a != name);
        self.merged_order.retain(|a| a != name);
        self.apply()
    }

    /// Writes the current values of the loaded `modules_to_save` copies back into their adapter's entry.
    fn stash_mts(&mut self) {
        let Some(cur) = self.mts_loaded.clone() else { return };
        if let Some(e) = self.adapters.iter_mut().find(|a| a.name == cur) {
            for (p, v) in &mut e.mts {
                *v = p.value().to_owned();
            }
        }
    }

    /// Loads adapter `to`'s copies (or the originals) into the `modules_to_save` parameters.
    fn load_mts(&mut self, to: Option<&str>) -> AdapterResult<()> {
        for (p, v) in &self.originals {
            p.set(v.clone())?;
        }
        if let Some(name) = to {
            if let Some(e) = self.adapters.iter().find(|a| a.name == name) {
                for (p, v) in &e.mts {
                    p.set(v.clone())?;
                }
            }
        }
        self.mts_loaded = to.map(str::to_string);
        Ok(())
    }

    /// Pushes the active set to the adapters, swaps `modules_to_save` copies and recomputes the trainable flags.
    fn apply(&mut self) -> AdapterResult<()> {
        let (disabled, active) = (self.disabled, self.active.clone());
        let on = move |a: &Entry| !disabled && active.contains(&a.name);
        for a in &self.adapters {
            a.tuner.set_active(on(a));
        }
        let want = if self.disabled {
            None
        } else {
            self.adapters.iter().find(|a| on(a) && !a.mts.is_empty()).map(|a| a.name.clone())
        };
        if want != self.mts_loaded {
            self.stash_mts();
            self.load_mts(want.as_deref())?;
        }
        for p in &self.base_params {
            p.set_trainable(false);
        }
        for a in &self.adapters {
            let train = on(a) && !a.config.inference_mode();
            for p in a.tuner.params() {
                p.set_trainable(train);
            }
            if train {
                for p in a.trained_base.iter().chain(a.mts.iter().map(|(p, _)| p)) {
                    p.set_trainable(true);
                }
            }
        }
        Ok(())
    }

    /// Merges the active adapters into the base weights (forward then skips them); adapters merged already are
    /// skipped.
    ///
    /// # Errors
    /// [`AdapterError::NotSupportedBy`] for a method that cannot merge; merge errors (a non-finite result leaves
    /// the weights untouched).
    pub fn merge_adapter(&mut self) -> AdapterResult<()> {
        let names: Vec<String> = self.active.clone();
        for n in names {
            let e = self.entry(&n)?;
            if e.tuner.is_merged() || self.merged_order.contains(&n) {
                continue;
            }
            e.tuner.merge()?;
            self.merged_order.push(n);
        }
        Ok(())
    }

    /// Unmerges every merged adapter, last merged first.
    ///
    /// # Errors
    /// Unmerge errors.
    pub fn unmerge_adapter(&mut self) -> AdapterResult<()> {
        while let Some(n) = self.merged_order.last().cloned() {
            self.entry(&n)?.tuner.unmerge()?;
            self.merged_order.pop();
        }
        Ok(())
    }

    /// The adapters merged, in merge order.
    pub fn merged_adapters(&self) -> &[String] {
        &self.merged_order
    }

    /// Merges the active adapters and removes every adapter: the base model with the merged weights (and the
    /// active adapter's `modules_to_save` copies, as PEFT keeps them).
    ///
    /// # Errors
    /// As [`PeftModel::merge_adapter`].
    pub fn merge_and_unload(mut self) -> AdapterResult<M> {
        self.merge_adapter()?;
        for a in &self.adapters {
            a.tuner.detach(true)?;
        }
        for p in &self.base_params {
            p.set_trainable(false);
        }
        Ok(self.model)
    }

    /// Removes every adapter without merging (merged ones are unmerged) and puts the original `modules_to_save`
    /// modules back: the base model as it was wrapped (base parameters trained in place, such as LoRA's
    /// `bias = "all"` or full fine-tuning, keep their trained values).
    ///
    /// # Errors
    /// Unmerge or site errors.
    pub fn into_base(mut self) -> AdapterResult<M> {
        self.unmerge_adapter()?;
        self.load_mts(None)?;
        for a in &self.adapters {
            a.tuner.detach(false)?;
        }
        for p in &self.base_params {
            p.set_trainable(false);
        }
        Ok(self.model)
    }

    /// The parameters the optimizer should update.
    pub fn trainable_params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.base_params.iter().filter(|p| p.trainable()).cloned().collect();
        for a in &self.adapters {
            v.extend(a.tuner.params().into_iter().filter(Param::trainable));
        }
        v
    }

    /// `(trainable, total)` parameter counts (PEFT's `get_nb_trainable_parameters`).
    pub fn param_counts(&self) -> (usize, usize) {
        let train = self.trainable_params().iter().map(Param::numel).sum();
        let adapters: usize = self.adapters.iter().flat_map(|a| a.tuner.params()).map(|p| p.numel()).sum();
        (train, adapters + self.base_params.iter().map(Param::numel).sum::<usize>())
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_summary(&self) -> String {
        let (t, n) = self.param_counts();
        format!("trainable params: {t} || all params: {n} || trainable%: {:.4}", 100.0 * t as f64 / n.max(1) as f64)
    }

    /// The model's own parameters (present before any adapter).
    pub fn base_params(&self) -> &[Param] {
        &self.base_params
    }

    /// The parameters of adapter `name`.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`].
    pub fn adapter_params(&self, name: &str) -> AdapterResult<Vec<Param>> {
        Ok(self.entry(name)?.tuner.params())
    }

    /// A context for a mixed batch: row `i` runs adapter `names[i]` (or [`BASE_ROW`]). As in PEFT, every name must
    /// be an adapter of this model and no adapter may be merged.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`] for a name that is no adapter; [`AdapterError::NotSupportedBy`] while an
    /// adapter is merged.
    pub fn mixed_batch(&self, ctx: Ctx, names: Vec<String>) -> AdapterResult<Ctx> {
        if let Some(n) = names.iter().find(|n| n.as_str() != BASE_ROW && self.entry(n).is_err()) {
            return Err(self.unknown(n));
        }
        if let Some(m) = self.merged_order.first() {
            return Err(AdapterError::NotSupportedBy {
                name: m.clone(),
                method: self.entry(m)?.config.peft_type().into(),
                op: "a mixed batch",
                reason: "it is merged; unmerge it first".into(),
            });
        }
        Ok(ctx.with_adapter_names(names))
    }

    /// The file keys and values adapter `name` saves (PEFT's `get_peft_model_state_dict`).
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`].
    pub fn state_dict(&self, name: &str) -> AdapterResult<BTreeMap<String, ArrayD<f32>>> {
        let e = self.entry(name)?;
        let prefix = e.config.key_prefix();
        let mut out = BTreeMap::new();
        for (k, p) in e.tuner.state_dict() {
            out.insert(format!("{prefix}{k}"), p.value().to_owned());
        }
        let loaded = self.mts_loaded.as_deref() == Some(name);
        for (p, v) in &e.mts {
            let val = if loaded { p.value().to_owned() } else { v.clone() };
            out.insert(format!("{prefix}{}", p.name()), val);
        }
        let wrapped = e.tuner.wrapped_modules();
        for p in &e.trained_base {
            out.insert(format!("{prefix}{}", base_key(p.name(), &wrapped)), p.value().to_owned());
        }
        Ok(out)
    }

    /// Saves every adapter (`"default"` into `dir`, others into `dir/<name>/`) with `inference_mode = true` in the
    /// config, as PEFT writes it; returns the bytes written.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> AdapterResult<u64> {
        let mut bytes = 0;
        for a in &self.adapters {
            let mut cfg = a.config.clone_box();
            cfg.set_inference_mode(true);
            bytes += write_adapter_files(&adapter_dir(dir, &a.name), &cfg.to_json()?, &self.state_dict(&a.name)?)?;
        }
        Ok(bytes)
    }

    /// Loads the adapter saved in `dir` (the folder holding `adapter_config.json`) as `name`, inactive. The
    /// config's `peft_type` must be one `registry` knows; the config is checked against the file before anything
    /// is allocated; a method whose init rewrote the base replays it (or refuses). Returns what was applied and
    /// what was not.
    ///
    /// # Errors
    /// Unreadable files; an unknown `peft_type`; invalid or unsupported config values; missing or mis-shaped
    /// tensors (nothing stays attached then).
    pub fn load_adapter(&mut self, dir: &Path, name: &str, registry: &ConfigRegistry) -> AdapterResult<LoadReport> {
        let (path, v) = read_config_json(dir)?;
        let (config, ignored) = registry.parse(&path, &v)?;
        let mut report = LoadReport { ignored_config: ignored, ..LoadReport::default() };
        let tensors = AdapterTensors::open(&dir.join(WEIGHTS_NAME), config.key_prefix())?;
        config.preflight(&self.model, &tensors)?;
        let build = config.for_loading()?;
        self.add(name, build, None)?;
        let loaded = (|| -> AdapterResult<()> {
            let e = self.entry(name)?;
            e.tuner.load_state_dict(&tensors)?;
            for (p, _) in &e.mts {
                let v = tensors.get(p.name(), &p.shape())?;
                p.set(v)?;
            }
            let wrapped = e.tuner.wrapped_modules();
            for p in &e.trained_base {
                let key = base_key(p.name(), &wrapped);
                if tensors.contains(&key) {
                    p.set(tensors.get(&key, &p.shape())?)?;
                }
            }
            Ok(())
        })();
        if let Err(err) = loaded {
            self.delete_adapter(name)?;
            return Err(err);
        }
        // The modules_to_save values were just written into the parameters: record them as this adapter's copy
        // and put back what the parameters held.
        let i = self.adapters.iter().position(|a| a.name == name).ok_or_else(|| self.unknown(name))?;
        let mut fresh = Vec::new();
        for (p, _) in &self.adapters[i].mts {
            fresh.push(p.value().to_owned());
        }
        for ((_, v), f) in self.adapters[i].mts.iter_mut().zip(fresh) {
            *v = f;
        }
        let current = self.mts_loaded.clone();
        self.load_mts(current.as_deref())?;
        self.adapters[i].config = config;
        tensors.report_into(&mut report);
        Ok(report)
    }

    /// Loads the adapter in `dir` onto `model` as `"default"`, active (PEFT's `PeftModel.from_pretrained`).
    ///
    /// # Errors
    /// As [`PeftModel::load_adapter`].
    pub fn from_pretrained(model: M, dir: &Path, registry: &ConfigRegistry) -> AdapterResult<(Self, LoadReport)> {
        let mut me = Self::wrap(model, 0);
        let report = me.load_adapter(dir, "default", registry)?;
        me.set_adapter("default")?;
        Ok((me, report))
    }
}

/// PEFT's key for a base parameter saved with an adapter: a parameter of a wrapped module is
/// `<module>.base_layer.<leaf>`.
fn base_key(pname: &str, wrapped: &[String]) -> String {
    match pname.rsplit_once('.') {
        Some((m, leaf)) if wrapped.iter().any(|w| w == m) => format!("{m}.base_layer.{leaf}"),
        _ => pname.to_string(),
    }
}

impl<M: Module> crate::train::TrainHooks for PeftModel<M> {
    fn aux_loss(&self) -> crate::Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for a in self.adapters.iter().filter(|a| !self.disabled && self.active.contains(&a.name)) {
            if let Some(l) = a.tuner.aux_loss()? {
                total = Some(match total {
                    Some(t) => t.add(&l)?,
                    None => l,
                });
            }
        }
        Ok(total)
    }

    fn transform_grads(&self, grads: GradStore) -> crate::Result<GradStore> {
        self.adapters
            .iter()
            .filter(|a| !self.disabled && self.active.contains(&a.name))
            .try_fold(grads, |g, a| a.tuner.transform_grads(g))
    }

    fn after_step(&self, step: usize) -> crate::Result<()> {
        self.adapters
            .iter()
            .filter(|a| !self.disabled && self.active.contains(&a.name))
            .try_for_each(|a| a.tuner.after_step(step))
    }
}

#[cfg(test)]
#[path = "peft_model_tests.rs"]
mod tests;
