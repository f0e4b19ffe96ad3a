//! The training loop as a library: [`Trainer`] runs micro-batches through a caller's loss function and steps
//! AdamW with gradient accumulation, clipping and a learning-rate schedule, calling the method hooks
//! ([`TrainHooks`]: auxiliary losses, gradient transforms, step-boundary hooks) that [`crate::adapter::PeftModel`]
//! implements for its active adapters. Multi-task losses are combined by a [`LossWeighting`] (MFTCoder's token-,
//! sample- and task-balanced losses and CoBa's convergence-balanced task weights: [`mft`]). A non-finite loss or
//! gradient never reaches the parameters: by default training stops with [`TrainError::NonFinite`] and the
//! parameters keep the last good values. Checkpoints (trainable parameters, optimizer state, counters) are written
//! so that a crash leaves either the previous checkpoint or the new one ([`Trainer::save_checkpoint`]).
//!
//! A user's own loop calls the same pieces: `hooks.aux_loss()` after the forward, `hooks.transform_grads(..)`
//! after backward, `hooks.after_step(step)` after the optimizer, exactly as [`Trainer::micro_step`] does:
//!
//! ```
//! use peft_core::adapter::{get_peft_model, DeltaConfig};
//! use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor};
//! use peft_core::optim::{clip_grad_norm, AdamW, Optimizer};
//! use peft_core::train::TrainHooks;
//! use peft_core::Tensor;
//!
//! struct Net(Linear);
//! impl Module for Net {
//!     fn visit(&self, v: &mut dyn Visitor) {
//!         self.0.visit(v);
//!     }
//! }
//! let model = get_peft_model(Net(Linear::load("proj", 3, 2, true, &RandomInit::new(0, 0.5))?), DeltaConfig::bitfit())?;
//! let x = Tensor::ones(&[4, 3]);
//! let mut opt = AdamW::with_lr(model.trainable_params(), 0.1, 0.0)?;
//! for step in 0..5 {
//!     let ctx = Ctx::train(step as u64);
//!     let mut loss = model.0.forward(&x, &ctx)?.square().mean_all();
//!     if let Some(aux) = model.aux_loss()? {
//!         loss = loss.add(&aux)?; // router losses of MixLoRA, for instance
//!     }
//!     let mut grads = model.transform_grads(loss.backward()?)?; // ALLoRA's rescaling, for instance
//!     drop(loss);
//!     clip_grad_norm(&mut grads, 1.0)?;
//!     opt.step(&grads)?;
//!     model.after_step(step)?; // mask updates of sparse methods, for instance
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```
//! use peft_core::adapter::{get_peft_model, DeltaConfig};
//! use peft_core::nn::{Linear, Module, RandomInit, Visitor};
//! use peft_core::train::{Loss, Trainer, TrainerConfig};
//! use peft_core::Tensor;
//!
//! struct Net(Linear);
//! impl Module for Net {
//!     fn visit(&self, v: &mut dyn Visitor) {
//!         self.0.visit(v);
//!     }
//! }
//! let net = Net(Linear::load("proj", 3, 2, true, &RandomInit::new(0, 0.5))?);
//! let model = get_peft_model(net, DeltaConfig::bitfit())?;
//! let x = Tensor::ones(&[4, 3]);
//! let cfg = TrainerConfig { lr: 0.1, total_steps: 20, ..TrainerConfig::default() };
//! let mut trainer = Trainer::new(model.trainable_params(), &model, cfg)?;
//! let mut losses = Vec::new();
//! for _ in 0..20 {
//!     let r = trainer.step(|ctx| Ok(Loss::Single(model.0.forward(&x, ctx)?.square().mean_all())))?;
//!     losses.push(r.loss);
//! }
//! assert!(losses[19] < 0.5 * losses[0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod checkpoint;
pub mod mft;
mod weighting;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::autograd::GradStore;
use crate::nn::{Ctx, TokenMask};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule, Optimizer, ParamGroup, Schedule};
use crate::param::Param;
use crate::tensor::Tensor;

pub use weighting::{LossWeighting, StaticWeights, SumLosses};

/// The hooks a method needs around each step. [`crate::adapter::PeftModel`] implements them for its active
/// adapters; [`NoHooks`] does nothing.
pub trait TrainHooks {
    /// An auxiliary loss recorded by the last forward pass, to add to the task loss (taken: cleared).
    ///
    /// # Errors
    /// Shape errors while summing per-layer terms.
    fn aux_loss(&self) -> crate::Result<Option<Tensor>> {
        Ok(None)
    }
    /// Rewrites a step's gradients before clipping and the optimizer (ALLoRA).
    ///
    /// # Errors
    /// Implementation-specific.
    fn transform_grads(&self, grads: GradStore) -> crate::Result<GradStore> {
        Ok(grads)
    }
    /// Called after each optimizer step (mask updates).
    ///
    /// # Errors
    /// Implementation-specific.
    fn after_step(&self, step: usize) -> crate::Result<()> {
        let _ = step;
        Ok(())
    }
}

/// No hooks (plain models).
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// The evaluation-mode context calibration batches should run in (no dropout), with the token mask set so that
/// statistics skip padding.
pub fn calibration_ctx(mask: Option<TokenMask>) -> Ctx {
    match mask {
        Some(m) => Ctx::eval().with(m),
        None => Ctx::eval(),
    }
}

/// The learning-rate schedule shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// Linear warmup, then linear decay to 0 at `total_steps`.
    Linear,
    /// Linear warmup, then a half cosine to 0 at `total_steps`.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// What to do with a non-finite loss or gradient.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum NonFinitePolicy {
    /// Stop with [`TrainError::NonFinite`]; the parameters keep the last good values.
    Stop,
    /// Skip the step (nothing changes); stop with [`TrainError::Diverged`] after `max_in_a_row` consecutive
    /// skips or when more than `max_fraction` of `total_steps` were skipped.
    Skip {
        /// Consecutive skipped steps tolerated.
        max_in_a_row: usize,
        /// Fraction of the planned steps that may be skipped.
        max_fraction: f64,
    },
}

/// Hyper-parameters of a [`Trainer`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay, not applied to biases and norms ([`ParamGroup::decay_split`]).
    pub weight_decay: f64,
    /// Gradient-norm clip (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Warmup steps of the schedule.
    pub warmup_steps: usize,
    /// Planned optimizer steps (the schedule's length).
    pub total_steps: usize,
    /// Schedule shape.
    pub schedule: ScheduleKind,
    /// Micro-batches per optimizer step (their gradients are averaged).
    pub grad_accum: usize,
    /// Seed of the per-micro-batch dropout generators.
    pub seed: u64,
    /// Non-finite handling.
    pub non_finite: NonFinitePolicy,
    /// AdamW's betas and epsilon.
    pub betas: (f64, f64),
    /// AdamW's epsilon.
    pub eps: f64,
    /// Write a checkpoint into this folder every `checkpoint_every` steps during [`Trainer::fit`].
    pub checkpoint_dir: Option<PathBuf>,
    /// Steps between checkpoints (0: only at the end of `fit`).
    pub checkpoint_every: usize,
    /// Steps between evaluation callbacks in [`Trainer::fit`] (0: only at the end).
    pub eval_every: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            lr: 1e-3,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            total_steps: 1,
            schedule: ScheduleKind::Linear,
            grad_accum: 1,
            seed: 0,
            non_finite: NonFinitePolicy::Stop,
            betas: (0.9, 0.999),
            eps: 1e-8,
            checkpoint_dir: None,
            checkpoint_every: 0,
            eval_every: 0,
        }
    }
}

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A tensor, autodiff or optimizer error.
    #[error(transparent)]
    Core(#[from] crate::Error),
    /// A checkpoint file error.
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    /// A NaN or infinite loss or gradient under [`NonFinitePolicy::Stop`]; the parameters hold the values after
    /// step `step - 1`.
    #[error("step {step}: non-finite {what}; training stopped, parameters keep the last good values")]
    NonFinite {
        /// The step that failed.
        step: usize,
        /// What was non-finite.
        what: String,
    },
    /// Too many skipped steps under [`NonFinitePolicy::Skip`].
    #[error("training diverged: {skipped} non-finite steps ({in_a_row} in a row) by step {step}")]
    Diverged {
        /// The step reached.
        step: usize,
        /// Steps skipped in all.
        skipped: usize,
        /// Consecutive skips at the end.
        in_a_row: usize,
    },
    /// A checkpoint that does not fit this trainer (other parameters, a corrupt state file).
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An invalid trainer setting.
    #[error("trainer config: {0}")]
    Config(String),
    /// An error raised by a callback.
    #[error("callback: {0}")]
    Callback(String),
}

/// The loss of one micro-batch: a single loss or one per task (combined by the trainer's [`LossWeighting`]).
pub enum Loss {
    /// One loss.
    Single(Tensor),
    /// `(task id, loss)` pairs.
    Tasks(Vec<(usize, Tensor)>),
}

/// What one optimizer step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// The step's index (0-based; the schedule position).
    pub step: usize,
    /// Mean total loss over the step's micro-batches (task loss + auxiliary loss).
    pub loss: f64,
    /// Mean auxiliary loss, when a hook returned one.
    pub aux_loss: Option<f64>,
    /// Per-task mean losses (multi-task steps).
    pub task_losses: Vec<(usize, f64)>,
    /// Gradient norm before clipping (`NaN` when skipped).
    pub grad_norm: f64,
    /// Learning rate applied (peak × schedule factor).
    pub lr: f64,
    /// True when the step was skipped (non-finite, [`NonFinitePolicy::Skip`]).
    pub skipped: bool,
    /// Examples in the step, as told by the caller (`0` when unknown).
    pub examples: usize,
}

/// Called by [`Trainer::fit`] after each step and at evaluation points.
pub trait Observer {
    /// After each optimizer step.
    ///
    /// # Errors
    /// Stops the fit.
    fn on_step(&mut self, report: &StepReport) -> Result<(), TrainError> {
        let _ = report;
        Ok(())
    }
    /// Every `eval_every` steps and after the last step.
    ///
    /// # Errors
    /// Stops the fit.
    fn on_eval(&mut self, step: usize) -> Result<(), TrainError> {
        let _ = step;
        Ok(())
    }
}

/// An observer that does nothing.
pub struct Silent;

impl Observer for Silent {}

/// A terminal progress bar over the planned steps showing the running loss (feature `progress`; hidden when
/// stderr is not a terminal).
#[cfg(feature = "progress")]
pub struct ProgressObserver {
    bar: indicatif::ProgressBar,
    loss: f64,
    n: usize,
}

#[cfg(feature = "progress")]
impl ProgressObserver {
    /// A bar for `total_steps` steps labelled `label`.
    pub fn new(label: &str, total_steps: usize) -> Self {
        let bar = indicatif::ProgressBar::new(total_steps as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} [{elapsed_precise}]")
        {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_string());
        ProgressObserver { bar, loss: 0.0, n: 0 }
    }
}

#[cfg(feature = "progress")]
impl Observer for ProgressObserver {
    fn on_step(&mut self, r: &StepReport) -> Result<(), TrainError> {
        if !r.skipped {
            self.loss += r.loss;
            self.n += 1;
        }
        self.bar.set_position(r.step as u64 + 1);
        self.bar.set_message(format!("loss {:.4}", self.loss / self.n.max(1) as f64));
        Ok(())
    }
}

#[cfg(feature = "progress")]
impl Drop for ProgressObserver {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// The loop. See the module docs.
pub struct Trainer<'h> {
    cfg: TrainerConfig,
    opt: AdamW,
    params: Vec<Param>,
    hooks: &'h dyn TrainHooks,
    weighting: Box<dyn LossWeighting + 'h>,
    schedule: Schedule,
    step: usize,
    micro: usize,
    skipped: usize,
    in_a_row: usize,
    acc: Option<GradAccumulator>,
    pending: Pending,
}

#[derive(Default)]
struct Pending {
    loss: f64,
    aux: Option<f64>,
    tasks: Vec<(usize, f64, usize)>,
    non_finite: Option<String>,
    n: usize,
}

impl<'h> Trainer<'h> {
    /// A trainer over `params` (usually `PeftModel::trainable_params()`), calling `hooks`.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a zero `grad_accum`, a non-finite or negative rate; optimizer errors.
    pub fn new(params: Vec<Param>, hooks: &'h dyn TrainHooks, cfg: TrainerConfig) -> Result<Self, TrainError> {
        if cfg.grad_accum == 0 {
            return Err(TrainError::Config("grad_accum must be at least 1".into()));
        }
        if !cfg.lr.is_finite() || cfg.lr < 0.0 {
            return Err(TrainError::Config(format!("learning rate {} must be finite and >= 0", cfg.lr)));
        }
        if let Some(c) = cfg.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(TrainError::Config(format!("max_grad_norm {c} must be finite and > 0")));
            }
        }
        let groups = ParamGroup::decay_split(params.clone(), cfg.lr, cfg.weight_decay);
        let opt = AdamW::new(groups, AdamWConfig { betas: cfg.betas, eps: cfg.eps })?;
        let (w, t) = (cfg.warmup_steps, cfg.total_steps.max(1));
        let schedule = match cfg.schedule {
            ScheduleKind::Linear => Schedule::linear(w, t),
            ScheduleKind::Cosine => Schedule::cosine(w, t),
            ScheduleKind::Constant => Schedule::ConstantWithWarmup { warmup: w },
        };
        Ok(Trainer {
            cfg,
            opt,
            params,
            hooks,
            weighting: Box::new(SumLosses),
            schedule,
            step: 0,
            micro: 0,
            skipped: 0,
            in_a_row: 0,
            acc: None,
            pending: Pending::default(),
        })
    }

    /// Uses `w` to combine per-task losses.
    pub fn with_loss_weighting(mut self, w: Box<dyn LossWeighting + 'h>) -> Self {
        self.weighting = w;
        self
    }

    /// The config.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// Optimizer steps taken (skipped ones included: the schedule position).
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Steps skipped as non-finite.
    pub fn skipped_steps(&self) -> usize {
        self.skipped
    }

    /// The parameters trained.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The training context of the next micro-batch: dropout on, its generator seeded from the trainer seed and
    /// the micro-batch index (the same formula the bench always used).
    pub fn next_ctx(&self) -> Ctx {
        Ctx::train(self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(self.micro as u64))
    }

    /// Runs one micro-batch: `f(ctx)` computes its loss in training mode (it may add extensions to the context,
    /// such as the batch's [`TokenMask`]); the auxiliary loss of the hooks is
    /// added; backward; the hooks' gradient transform; accumulation. Every `grad_accum` micro-batches the
    /// optimizer steps (clip, schedule, step, `after_step` hook) and the step's report is returned.
    ///
    /// # Errors
    /// Errors of `f`, the hooks or the optimizer; [`TrainError::NonFinite`] / [`TrainError::Diverged`] as the
    /// policy says.
    pub fn micro_step(
        &mut self,
        f: impl FnOnce(&mut Ctx) -> crate::Result<Loss>,
    ) -> Result<Option<StepReport>, TrainError> {
        let mut ctx = self.next_ctx();
        self.micro += 1;
        let loss = f(&mut ctx)?;
        let (mut total, tasks) = match loss {
            Loss::Single(t) => (t, Vec::new()),
            Loss::Tasks(ts) => {
                let vals: Vec<(usize, f64)> =
                    ts.iter().map(|(k, t)| Ok((*k, f64::from(t.item()?)))).collect::<crate::Result<_>>()?;
                (self.weighting.combine(self.step, &ts)?, vals)
            }
        };
        let mut aux_v = None;
        if let Some(aux) = self.hooks.aux_loss()? {
            aux_v = Some(f64::from(aux.item()?));
            total = total.add(&aux)?;
        }
        let accum = self.cfg.grad_accum;
        if accum > 1 {
            total = total.mul_scalar(1.0 / accum as f32);
        }
        let lv = f64::from(total.item()?) * accum as f64;
        let p = &mut self.pending;
        p.n += 1;
        p.loss += lv;
        if let Some(a) = aux_v {
            *p.aux.get_or_insert(0.0) += a;
        }
        for (k, v) in tasks {
            match p.tasks.iter_mut().find(|(t, _, _)| *t == k) {
                Some(e) => {
                    e.1 += v;
                    e.2 += 1;
                }
                None => p.tasks.push((k, v, 1)),
            }
        }
        if !lv.is_finite() {
            p.non_finite.get_or_insert_with(|| "loss".into());
        } else if p.non_finite.is_none() {
            let grads = self.hooks.transform_grads(total.backward()?)?;
            drop(total);
            self.acc.get_or_insert_with(GradAccumulator::new).add(grads)?;
        }
        if self.pending.n < accum {
            return Ok(None);
        }
        self.finish_step().map(Some)
    }

    /// One optimizer step on one micro-batch per accumulation slot: calls [`Trainer::micro_step`] `grad_accum`
    /// times with `f`.
    ///
    /// # Errors
    /// As [`Trainer::micro_step`].
    pub fn step(&mut self, mut f: impl FnMut(&mut Ctx) -> crate::Result<Loss>) -> Result<StepReport, TrainError> {
        loop {
            if let Some(r) = self.micro_step(&mut f)? {
                return Ok(r);
            }
        }
    }

    fn finish_step(&mut self) -> Result<StepReport, TrainError> {
        let p = std::mem::take(&mut self.pending);
        let acc = self.acc.take();
        let n = p.n.max(1) as f64;
        let factor = self.schedule.lr_factor(self.step);
        self.opt.set_lr_factor(factor);
        let mut report = StepReport {
            step: self.step,
            loss: p.loss / n,
            aux_loss: p.aux.map(|a| a / n),
            task_losses: p.tasks.iter().map(|(k, s, c)| (*k, s / *c as f64)).collect(),
            grad_norm: f64::NAN,
            lr: self.cfg.lr * factor,
            skipped: false,
            examples: 0,
        };
        let mut problem = p.non_finite;
        if problem.is_none() {
            let mut grads = match acc {
                Some(a) => a.sum(),
                None => GradStore::default(),
            };
            let res = match self.cfg.max_grad_norm {
                Some(c) => clip_grad_norm(&mut grads, c),
                None => Ok(crate::optim::grad_norm(&grads)),
            };
            match res.and_then(|norm| {
                report.grad_norm = norm;
                self.opt.step(&grads)
            }) {
                Ok(()) => {}
                Err(crate::Error::NonFinite { what }) => problem = Some(what),
                Err(e) => return Err(e.into()),
            }
        }
        let step = self.step;
        self.step += 1;
        match problem {
            None => {
                self.in_a_row = 0;
                self.hooks.after_step(step)?;
            }
            Some(what) => match self.cfg.non_finite {
                NonFinitePolicy::Stop => return Err(TrainError::NonFinite { step, what }),
                NonFinitePolicy::Skip { max_in_a_row, max_fraction } => {
                    self.skipped += 1;
                    self.in_a_row += 1;
                    report.skipped = true;
                    let frac_hit = self.skipped as f64 > max_fraction * self.cfg.total_steps.max(10) as f64;
                    if self.in_a_row >= max_in_a_row || frac_hit {
                        return Err(TrainError::Diverged { step, skipped: self.skipped, in_a_row: self.in_a_row });
                    }
                }
            },
        }
        Ok(report)
    }

    /// Trains over `batches`: one micro-batch per item, `loss(batch, ctx)` its loss; `observer` sees every step
    /// report and the evaluation points; checkpoints as configured. Returns the reports.
    ///
    /// # Errors
    /// As [`Trainer::micro_step`]; observer and checkpoint errors.
    pub fn fit<B>(
        &mut self,
        batches: impl IntoIterator<Item = B>,
        mut loss: impl FnMut(&B, &mut Ctx) -> crate::Result<Loss>,
        observer: &mut dyn Observer,
    ) -> Result<Vec<StepReport>, TrainError> {
        let mut out = Vec::new();
        for b in batches {
            let Some(r) = self.micro_step(|ctx| loss(&b, ctx))? else { continue };
            observer.on_step(&r)?;
            let done = self.step;
            if self.cfg.eval_every > 0 && done.is_multiple_of(self.cfg.eval_every) {
                observer.on_eval(done)?;
            }
            if let (Some(dir), true) = (&self.cfg.checkpoint_dir, self.cfg.checkpoint_every > 0) {
                if done.is_multiple_of(self.cfg.checkpoint_every) {
                    let dir = dir.clone();
                    self.save_checkpoint(&dir)?;
                }
            }
            out.push(r);
        }
        if self.cfg.eval_every == 0 || !self.step.is_multiple_of(self.cfg.eval_every) {
            observer.on_eval(self.step)?;
        }
        if let Some(dir) = self.cfg.checkpoint_dir.clone() {
            self.save_checkpoint(&dir)?;
        }
        Ok(out)
    }

    /// The optimizer (for its state, or to inspect the learning-rate factor).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }
}

#[cfg(test)]
mod tests;
