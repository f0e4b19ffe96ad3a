//! The method registry interface: how a benchmark (or any trainer) applies a fine-tuning method to a model
//! without knowing which crate implements it.
//!
//! Each method crate exposes `methods() -> Vec<Box<dyn Method>>`; `peft-core` provides the three baselines that
//! need no adapter: full fine-tuning, head-only (linear probe) and BitFit. A trainer builds the model, marks its
//! task head trainable, calls [`Method::prepare`], trains [`Prepared::trainable`] and saves with
//! [`Prepared::save`].

use std::path::Path;

use crate::error::Result;
use crate::io::safetensors::write_safetensors;
use crate::nn::{named_params, Module};
use crate::param::Param;

/// A fine-tuning method as trainers see it.
pub trait Method: Send + Sync {
    /// Registry name (`"full"`, `"lora"`, `"dora"`, ...).
    fn name(&self) -> &str;
    /// One line for reports (e.g. `"LoRA r=8 alpha=16 on query,value"`).
    fn describe(&self) -> String;
    /// The learning rate this method is usually trained with (per-method defaults from the specs/papers).
    fn default_lr(&self) -> f64;
    /// Prepares `model` for training: attaches adapters and sets the trainable flag of base parameters.
    /// `head` names the task-head parameters, which stay trainable for every method.
    ///
    /// # Errors
    /// Method-specific (e.g. a target pattern that matches nothing).
    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>>;

    /// Sets the seed of the method's random initialisation (adapter weights, masks). Trainers call it with the
    /// run's seed before [`Method::prepare`], so runs with different seeds differ in their adapter init too. The
    /// default ignores it (methods without randomness).
    fn set_seed(&mut self, seed: u64) {
        let _ = seed;
    }

    /// Whether [`Method::prepare_calibrated`] uses the calibration data (data-driven inits such as CorDA, EVA or
    /// LoRA-SB). Trainers only build calibration batches when this is true.
    fn needs_calibration(&self) -> bool {
        false
    }

    /// Like [`Method::prepare`], for methods whose initialisation looks at data. `calib(i)` runs calibration batch
    /// `i` forward through `model` (as the trainer would during training, in training mode) and returns its loss,
    /// or `None` once the calibration set is exhausted. A method may install recording adapters on the sites
    /// before calling it (activation statistics), or call `backward` on the loss (gradient-based inits). The
    /// default ignores the data.
    ///
    /// # Errors
    /// As [`Method::prepare`], plus whatever `calib` returns.
    fn prepare_calibrated(
        &self,
        model: &dyn Module,
        head: &[Param],
        calib: &mut dyn FnMut(usize) -> Result<Option<crate::Tensor>>,
    ) -> Result<Box<dyn Prepared>> {
        let _ = calib;
        self.prepare(model, head)
    }
}

/// A method applied to one model.
pub trait Prepared {
    /// Parameters the optimizer updates (adapter weights, unfrozen base weights, head).
    fn trainable(&self) -> Vec<Param>;
    /// Writes what must be shipped to reproduce the fine-tune (adapter files, or the changed tensors) into `dir`
    /// and returns the bytes written.
    ///
    /// # Errors
    /// IO errors (as [`crate::Error::Invalid`] with the message).
    fn save(&self, dir: &Path) -> Result<u64>;

    /// An auxiliary loss recorded by the last forward pass that the trainer adds to the task loss (e.g. MixLoRA's
    /// router load-balance loss, already multiplied by its coefficient). Taking it clears it. Default: none.
    ///
    /// # Errors
    /// Shape errors while summing per-layer terms.
    fn take_aux_loss(&self) -> Result<Option<crate::Tensor>> {
        Ok(None)
    }

    /// Rewrites the gradients of a step before the trainer clips them and steps the optimizer (ALLoRA's
    /// norm-scaled learning rates, for instance). Default: unchanged.
    ///
    /// # Errors
    /// Implementation-specific.
    fn transform_grads(&self, grads: crate::GradStore) -> Result<crate::GradStore> {
        Ok(grads)
    }
}

/// Freezes every parameter of `model`, then unfreezes those for which `keep` is true and the head.
fn select(model: &dyn Module, head: &[Param], keep: impl Fn(&Param) -> bool) -> Vec<Param> {
    let mut out = Vec::new();
    for p in named_params(model) {
        let on = keep(&p) || head.iter().any(|h| h.id() == p.id());
        p.set_trainable(on);
        if on {
            out.push(p);
        }
    }
    for h in head {
        h.set_trainable(true);
        if !out.iter().any(|p| p.id() == h.id()) {
            out.push(h.clone());
        }
    }
    out
}

