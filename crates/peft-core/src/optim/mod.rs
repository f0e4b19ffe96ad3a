//! Optimizers, learning-rate schedules, gradient clipping and gradient accumulation.
//!
//! The optimizers follow PyTorch's single-tensor (`foreach=False`) code paths step for step, so a run can be
//! compared with `torch.optim` number for number:
//! - [`AdamW`]: `torch.optim.AdamW` (decoupled weight decay, bias correction, `eps` outside the square root);
//! - [`Sgd`]: `torch.optim.SGD` (momentum, dampening, Nesterov, L2 weight decay).
//!
//! Both take [`ParamGroup`]s, each with its own learning rate and weight decay, keep their per-parameter state
//! keyed by the parameter id, and update only parameters that are trainable *and* have a gradient in the
//! [`GradStore`] (PyTorch's `p.grad is None` skip: no weight decay either). A schedule drives the learning rate
//! through [`Optimizer::set_lr_factor`], which scales every group's base rate like PyTorch's `LambdaLR`.
//!
//! **Non-finite guard.** [`Optimizer::step`] first checks every gradient it would use; a NaN or infinity
//! returns [`Error::NonFinite`] naming the parameter (`"gradient of <name>"`) before any parameter or
//! optimizer state is touched, so training can skip the batch and continue from the last good state.
//! [`Optimizer::checked_step`] adds the same check for the loss (`"loss"`).
//!
//! **Resume.** [`Optimizer::state_dict`] exports the moments and step counts keyed by parameter *name*;
//! [`Optimizer::load_state_dict`] restores them into an optimizer built over the same parameters.
//!
//! ```
//! use ndarray::{arr2, ArrayD, IxDyn};
//! use peft_core::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Optimizer, ParamGroup, Schedule};
//! use peft_core::{Param, Tensor};
//!
//! let w = Param::new("head.weight", ArrayD::<f32>::zeros(IxDyn(&[1, 3])), true);
//! let b = Param::new("head.bias", ArrayD::<f32>::zeros(IxDyn(&[1])), true);
//! let groups = ParamGroup::decay_split(vec![w.clone(), b.clone()], 1e-2, 0.01);
//! let mut opt = AdamW::new(groups, AdamWConfig::default())?;
//! let sched = Schedule::linear(10, 100);
//! let x = Tensor::new(arr2(&[[1.0f32, 2.0, 3.0]]).into_dyn());
//! for step in 0..100 {
//!     let loss = x.linear(&w.tensor(), Some(&b.tensor()))?.add_scalar(-1.0).square().mean_all();
//!     let mut grads = loss.backward()?;
//!     let loss_value = loss.item()?;
//!     drop(loss); // frees the graph, so the step updates parameters in place instead of copying them
//!     clip_grad_norm(&mut grads, 1.0)?;
//!     opt.set_lr_factor(sched.lr_factor(step));
//!     opt.checked_step(loss_value, &grads)?;
//! }
//! # Ok::<(), peft_core::Error>(())
//! ```

pub mod accum;
pub mod adamw;
pub mod clip;
pub mod schedule;
pub mod sgd;

pub use accum::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use schedule::{LrSchedule, Schedule};
pub use sgd::{Sgd, SgdConfig};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use ndarray::{ArrayD, CowArray, IxDyn};
use rayon::prelude::*;
use regex::Regex;

use crate::autograd::GradStore;
use crate::backend::{wide, PAR_ELEMWISE};
use crate::elem::Elem;
use crate::error::{Error, Result, StateProblem};
use crate::param::Param;
use crate::tensor::TensorId;

/// A set of parameters that share a learning rate and a weight decay (PyTorch's `param_groups` entry).
#[derive(Clone, Debug)]
pub struct ParamGroup<E: Elem = f32> {
    /// The parameters (frozen ones are kept but skipped at each step while frozen).
    pub params: Vec<Param<E>>,
    /// Base learning rate, before the schedule's factor.
    pub lr: f64,
    /// Weight decay: decoupled for [`AdamW`], an L2 term added to the gradient for [`Sgd`].
    pub weight_decay: f64,
}

