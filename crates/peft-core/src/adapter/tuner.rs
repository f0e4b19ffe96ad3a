//! The tuner abstraction: a [`TunerConfig`] is a method's configuration (plain data with PEFT's `peft_type`),
//! which injects one named adapter onto a model's sites and returns it as a [`Tuner`]: the injected adapter,
//! with its state dict, activation, merge/unmerge where the method defines them, and its training hooks.
//!
//! [`crate::adapter::PeftModel`] owns the model and drives tuners; a method crate implements the two traits and
//! nothing else (no container of its own).

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::ArrayD;

use crate::adapter::error::{AdapterError, AdapterResult};
use crate::adapter::report::LoadReport;
use crate::autograd::GradStore;
use crate::io::safetensors::SafeTensorsFile;
use crate::nn::Module;
use crate::param::Param;
use crate::tensor::Tensor;

/// Runs calibration batch `i` forward through the model and returns its loss, or `None` past the last batch. The
/// caller decides the mode; [`crate::train::calibration_ctx`] builds the evaluation-mode context with the token
/// mask set, which data-driven inits expect.
pub type Calibrate<'a> = dyn FnMut(usize) -> crate::Result<Option<Tensor>> + 'a;

/// What [`TunerConfig::inject`] gets besides the model.
pub struct InjectCx<'a> {
    /// The adapter's name (`"default"` unless the user names it).
    pub name: &'a str,
    /// Seed of the adapter's random initialisation.
    pub seed: u64,
    /// Calibration data for data-driven inits (CorDA, EVA, LoRA-SB); `None` when the caller has none.
    pub calib: Option<&'a mut Calibrate<'a>>,
    /// The model's own parameters (those present before any adapter was added).
    pub base_params: &'a [Param],
}

/// A method's configuration: plain data that serialises to PEFT's `adapter_config.json` and injects an adapter.
pub trait TunerConfig: Send + Sync + std::fmt::Debug + Any {
    /// PEFT's `peft_type` (`"LORA"`, `"IA3"`, ...; methods PEFT lacks use their own).
    fn peft_type(&self) -> &str;
    /// One line for reports (`"LoRA r=8 alpha=16 on query,value"`).
    fn describe(&self) -> String;
    /// The content of `adapter_config.json`.
    ///
    /// # Errors
    /// Serialisation errors.
    fn to_json(&self) -> AdapterResult<serde_json::Value>;
    /// Modules (PEFT's `modules_to_save`) trained and saved in full next to the adapter, with a copy per adapter.
    fn modules_to_save(&self) -> Vec<String> {
        Vec::new()
    }
    /// Sets `modules_to_save` (trainers add the task head here).
    ///
    /// # Errors
    /// [`AdapterError::Unsupported`] for a method without `modules_to_save` (the default).
    fn set_modules_to_save(&mut self, modules: Vec<String>) -> AdapterResult<()> {
        if modules.is_empty() {
            return Ok(());
        }
        Err(AdapterError::Unsupported {
            method: self.peft_type().into(),
            what: "modules_to_save".into(),
            reason: "this method has no modules_to_save".into(),
        })
    }
    /// PEFT's `inference_mode`: the adapter is loaded frozen.
    fn inference_mode(&self) -> bool;
    /// Sets `inference_mode` (saved configs have it set, as PEFT writes them).
    fn set_inference_mode(&mut self, on: bool);
    /// Whether base parameter `name` trains and is saved with the adapter (LoRA's `bias = "all"`, full
    /// fine-tuning); `wrapped` lists the module paths the adapter wraps. Default: none.
    fn trains_base_param(&self, name: &str, wrapped: &[String]) -> bool {
        let _ = (name, wrapped);
        false
    }
    /// The prefix of every tensor key in the adapter file (`"base_model.model."` as PEFT writes non-prompt
    /// adapters).
    fn key_prefix(&self) -> &str {
        "base_model.model."
    }
    /// Whether [`TunerConfig::inject`] needs calibration data.
    fn needs_calibration(&self) -> bool {
        false
    }
    /// Attaches adapter `cx.name` to `model`'s sites.
    ///
    /// # Errors
    /// Invalid config, no site matched, init errors. On error nothing stays attached.
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>>;
    /// Before an adapter is built to receive the tensors of `file` (loading): checks the config against the file
    /// (e.g. LoRA's rank against `lora_A`'s shape) so nothing is allocated for a config the file contradicts.
    ///
    /// # Errors
    /// The first contradiction found.
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        let _ = (model, file);
        Ok(())
    }
    /// The config that builds the adapter when loading saved weights (which then overwrite its tensors): by
    /// default this config. A method whose init rewrites the base weights (PiSSA) replays it here, so the saved
    /// adapter meets the base it was trained on; one whose init cannot be replayed without data refuses.
    ///
    /// # Errors
    /// [`AdapterError::Unsupported`] for an init that cannot be replayed.
    fn for_loading(&self) -> AdapterResult<Box<dyn TunerConfig>> {
        Ok(self.clone_box())
    }
    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn TunerConfig>;
    /// For downcasting to the concrete config.
    fn as_any(&self) -> &dyn Any;
}