/// Saves parameters by name into `dir/model.safetensors` (atomically).
///
/// # Errors
/// [`crate::Error::Invalid`] carrying the IO error.
pub fn save_params(params: &[Param], dir: &Path) -> Result<u64> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::Invalid { op: "save", msg: format!("{}: {e}", dir.display()) })?;
    let path = dir.join("model.safetensors");
    let vals: Vec<(String, crate::tensor::Data<f32>)> =
        params.iter().map(|p| (p.name().to_string(), p.value())).collect();
    write_safetensors(&path, vals.iter().map(|(n, v)| (n.as_str(), v.view())), None)
        .map_err(|e| crate::Error::Invalid { op: "save", msg: e.to_string() })?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(bytes)
}

struct Selected(Vec<Param>);

impl Prepared for Selected {
    fn trainable(&self) -> Vec<Param> {
        self.0.clone()
    }
    fn save(&self, dir: &Path) -> Result<u64> {
        save_params(&self.0, dir)
    }
}

/// Full fine-tuning: every parameter trains.
pub struct FullFineTune;

impl Method for FullFineTune {
    fn name(&self) -> &str {
        "full"
    }
    fn describe(&self) -> String {
        "full fine-tuning (all parameters)".into()
    }
    fn default_lr(&self) -> f64 {
        // Twice the usual 5e-5: the bench's runs are short (about 60-200 steps).
        1e-4
    }
    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(Selected(select(model, head, |_| true))))
    }
}

/// Head only (linear probe): the backbone is frozen.
pub struct HeadOnly;

impl Method for HeadOnly {
    fn name(&self) -> &str {
        "head"
    }
    fn describe(&self) -> String {
        "head only (frozen backbone, linear probe)".into()
    }
    fn default_lr(&self) -> f64 {
        // A linear probe on frozen features tolerates a high rate; at 2e-3 it stayed at chance on SST-2 after 63
        // steps, at 1e-2 it reached 74.9 dev accuracy (MiniLM-L6, mean pooling).
        1e-2
    }
    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(Selected(select(model, head, |_| false))))
    }
}

/// BitFit (Ben Zaken et al., 2022): only bias terms (and the head) train.
pub struct BitFit;

impl Method for BitFit {
    fn name(&self) -> &str {
        "bitfit"
    }
    fn describe(&self) -> String {
        "BitFit (bias terms only)".into()
    }
    fn default_lr(&self) -> f64 {
        // BitFit trains few parameters and needs a high rate on short runs (Ben Zaken et al. use 1e-4..1e-3 for
        // many epochs); chosen for the bench's 60-200-step budgets.
        5e-3
    }
    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(Selected(select(model, head, |p| p.name().ends_with(".bias")))))
    }
}

/// The methods peft-core provides.
pub fn methods() -> Vec<Box<dyn Method>> {
    vec![Box::new(FullFineTune), Box::new(HeadOnly), Box::new(BitFit)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Linear, RandomInit, Visitor};

    struct Two(Linear, Linear);
    impl Module for Two {
        fn visit(&self, v: &mut dyn Visitor) {
            self.0.visit(v);
            self.1.visit(v);
        }
    }

    fn model() -> (Two, Vec<Param>) {
        let init = RandomInit::new(0, 0.1);
        let m = Two(Linear::load("a", 2, 2, true, &init).unwrap(), Linear::load("head", 2, 2, true, &init).unwrap());
        let head = m.1.base().params();
        (m, head)
    }

    #[test]
    fn baselines_select_the_right_parameters() {
        let names = |ps: Vec<Param>| ps.iter().map(|p| p.name().to_string()).collect::<Vec<_>>();
        let (m, head) = model();
        assert_eq!(names(FullFineTune.prepare(&m, &head).unwrap().trainable()).len(), 4);
        let (m, head) = model();
        assert_eq!(names(HeadOnly.prepare(&m, &head).unwrap().trainable()), vec!["head.weight", "head.bias"]);
        let (m, head) = model();
        assert_eq!(names(BitFit.prepare(&m, &head).unwrap().trainable()), vec!["a.bias", "head.weight", "head.bias"]);
        assert!(!m.0.base().params()[0].trainable());
    }

    #[test]
    fn save_writes_the_trainable_tensors() {
        let (m, head) = model();
        let prep = BitFit.prepare(&m, &head).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bytes = prep.save(dir.path()).unwrap();
        let f = crate::io::safetensors::SafeTensorsFile::open(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(bytes, std::fs::metadata(dir.path().join("model.safetensors")).unwrap().len());
    }
}