impl<E: Elem> ParamGroup<E> {
    /// A group.
    pub fn new(params: Vec<Param<E>>, lr: f64, weight_decay: f64) -> Self {
        ParamGroup { params, lr, weight_decay }
    }

    /// The usual two groups of a Hugging Face `Trainer`: `[decay, no_decay]`, where `no_decay` holds biases and
    /// normalization weights (see [`is_no_decay_name`]) with weight decay 0, and `decay` everything else with
    /// `weight_decay`. Both groups use `lr`; either may be empty.
    pub fn decay_split(params: Vec<Param<E>>, lr: f64, weight_decay: f64) -> Vec<Self> {
        let (no_decay, decay): (Vec<_>, Vec<_>) = params.into_iter().partition(|p| is_no_decay_name(p.name()));
        vec![ParamGroup::new(decay, lr, weight_decay), ParamGroup::new(no_decay, lr, 0.0)]
    }
}

/// True for parameter names that get no weight decay: biases and normalization-layer weights.
///
/// The rule is Hugging Face `Trainer.get_decay_parameter_names` applied to the lowercased name (patterns
/// `bias`, `layernorm`, `rmsnorm`, `(^|.)norm($|.)`, `_norm($|.)`), plus GPT-2 style `ln_*` modules and
/// numbered `norm1`/`norm2` modules, which HF catches by module type instead.
///
/// ```
/// use peft_core::optim::is_no_decay_name;
/// assert!(is_no_decay_name("encoder.layer.0.attention.output.LayerNorm.weight"));
/// assert!(is_no_decay_name("model.layers.0.input_layernorm.weight"));
/// assert!(is_no_decay_name("decoder.layers.1.self_attn_layer_norm.weight"));
/// assert!(is_no_decay_name("h.0.ln_1.weight"));
/// assert!(is_no_decay_name("classifier.bias"));
/// assert!(!is_no_decay_name("encoder.layer.0.attention.self.query.weight"));
/// assert!(!is_no_decay_name("model.layers.0.mlp.down_proj.lora_A.weight"));
/// ```
pub fn is_no_decay_name(name: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"bias|layernorm|rmsnorm|(?:^|\.)norm\d*(?:$|\.)|_norm(?:$|\.)|(?:^|\.)ln(?:_\w+)?\.")
            .expect("peft-rs bug: invalid no-decay regex")
    });
    re.is_match(&name.to_lowercase())
}

/// Optimizer state for one parameter: its own step count and named buffers (`exp_avg`, `momentum_buffer`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState<E: Elem = f32> {
    /// Number of updates applied to this parameter (AdamW's bias correction uses it).
    pub step: u64,
    /// Buffers by PyTorch's state key, each of the parameter's shape.
    pub buffers: BTreeMap<String, ArrayD<E>>,
}

/// A serializable snapshot of an optimizer's state, keyed by parameter name, for checkpoint/resume.
///
/// Hyperparameters are not part of it: they come from the code that builds the optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDict<E: Elem = f32> {
    /// The optimizer kind ("adamw", "sgd"); loading into another kind is an error.
    pub kind: String,
    /// Successful [`Optimizer::step`] calls.
    pub steps: u64,
    /// Per-parameter state; parameters that never got a gradient have no entry.
    pub params: BTreeMap<String, ParamState<E>>,
}

/// The interface shared by [`AdamW`] and [`Sgd`].
pub trait Optimizer<E: Elem = f32> {
    /// Applies one update to every trainable parameter that has a gradient in `grads`.
    ///
    /// Parameters are updated in place; a parameter whose value is still shared by a live tensor (the graph of
    /// the loss, for instance) is copied first, so drop the graph before stepping.
    ///
    /// # Errors
    /// [`Error::NonFinite`] naming the parameter when a gradient holds a NaN or infinity, [`Error::Shape`] when a
    /// gradient's shape differs from its parameter's, [`Error::Arg`] when the scheduled learning rate is
    /// negative or not finite. On error nothing (no parameter, no state) has changed.
    fn step(&mut self, grads: &GradStore<E>) -> Result<()>;