impl Clone for Box<dyn TunerConfig> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// One injected adapter (one name) on a model.
pub trait Tuner: Send + Sync {
    /// The adapter's name.
    fn name(&self) -> &str;
    /// Every parameter of the adapter (trainable flags are set by [`crate::adapter::PeftModel`]).
    fn params(&self) -> Vec<Param>;
    /// The saved tensors: `(key relative to the model root, with the adapter name stripped, parameter)`.
    fn state_dict(&self) -> Vec<(String, Param)>;
    /// The config to store and save for this adapter when it differs from the one that injected it (a
    /// data-driven init records what it found: EVA's redistributed ranks, CorDA's init name). Default: `None`.
    fn saved_config(&self) -> Option<Box<dyn TunerConfig>> {
        None
    }
    /// The module paths PEFT wraps for this adapter (their own tensors are saved as `<path>.base_layer.<leaf>`).
    fn wrapped_modules(&self) -> Vec<String> {
        Vec::new()
    }
    /// Sets the adapter's tensors from `src` (the default reads every [`Tuner::state_dict`] entry).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        for (k, p) in self.state_dict() {
            p.set(src.get(&k, &p.shape())?)?;
        }
        Ok(())
    }
    /// Turns the adapter on or off on all its sites.
    fn set_active(&self, on: bool);
    /// Folds the adapter into the base weights (forward then skips it).
    ///
    /// # Errors
    /// [`AdapterError::NotSupportedBy`] when the method cannot merge (the default); merge errors. On error
    /// nothing stays merged.
    fn merge(&self) -> AdapterResult<()> {
        Err(AdapterError::NotSupportedBy {
            name: self.name().into(),
            method: self.kind().into(),
            op: "merge",
            reason: "the method defines no merge".into(),
        })
    }
    /// Takes a merge back.
    ///
    /// # Errors
    /// As [`Tuner::merge`].
    fn unmerge(&self) -> AdapterResult<()> {
        Err(AdapterError::NotSupportedBy {
            name: self.name().into(),
            method: self.kind().into(),
            op: "unmerge",
            reason: "the method defines no merge".into(),
        })
    }
    /// Whether the adapter is merged.
    fn is_merged(&self) -> bool {
        false
    }
    /// Removes the adapter from every site (unmerging first where merged, unless `keep_merged`).
    ///
    /// # Errors
    /// Site errors.
    fn detach(&self, keep_merged: bool) -> AdapterResult<()>;
    /// The method, for messages.
    fn kind(&self) -> &str;
    /// For downcasting to the concrete tuner (a method crate's extra operations on its own adapters).
    fn as_any(&self) -> &dyn Any;
    /// An auxiliary loss recorded by the last forward (MixLoRA's router losses), taken (cleared).
    ///
    /// # Errors
    /// Shape errors while summing per-layer terms.
    fn aux_loss(&self) -> crate::Result<Option<Tensor>> {
        Ok(None)
    }
    /// Rewrites the gradients of a step before clipping and the optimizer (ALLoRA's norm-scaled rates).
    ///
    /// # Errors
    /// Implementation-specific.
    fn transform_grads(&self, grads: GradStore) -> crate::Result<GradStore> {
        Ok(grads)
    }
    /// Called after each optimizer step (mask updates of sparse methods).
    ///
    /// # Errors
    /// Implementation-specific.
    fn after_step(&self, step: usize) -> crate::Result<()> {
        let _ = step;
        Ok(())
    }
    /// Bytes of optimizer state the tuner holds itself, for values it steps in [`Tuner::after_step`] rather than
    /// through the trainer's optimizer (sparse methods with their own O(k) AdamW); 0 for every tuner the
    /// trainer's optimizer steps. Memory reports add it to the trainer's optimizer state.
    fn state_bytes(&self) -> usize {
        0
    }
}

