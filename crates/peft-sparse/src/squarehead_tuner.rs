//! SquareHead as a method a trainer can run: [`SquareheadConfig`] makes every base parameter trainable (the
//! student is fine-tuned in full, as in the paper) and prunes the target weight matrices by magnitude on the cubic
//! schedule through the trainer's `after_step` hook ([`GmpPruner`]); the masks stay applied after every later step.
//!
//! What the tuner does not do, because a tuner cannot: the distillation. The loss
//! `h_ce·CE + h_kl·KL + h_sq·Σ MSE_l` needs the dense teacher's hidden states for every batch, so the caller's loss
//! closure computes it ([`SquareheadConfig::loss`] gives the weights, [`crate::squarehead::SquareheadLoss::total`]
//! the value), and the caller starts the student from the teacher's weights before injecting. `cargo xtask bench`
//! does both: it fine-tunes the dense teacher (the `full` method's recipe) once per task and seed, copies it into
//! the student, and distils from it.
//!
//! The schedule's end is given in steps (`prune_end_step`), so a config is bound to a run length; the bench sets
//! it to two thirds of its steps (the remaining third fine-tunes at the final sparsity, as GMP recipes do).
//!
//! **Measured** (`cargo xtask bench --tasks sst2 --methods squarehead-50,squarehead-75,squarehead-90 --seeds 3`,
//! MiniLM-L6, 1,000 examples, one epoch = 63 steps; `docs/bench/glue-sparse/`): dense teacher 78.4±0.6, 50%
//! 78.0±0.5, 75% 72.7±1.2, 90% 51.1±0.4 (chance). With three epochs (seed 0, `glue-sparse-e3/`): teacher 79.1,
//! 75% 75.7, 90% 71.0, so the 90% collapse is the short budget (21 steps after the last pruning step), not the
//! method. The same reports give the pruned matrices' CSR size and GEMM time against the dense kernel.
//!
//! **Saved state.** The trained base parameters, in full (like full fine-tuning: safetensors has no sparse
//! layout), with the pruned entries exactly zero; `cargo xtask bench` also reports the size the pruned matrices
//! take in CSR form. A folder loaded in inference mode is not pruned further; loaded for training, the pruner
//! records the saved zeros as its masks and keeps them.

use std::any::Any;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{not_supported, AdapterResult, InjectCx, ModulePattern, PeftConfig, Tuner, TunerConfig};
use peft_core::nn::Module;
use peft_core::{GradStore, Param};

use crate::error::SparseError;
use crate::squarehead::{GmpPruner, GmpSchedule, PruneScope, SquareheadLoss, BF16_EPS};
use crate::tuner::{common_config_impl, in_modules, parse, select_params, to_json, unknown_keys};

/// SquareHead's method config (`peft_type` `"SQUAREHEAD"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SquareheadConfig {
    /// Always `"SQUAREHEAD"`.
    pub peft_type: String,
    /// The weight matrices pruned (full match of a regex, or names / dotted suffixes).
    pub target_parameters: ModulePattern,
    /// Sparsity of the targets at the end of the schedule, in `[initial_sparsity, 1]`.
    pub final_sparsity: f64,
    /// Sparsity after the first pruning step (step 0), in `[0, 1]`.
    #[serde(default)]
    pub initial_sparsity: f64,
    /// The step at which `final_sparsity` is reached; required unless `inference_mode` (the registry leaves it
    /// unset and the trainer that knows the run length sets it).
    #[serde(default)]
    pub prune_end_step: Option<usize>,
    /// Steps between pruning steps (at least 1).
    #[serde(default = "default_every")]
    pub prune_every: usize,
    /// Whether each matrix reaches the sparsity on its own (`false`, the default) or over all targets together.
    #[serde(default)]
    pub global: bool,
    /// Weight of the task cross-entropy.
    #[serde(default = "one")]
    pub h_ce: f64,
    /// Weight of the logit distillation.
    #[serde(default)]
    pub h_kl: f64,
    /// Weight of the summed normalised per-layer MSE.
    #[serde(default = "one")]
    pub h_sq: f64,
    /// Temperature of the logit distillation.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_every() -> usize {
    2
}

fn one() -> f64 {
    1.0
}