    /// [`Optimizer::step`] after checking that the loss is finite.
    ///
    /// # Errors
    /// [`Error::NonFinite`] with `what = "loss"` for a NaN or infinite loss (nothing changes), or any error of
    /// [`Optimizer::step`].
    fn checked_step(&mut self, loss: E, grads: &GradStore<E>) -> Result<()> {
        if !loss.is_finite() {
            return Err(Error::NonFinite { what: "loss".into() });
        }
        self.step(grads)
    }

    /// Sets the factor every group's base learning rate is multiplied by (a schedule's output).
    fn set_lr_factor(&mut self, factor: f64);

    /// The current learning-rate factor (1 until set).
    fn lr_factor(&self) -> f64;

    /// The parameter groups.
    fn groups(&self) -> &[ParamGroup<E>];

    /// Number of successful steps.
    fn steps(&self) -> u64;

    /// The state (moments and step counts) keyed by parameter name.
    fn state_dict(&self) -> StateDict<E>;

    /// Restores a state produced by [`Optimizer::state_dict`] on an optimizer of the same kind over parameters of
    /// the same names and shapes. Parameters absent from `state` start fresh.
    ///
    /// # Errors
    /// [`Error::OptimizerState`] for another optimizer kind or a missing buffer, [`Error::UnknownName`] for a parameter
    /// this optimizer does not hold, [`Error::Shape`] for a buffer of the wrong shape. On error the current state
    /// is kept.
    fn load_state_dict(&mut self, state: &StateDict<E>) -> Result<()>;

    /// Bytes of the state this optimizer holds: every buffer of [`Optimizer::state_dict`] at
    /// `size_of::<E>()` per entry, plus 8 per parameter's step counter (the figure the benches report as
    /// optimizer-state bytes).
    fn state_bytes(&self) -> usize {
        let elem = std::mem::size_of::<E>();
        self.state_dict().params.values().map(|s| 8 + s.buffers.values().map(|b| elem * b.len()).sum::<usize>()).sum()
    }
}

/// One parameter's update in a step: its gradient, effective learning rate and weight decay.
pub(crate) struct Update<'a, E: Elem> {
    pub(crate) param: &'a Param<E>,
    pub(crate) grad: &'a ArrayD<E>,
    pub(crate) lr: f64,
    pub(crate) weight_decay: f64,
}

/// Validated parameter groups plus the schedule factor: the part [`AdamW`] and [`Sgd`] share.
#[derive(Debug)]
pub(crate) struct Groups<E: Elem> {
    pub(crate) groups: Vec<ParamGroup<E>>,
    pub(crate) lr_factor: f64,
}

impl<E: Elem> Groups<E> {
    /// Checks rates and uniqueness: no parameter (by id or by name) may appear twice.
    pub(crate) fn new(op: &'static str, groups: Vec<ParamGroup<E>>) -> Result<Self> {
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for (i, g) in groups.iter().enumerate() {
            if !(g.lr.is_finite() && g.lr >= 0.0) {
                return Err(Error::arg(op, format!("group {i} lr"), g.lr, "must be finite and >= 0"));
            }
            if !(g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
                return Err(Error::arg(
                    op,
                    format!("group {i} weight_decay"),
                    g.weight_decay,
                    "must be finite and >= 0",
                ));
            }
            for p in &g.params {
                if !ids.insert(p.id()) {
                    return Err(Error::DuplicateParam { op, name: p.name().to_string() });
                }
                if !names.insert(p.name().to_string()) {
                    return Err(Error::DuplicateParam { op, name: p.name().to_string() });
                }
            }
        }
        Ok(Groups { groups, lr_factor: 1.0 })
    }