enum Backing {
    File(SafeTensorsFile),
    Map(BTreeMap<String, ArrayD<f32>>),
}

/// The tensors of an adapter file (or an in-memory state dict) as a tuner reads them: keys relative to the
/// model root (the file's `base_model.model.` prefix removed), shapes checked, every key used recorded so the
/// load report can list the unused ones.
pub struct AdapterTensors {
    backing: Backing,
    path: PathBuf,
    prefix: String,
    used: Mutex<Vec<String>>,
}

impl AdapterTensors {
    /// Opens `adapter_model.safetensors`-style file `path` whose keys start with `prefix`.
    ///
    /// # Errors
    /// IO errors.
    pub fn open(path: &Path, prefix: &str) -> AdapterResult<Self> {
        let file = SafeTensorsFile::open(path)?;
        Ok(AdapterTensors {
            backing: Backing::File(file),
            path: path.to_path_buf(),
            prefix: prefix.into(),
            used: Mutex::new(Vec::new()),
        })
    }

    /// An in-memory state dict with full keys (prefix included), named `origin` in messages.
    pub fn from_map(map: BTreeMap<String, ArrayD<f32>>, prefix: &str, origin: &str) -> Self {
        AdapterTensors {
            backing: Backing::Map(map),
            path: PathBuf::from(origin),
            prefix: prefix.into(),
            used: Mutex::new(Vec::new()),
        }
    }

    /// The file (or origin) for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Whether tensor `key` (relative) exists.
    pub fn contains(&self, key: &str) -> bool {
        let k = self.full(key);
        match &self.backing {
            Backing::File(f) => f.contains(&k),
            Backing::Map(m) => m.contains_key(&k),
        }
    }

    /// The shape of tensor `key` (relative), if present.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let k = self.full(key);
        match &self.backing {
            Backing::File(f) => f.shape(&k).ok().map(<[usize]>::to_vec),
            Backing::Map(m) => m.get(&k).map(|a| a.shape().to_vec()),
        }
    }

    /// Tensor `key` (relative) as f32, which must have shape `expected`; records it as used.
    ///
    /// # Errors
    /// [`AdapterError::MissingTensor`], [`AdapterError::TensorShape`], conversion errors.
    pub fn get(&self, key: &str, expected: &[usize]) -> AdapterResult<ArrayD<f32>> {
        let k = self.full(key);
        let missing = || AdapterError::MissingTensor { file: self.path.clone(), key: k.clone() };
        let found = self.shape(key).ok_or_else(missing)?;
        if found != expected {
            return Err(AdapterError::TensorShape {
                file: self.path.clone(),
                key: k,
                expected: expected.to_vec(),
                found,
            });
        }
        let v = match &self.backing {
            Backing::File(f) => f.get(&k)?,
            Backing::Map(m) => m.get(&k).cloned().ok_or_else(missing)?,
        };
        self.used.lock().unwrap_or_else(|p| p.into_inner()).push(k);
        Ok(v)
    }

    /// Records tensor `key` (relative) as applied, for a tuner that read it by other means than
    /// [`AdapterTensors::get`] (raw packed bytes, which `get` does not decode), so the load report lists it under
    /// `applied` rather than `unexpected`. A key the file does not hold is not recorded.
    pub fn mark_used(&self, key: &str) {
        if self.contains(key) {
            self.used.lock().unwrap_or_else(|p| p.into_inner()).push(self.full(key));
        }
    }

    /// Every full key in the file.
    pub fn keys(&self) -> Vec<String> {
        match &self.backing {
            Backing::File(f) => f.names().map(str::to_string).collect(),
            Backing::Map(m) => m.keys().cloned().collect(),
        }
    }

    /// Fills `report` with the keys used so far (applied) and the others (unexpected).
    pub fn report_into(&self, report: &mut LoadReport) {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for k in self.keys() {
            if used.contains(&k) {
                report.applied.push(k);
            } else {
                report.unexpected.push(k);
            }
        }
    }
}