impl SquareheadConfig {
    /// Prunes the parameters fully matching the regex `target` to `final_sparsity`, from 0 at step 0 to the final
    /// value at `prune_end_step` (every 2 steps), per matrix; loss weights `h_ce = 1`, `h_sq = 1`, `h_kl = 0`
    /// (the spec's defaults).
    pub fn new(target: &str, final_sparsity: f64, prune_end_step: Option<usize>) -> Self {
        SquareheadConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: ModulePattern::Regex(target.into()),
            final_sparsity,
            initial_sparsity: 0.0,
            prune_end_step,
            prune_every: default_every(),
            global: false,
            h_ce: 1.0,
            h_kl: 0.0,
            h_sq: 1.0,
            temperature: 1.0,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// The distillation loss weights.
    pub fn loss(&self) -> SquareheadLoss {
        SquareheadLoss {
            h_ce: self.h_ce,
            h_kl: self.h_kl,
            h_sq: self.h_sq,
            temperature: self.temperature,
            eps: BF16_EPS,
        }
    }

    /// The pruning schedule; `None` in inference mode (a loaded model is not pruned further).
    ///
    /// # Errors
    /// [`SparseError::Config`] as [`GmpSchedule::new`], and for a trainable config without `prune_end_step` (a
    /// run that would silently not prune).
    pub fn schedule(&self) -> Result<Option<GmpSchedule>, SparseError> {
        if self.inference_mode {
            return Ok(None);
        }
        let Some(end) = self.prune_end_step else {
            return Err(SparseError::config(
                Self::PEFT_TYPE,
                "prune_end_step",
                "not set: give the step at which the final sparsity is reached (e.g. 2/3 of the run's steps)",
            ));
        };
        GmpSchedule::new(self.initial_sparsity, self.final_sparsity, 0, end, self.prune_every).map(Some)
    }

    fn check(&self) -> Result<(), SparseError> {
        let t = Self::PEFT_TYPE;
        GmpSchedule::new(self.initial_sparsity, self.final_sparsity, 0, 0, self.prune_every)?;
        for (field, v) in [("h_ce", self.h_ce), ("h_kl", self.h_kl), ("h_sq", self.h_sq)] {
            if !v.is_finite() || v < 0.0 {
                return Err(SparseError::config(t, field, format!("{v} must be finite and non-negative")));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(SparseError::config(t, "temperature", format!("{} must be positive", self.temperature)));
        }
        Ok(())
    }
}

impl TunerConfig for SquareheadConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        let scope = if self.global { "global" } else { "per matrix" };
        format!(
            "SquareHead: GMP to {:.0}% ({scope}, cubic, every {} steps) + L2 layer distillation (h_ce {}, h_sq {}, h_kl {})",
            100.0 * self.final_sparsity,
            self.prune_every,
            self.h_ce,
            self.h_sq,
            self.h_kl
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn trains_base_param(&self, name: &str, _wrapped: &[String]) -> bool {
        !in_modules(name, &self.modules_to_save())
    }
    fn key_prefix(&self) -> &str {
        ""
    }
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let targets = select_params(Self::PEFT_TYPE, &self.target_parameters, &self.modules_to_save(), cx.base_params)?;
        if let Some(p) = targets.iter().find(|p| p.shape().len() != 2) {
            return Err(SparseError::config(
                Self::PEFT_TYPE,
                "target_parameters",
                format!("`{}` has shape {:?}; SquareHead prunes weight matrices", p.name(), p.shape()),
            )
            .into());
        }
        let scope = if self.global { PruneScope::Global } else { PruneScope::PerMatrix };
        let plan = self.schedule()?.map(|s| (s, scope));
        Ok(Box::new(SquareheadTuner { name: cx.name.into(), targets, plan, pruner: Mutex::new(None) }))
    }
    common_config_impl!();
}

impl PeftConfig for SquareheadConfig {
    const PEFT_TYPE: &'static str = "SQUAREHEAD";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "target_parameters",
            "final_sparsity",
            "initial_sparsity",
            "prune_end_step",
            "prune_every",
            "global",
            "h_ce",
            "h_kl",
            "h_sq",
            "temperature",
            "modules_to_save",
            "inference_mode",
        ];
        let ignored = unknown_keys(v, &known, Self::PEFT_TYPE);
        let c: Self = parse(v, Self::PEFT_TYPE)?;
        c.check()?;
        Ok((c, ignored))
    }
}

/// The tuner of [`SquareheadConfig`]: no parameters of its own (the base trains in place), the pruner behind the
/// trainer's hooks.
///
/// The pruner records its masks `W ≠ 0` at the first step's gradient hook (`transform_grads`, before the optimizer
/// moves anything), not at injection: weights loaded or copied in after injection (a saved pruned model trained
/// further, a teacher copied into the student) are what it sees.
pub struct SquareheadTuner {
    name: String,
    targets: Vec<Param>,
    plan: Option<(GmpSchedule, PruneScope)>,
    pruner: Mutex<Option<GmpPruner>>,
}

impl SquareheadTuner {
    /// The pruned matrices.
    pub fn targets(&self) -> &[Param] {
        &self.targets
    }

    /// The fraction of zero entries over the target matrices now.
    pub fn sparsity(&self) -> f64 {
        let (mut zeros, mut n) = (0usize, 0usize);
        for p in &self.targets {
            let v = p.value();
            zeros += v.iter().filter(|x| **x == 0.0).count();
            n += v.len();
        }
        if n == 0 {
            0.0
        } else {
            zeros as f64 / n as f64
        }
    }

    /// The sparsity the pruner's masks hold (`None` before the first step and in inference mode).
    pub fn mask_sparsity(&self) -> Option<f64> {
        self.pruner.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(GmpPruner::sparsity)
    }

    /// Runs `f` on the pruner, creating it (masks `W ≠ 0` now) on first use; nothing in inference mode.
    fn with_pruner(&self, f: impl FnOnce(&mut GmpPruner) -> Result<(), SparseError>) -> peft_core::Result<()> {
        let Some((schedule, scope)) = self.plan else { return Ok(()) };
        let mut guard = self.pruner.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(GmpPruner::new(self.targets.clone(), schedule, scope)?);
        }
        match guard.as_mut() {
            Some(p) => f(p).map_err(Into::into),
            None => Ok(()),
        }
    }
}

impl Tuner for SquareheadTuner {
    fn name(&self) -> &str {
        &self.name
    }
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        Vec::new()
    }
    fn set_active(&self, _on: bool) {}
    fn merge(&self) -> AdapterResult<()> {
        // The pruned, trained values are the base values already.
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        Err(not_supported(&self.name, SquareheadConfig::PEFT_TYPE, "unmerge", "the base weights were pruned in place"))
    }
    fn detach(&self, _keep_merged: bool) -> AdapterResult<()> {
        Ok(())
    }
    fn kind(&self) -> &str {
        SquareheadConfig::PEFT_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn transform_grads(&self, grads: GradStore) -> peft_core::Result<GradStore> {
        self.with_pruner(|_| Ok(()))?;
        Ok(grads)
    }
    fn after_step(&self, step: usize) -> peft_core::Result<()> {
        self.with_pruner(|p| p.after_step(step))
    }
}

#[cfg(test)]
#[path = "squarehead_tuner_tests.rs"]
mod tests;