    /// The updates of one step, after checking every gradient (shape and finiteness). Nothing is mutated here,
    /// so an error leaves all state intact.
    pub(crate) fn plan<'a>(&'a self, op: &'static str, grads: &'a GradStore<E>) -> Result<Vec<Update<'a, E>>> {
        let mut plan = Vec::new();
        for (i, g) in self.groups.iter().enumerate() {
            let lr = g.lr * self.lr_factor;
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(Error::arg(op, format!("group {i} scheduled lr"), lr, "must be finite and >= 0"));
            }
            for p in &g.params {
                if !p.trainable() {
                    continue;
                }
                let Some(grad) = grads.get_id(p.id()) else { continue };
                let shape = p.shape();
                if grad.shape() != shape.as_slice() {
                    return Err(Error::Shape { op, lhs: shape, rhs: grad.shape().to_vec() });
                }
                if !all_finite(grad) {
                    return Err(Error::NonFinite { what: format!("gradient of {}", p.name()) });
                }
                plan.push(Update { param: p, grad, lr, weight_decay: g.weight_decay });
            }
        }
        Ok(plan)
    }

    /// Parameters by name.
    pub(crate) fn by_name(&self) -> HashMap<&str, &Param<E>> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|p| (p.name(), p)).collect()
    }

    /// Parameter names by id.
    pub(crate) fn names(&self) -> HashMap<TensorId, &str> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|p| (p.id(), p.name())).collect()
    }
}

/// Validates a state dict against the parameters and the expected buffers, returning (param, state) pairs.
pub(crate) fn check_state_dict<'a, E: Elem>(
    op: &'static str,
    kind: &str,
    buffers: &[&str],
    groups: &'a Groups<E>,
    state: &'a StateDict<E>,
) -> Result<Vec<(&'a Param<E>, &'a ParamState<E>)>> {
    if state.kind != kind {
        return Err(Error::OptimizerState {
            op,
            problem: StateProblem::Kind { found: state.kind.clone(), expected: kind.to_string() },
        });
    }
    let by_name = groups.by_name();
    let mut out = Vec::with_capacity(state.params.len());
    for (name, ps) in &state.params {
        let Some(p) = by_name.get(name.as_str()) else {
            return Err(Error::UnknownName { name: name.clone() });
        };
        let shape = p.shape();
        for b in buffers {
            let Some(buf) = ps.buffers.get(*b) else {
                return Err(Error::OptimizerState {
                    op,
                    problem: StateProblem::MissingBuffer { param: name.clone(), buffer: (*b).to_string() },
                });
            };
            if buf.shape() != shape.as_slice() {
                return Err(Error::Shape { op, lhs: shape, rhs: buf.shape().to_vec() });
            }
        }
        if let Some(extra) = ps.buffers.keys().find(|k| !buffers.contains(&k.as_str())) {
            return Err(Error::OptimizerState {
                op,
                problem: StateProblem::UnexpectedBuffer { param: name.clone(), buffer: extra.clone() },
            });
        }
        out.push((*p, ps));
    }
    Ok(out)
}

/// True when every element is finite (in parallel for large arrays).
pub(crate) fn all_finite<E: Elem>(a: &ArrayD<E>) -> bool {
    match a.as_slice_memory_order() {
        Some(s) if s.len() >= PAR_ELEMWISE => s.par_chunks(CHUNK).all(|c| c.iter().all(|x| x.is_finite())),
        Some(s) => s.iter().all(|x| x.is_finite()),
        None => a.iter().all(|x| x.is_finite()),
    }
}

/// Elements per parallel task in the fused update kernels.
pub(crate) const CHUNK: usize = 1 << 14;

/// The elements of `a` in row-major order as a slice: borrowed when `a` is standard layout, else copied.
pub(crate) fn row_major<E: Elem>(a: &ArrayD<E>) -> CowArray<'_, E, IxDyn> {
    a.as_standard_layout()
}

/// Row-major slice of an array the optimizer owns (parameter values, state buffers: always standard layout).
pub(crate) fn slice_mut<E: Elem>(a: &mut ArrayD<E>) -> &mut [E] {
    a.as_slice_mut().expect("peft-rs bug: parameter values and optimizer state are contiguous")
}

/// Runs `f(param, grad)` over equal-length slices, in parallel chunks when large.
pub(crate) fn fused0<E: Elem>(p: &mut [E], g: &[E], f: impl Fn(&mut E, E) + Sync + Send) {
    let run = |p: &mut [E], g: &[E]| wide(|| p.iter_mut().zip(g).for_each(|(p, &g)| f(p, g)));
    if p.len() >= PAR_ELEMWISE {
        p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(p, g)| run(p, g));
    } else {
        run(p, g);
    }
}