/// Implements [`Tuner`] methods of a wrapper by forwarding them to the tuner in field `$field`, for tuners that
/// wrap another (a [`crate::adapter::LinearTuner`]) and change only some of its behaviour:
/// `forward_tuner!(inner => name, state_dict, merge);` inside `impl Tuner for X { .. }`. Forwardable: `name`,
/// `params`, `state_dict`, `wrapped_modules`, `saved_config`, `set_active`, `merge`, `unmerge`, `is_merged`,
/// `detach`, `kind`.
#[macro_export]
macro_rules! forward_tuner {
    ($field:ident => $($m:ident),+ $(,)?) => { $( $crate::forward_tuner!(@one $field $m); )+ };
    (@one $f:ident name) => { fn name(&self) -> &str { self.$f.name() } };
    (@one $f:ident params) => { fn params(&self) -> Vec<$crate::Param> { self.$f.params() } };
    (@one $f:ident state_dict) => {
        fn state_dict(&self) -> Vec<(String, $crate::Param)> { self.$f.state_dict() }
    };
    (@one $f:ident wrapped_modules) => { fn wrapped_modules(&self) -> Vec<String> { self.$f.wrapped_modules() } };
    (@one $f:ident saved_config) => {
        fn saved_config(&self) -> Option<Box<dyn $crate::adapter::TunerConfig>> { self.$f.saved_config() }
    };
    (@one $f:ident set_active) => { fn set_active(&self, on: bool) { self.$f.set_active(on) } };
    (@one $f:ident merge) => { fn merge(&self) -> $crate::adapter::AdapterResult<()> { self.$f.merge() } };
    (@one $f:ident unmerge) => { fn unmerge(&self) -> $crate::adapter::AdapterResult<()> { self.$f.unmerge() } };
    (@one $f:ident is_merged) => { fn is_merged(&self) -> bool { self.$f.is_merged() } };
    (@one $f:ident detach) => {
        fn detach(&self, keep_merged: bool) -> $crate::adapter::AdapterResult<()> { self.$f.detach(keep_merged) }
    };
    (@one $f:ident kind) => { fn kind(&self) -> &str { self.$f.kind() } };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_by_get_or_marked_are_applied_and_the_rest_unexpected() {
        let map: BTreeMap<String, ArrayD<f32>> =
            ["p.a", "p.b", "p.c"].iter().map(|k| (k.to_string(), ArrayD::zeros(ndarray::IxDyn(&[2])))).collect();
        let t = AdapterTensors::from_map(map, "p.", "mem");
        t.get("a", &[2]).unwrap();
        t.mark_used("b");
        t.mark_used("not-there");
        let mut r = LoadReport::default();
        t.report_into(&mut r);
        assert_eq!(r.applied, ["p.a", "p.b"]);
        assert_eq!(r.unexpected, ["p.c"]);
    }
}