/// Runs `f(param, grad, buf)` over equal-length slices, in parallel chunks when large.
pub(crate) fn fused1<E: Elem>(p: &mut [E], g: &[E], a: &mut [E], f: impl Fn(&mut E, E, &mut E) + Sync + Send) {
    let run = |p: &mut [E], g: &[E], a: &mut [E]| {
        wide(|| p.iter_mut().zip(g).zip(a.iter_mut()).for_each(|((p, &g), a)| f(p, g, a)))
    };
    if p.len() >= PAR_ELEMWISE {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(a.par_chunks_mut(CHUNK))
            .for_each(|((p, g), a)| run(p, g, a));
    } else {
        run(p, g, a);
    }
}

/// Runs `f(param, grad, buf_a, buf_b)` over equal-length slices, in parallel chunks when large.
pub(crate) fn fused2<E: Elem>(
    p: &mut [E],
    g: &[E],
    a: &mut [E],
    b: &mut [E],
    f: impl Fn(&mut E, E, &mut E, &mut E) + Sync + Send,
) {
    let run = |p: &mut [E], g: &[E], a: &mut [E], b: &mut [E]| {
        wide(|| p.iter_mut().zip(g).zip(a.iter_mut()).zip(b.iter_mut()).for_each(|(((p, &g), a), b)| f(p, g, a, b)))
    };
    if p.len() >= PAR_ELEMWISE {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(a.par_chunks_mut(CHUNK))
            .zip(b.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), a), b)| run(p, g, a, b));
    } else {
        run(p, g, a, b);
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use ndarray::IxDyn;

    pub(crate) fn grads_for(pairs: &[(&Param<f32>, &[f32])]) -> GradStore<f32> {
        let mut gs = GradStore::default();
        for (p, g) in pairs {
            gs.insert(p.id(), ArrayD::from_shape_vec(IxDyn(&p.shape()), g.to_vec()).unwrap());
        }
        gs
    }

    pub(crate) fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= tol * w.abs().max(1e-3), "got {got:?}, want {want:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn p(name: &str) -> Param<f32> {
        Param::new(name, ArrayD::zeros(IxDyn(&[2])), true)
    }

    #[test]
    fn decay_split_separates_biases_and_norms() {
        let names = [
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.0.attention.self.query.bias",
            "embeddings.LayerNorm.weight",
            "model.norm.weight",
            "blocks.0.norm1.weight",
            "layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.lora_B.weight",
            "transformer.ln_f.weight",
            "normalizer.weight",
        ];
        let groups = ParamGroup::decay_split(names.iter().map(|n| p(n)).collect(), 1e-3, 0.1);
        let decay: Vec<&str> = groups[0].params.iter().map(|p| p.name()).collect();
        let no_decay: Vec<&str> = groups[1].params.iter().map(|p| p.name()).collect();
        assert_eq!(
            decay,
            [
                "encoder.layer.0.attention.self.query.weight",
                "model.layers.0.self_attn.q_proj.lora_B.weight",
                "normalizer.weight"
            ]
        );
        assert_eq!(no_decay.len(), 6);
        assert_eq!((groups[0].weight_decay, groups[1].weight_decay), (0.1, 0.0));
        assert_eq!((groups[0].lr, groups[1].lr), (1e-3, 1e-3));
    }

    #[test]
    fn duplicate_param_or_name_is_rejected() {
        let a = p("a");
        let dup =
            Groups::new("t", vec![ParamGroup::new(vec![a.clone()], 0.1, 0.0), ParamGroup::new(vec![a], 0.1, 0.0)]);
        assert!(matches!(dup, Err(Error::DuplicateParam { .. })));
        let same_name = Groups::new("t", vec![ParamGroup::new(vec![p("x"), p("x")], 0.1, 0.0)]);
        assert!(matches!(same_name, Err(Error::DuplicateParam { .. })));
        let neg_lr = Groups::new("t", vec![ParamGroup::new(vec![p("y")], -0.1, 0.0)]);
        assert!(matches!(neg_lr, Err(Error::Arg { .. })));
        let nan_wd = Groups::new("t", vec![ParamGroup::new(vec![p("z")], 0.1, f64::NAN)]);
        assert!(matches!(nan_wd, Err(Error::Arg { .. })));
    }
}
