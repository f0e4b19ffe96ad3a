//! SquareHead: sparse fine-tuning by gradual magnitude pruning (GMP) with per-layer L2 distillation from a dense
//! teacher.
//!
//! The student starts as a copy of the (task-fine-tuned) dense teacher. During fine-tuning its chosen weight
//! matrices are pruned by magnitude on a cubic schedule, and its loss is
//!
//! `L = h_ce · CE + h_kl · KL_T(student ‖ teacher) + h_sq · Σ_{l=1..L} MSE_l`,
//!
//! `MSE_l = mean((h_lˢ − h_lᵗ)²) / (mean((h_lᵗ)²) + ε)` over the non-padding tokens of the hidden states after
//! layer `l` (the embedding output, `hidden_states[0]`, is skipped), with ε the bf16 machine epsilon
//! ([`BF16_EPS`]). Normalising by the teacher's mean square makes every layer's term independent of that
//! layer's scale, so no layer dominates the sum.
//!
//! The pieces, all usable on their own:
//! - [`normalized_layer_mse`] / [`squarehead_loss`]: the differentiable distillation term (teacher constant);
//! - [`SquareheadLoss`]: the weighted total `h_ce·CE + h_kl·KL + h_sq·Σ MSE`;
//! - [`cubic_sparsity`] and [`GmpSchedule`]: the cubic sparsity schedule `s_t = s_f + (s_i − s_f)(1 − t/T)³`;
//! - [`magnitude_masks`]: the smallest-|w| entries pruned, per matrix or globally, masks only shrinking, ties
//!   broken by position;
//! - [`GmpPruner`]: records `m = (W ≠ 0)` for chosen parameters, prunes on the schedule and re-applies
//!   `W ← W ⊙ m` after every optimizer step.
//!
//! # Trainer integration
//! [`crate::squarehead_tuner::SquareheadConfig`] is the method (registry `squarehead-50/75/90`): the student
//! trains in full and the trainer's hooks run the [`GmpPruner`]. The distillation needs the teacher's hidden
//! states for each batch, so the caller's loss closure computes it: it runs the frozen teacher under [`no_grad`],
//! the student, and returns [`SquareheadLoss::total`]. `cargo xtask bench` does this with peft-models' BERT
//! (`forward_with_hidden_states`) and a dense teacher it fine-tunes first. The example below is the same loop by
//! hand, without the tuner:
//!
//! ```
//! use peft_core::nn::{named_params, Ctx, Linear, Module, RandomInit, Visitor, WeightSource};
//! use peft_core::{no_grad, AdamW, Optimizer, Tensor};
//! use peft_sparse::squarehead::{select_params, squarehead_loss, GmpPruner, GmpSchedule, PruneScope, BF16_EPS};
//!
//! struct Net(Linear, Linear);
//! impl Module for Net {
//!     fn visit(&self, v: &mut dyn Visitor) {
//!         self.0.visit(v);
//!         self.1.visit(v);
//!     }
//! }
//! impl Net {
//!     /// The hidden states after each layer, the input first (like `hidden_states`).
//!     fn hidden(&self, x: &Tensor) -> peft_core::Result<Vec<Tensor>> {
//!         let h1 = self.0.forward(x, &Ctx::eval())?.tanh();
//!         let h2 = self.1.forward(&h1, &Ctx::eval())?;
//!         Ok(vec![x.clone(), h1, h2])
//!     }
//! }
//! let init = RandomInit::new(0, 0.3);
//! let net = |seed| -> peft_core::Result<Net> {
//!     let init = RandomInit::new(seed, 0.3);
//!     Ok(Net(Linear::load("layer.0", 8, 8, true, &init)?, Linear::load("layer.1", 8, 8, true, &init)?))
//! };
//! let (teacher, student) = (net(1)?, net(1)?);
//! let x = Tensor::new(init.get("x", &[3, 8])?);
//! let params = select_params(&student, r"layer\.\d+\.weight")?;
//! for p in &params {
//!     p.set_trainable(true);
//! }
//! let schedule = GmpSchedule::new(0.0, 0.75, 0, 4, 1)?;
//! let mut pruner = GmpPruner::new(params.clone(), schedule, PruneScope::PerMatrix)?;
//! let mut opt = AdamW::with_lr(params, 1e-2, 0.0)?;
//! let target = no_grad(|| teacher.hidden(&x))?;
//! for step in 0..6 {
//!     let loss = squarehead_loss(&student.hidden(&x)?, &target, None, BF16_EPS)?;
//!     opt.step(&loss.backward()?)?;
//!     pruner.after_step(step)?;
//! }
//! assert_eq!(pruner.sparsity(), 0.75);
//! let w = named_params(&student)[0].value();
//! assert_eq!(w.iter().filter(|v| **v == 0.0).count(), 48);
//! # Ok::<(), peft_sparse::SparseError>(())
//! ```

use ndarray::{ArrayD, IxDyn};
use peft_core::nn::{named_params, Module};
use peft_core::{no_grad, Elem, Param, Tensor};
use regex::Regex;

use crate::error::{SparseError, SparseResult};
use crate::ramt::distill_kl;

/// The method name in messages.
const METHOD: &str = "squarehead";

/// bf16 machine epsilon, `2⁻⁷`: the ε in each layer's normaliser `mean((h_lᵗ)²) + ε`.
pub const BF16_EPS: f64 = 0.0078125;

/// `mean((s − t)²) / (mean(t²) + eps)` over the positions of `mask` that are `true` (all positions when `None`).
///
/// `student` and `teacher` are hidden states of one layer, `[..., hidden]` (e.g. `[batch, seq, hidden]`); `mask`
/// has their shape without the last axis (`[batch, seq]`, `true` for a real token). The teacher is a constant:
/// no gradient reaches it. With no real token the loss is `0`. Padding positions are weighted by zero, not
/// removed, so a non-finite value there still makes the loss non-finite.
///
/// # Errors
/// [`SparseError::ShapeMismatch`] for differing shapes or a mask of the wrong shape; [`SparseError::Config`] for
/// an `eps` that is negative or not finite.
pub fn normalized_layer_mse<E: Elem>(
    student: &Tensor<E>,
    teacher: &Tensor<E>,
    mask: Option<&ArrayD<bool>>,
    eps: f64,
) -> SparseResult<Tensor<E>> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(SparseError::config(METHOD, "eps", format!("{eps} must be finite and >= 0")));
    }
    let shape = student.shape().to_vec();
    if shape != teacher.shape() || shape.is_empty() {
        return Err(SparseError::ShapeMismatch {
            tensor: "squarehead hidden state".into(),
            expected: shape.clone(),
            found: teacher.shape().to_vec(),
        });
    }
    let hidden = shape[shape.len() - 1];
    let tokens_shape = &shape[..shape.len() - 1];
    // Per-token weights, 1 for a real token, broadcast over the hidden axis.
    let weights = match mask {
        Some(m) => {
            if m.shape() != tokens_shape {
                return Err(SparseError::ShapeMismatch {
                    tensor: "squarehead attention mask".into(),
                    expected: tokens_shape.to_vec(),
                    found: m.shape().to_vec(),
                });
            }
            let mut wshape = tokens_shape.to_vec();
            wshape.push(1);
            let w: Vec<E> = m.iter().map(|&b| if b { E::one() } else { E::zero() }).collect();
            Some(Tensor::new(
                ArrayD::from_shape_vec(IxDyn(&wshape), w)
                    .map_err(|e| SparseError::config(METHOD, "mask", format!("cannot shape the mask: {e}")))?,
            ))
        }
        None => None,
    };
    let tokens = match mask {
        Some(m) => m.iter().filter(|&&b| b).count(),
        None => tokens_shape.iter().product(),
    };
    let count = (tokens * hidden) as f64;
    if count == 0.0 {
        return Ok(student.mul_scalar(E::zero()).sum_all());
    }
    // The teacher's masked mean square, a constant.
    let teacher_ms = match mask {
        Some(m) => {
            let t = teacher.data();
            let slice = t.as_slice().ok_or_else(|| SparseError::config(METHOD, "teacher", "not contiguous"))?;
            slice
                .chunks(hidden.max(1))
                .zip(m.iter())
                .filter(|(_, &keep)| keep)
                .map(|(row, _)| row.iter().map(|v| v.f64() * v.f64()).sum::<f64>())
                .sum::<f64>()
        }
        None => teacher.data().iter().map(|v| v.f64() * v.f64()).sum::<f64>(),
    } / count;
    let target = Tensor::new(teacher.data().to_owned());
    let diff = student.sub(&target)?;
    let sq = match &weights {
        Some(w) => diff.square().mul(w)?,
        None => diff.square(),
    };
    Ok(sq.sum_all().mul_scalar(E::of(1.0 / (count * (teacher_ms + eps)))))
}

/// `Σ_{l=1..L} MSE_l`: [`normalized_layer_mse`] summed over the layers' hidden states, skipping index 0 (the
/// embedding output).
///
/// `student` and `teacher` are the models' `hidden_states` lists, `[embeddings, layer 1, ..., layer L]`.
///
/// # Errors
/// [`SparseError::LengthMismatch`] for lists of different lengths; as [`normalized_layer_mse`].
pub fn squarehead_loss<E: Elem>(
    student: &[Tensor<E>],
    teacher: &[Tensor<E>],
    mask: Option<&ArrayD<bool>>,
    eps: f64,
) -> SparseResult<Tensor<E>> {
    if student.len() != teacher.len() {
        return Err(SparseError::LengthMismatch {
            tensor: "squarehead hidden_states".into(),
            indices: student.len(),
            values: teacher.len(),
        });
    }
    let mut total = Tensor::scalar(E::zero());
    for (s, t) in student.iter().zip(teacher).skip(1) {
        total = total.add(&normalized_layer_mse(s, t, mask, eps)?)?;
    }
    Ok(total)
}

/// The weights of SquareHead's total loss (defaults: `h_ce = 1`, `h_kl = 0`, `h_sq = 1`, `T = 1`,
/// `eps = 2⁻⁷`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SquareheadLoss {
    /// Weight of the task cross-entropy.
    pub h_ce: f64,
    /// Weight of the logit distillation `KL_T(student ‖ teacher)`.
    pub h_kl: f64,
    /// Weight of the summed normalised layer MSE.
    pub h_sq: f64,
    /// Temperature of the logit distillation.
    pub temperature: f64,
    /// ε of each layer's normaliser.
    pub eps: f64,
}

impl Default for SquareheadLoss {
    fn default() -> Self {
        SquareheadLoss { h_ce: 1.0, h_kl: 0.0, h_sq: 1.0, temperature: 1.0, eps: BF16_EPS }
    }
}

impl SquareheadLoss {
    /// `h_ce·ce + h_kl·KL_T(student_logits ‖ teacher_logits) + h_sq·Σ MSE_l`. The KL term (peft-sparse's
    /// [`distill_kl`], teacher logits constant) is computed only when `h_kl ≠ 0`; the layer term only when
    /// `h_sq ≠ 0`.
    ///
    /// # Errors
    /// [`SparseError::Config`] for a weight that is not finite or a non-positive temperature; shape errors.
    #[allow(clippy::too_many_arguments)]
    pub fn total(
        &self,
        ce: &Tensor,
        student_logits: &Tensor,
        teacher_logits: &Tensor,
        student_hidden: &[Tensor],
        teacher_hidden: &[Tensor],
        mask: Option<&ArrayD<bool>>,
    ) -> SparseResult<Tensor> {
        for (field, v) in [("h_ce", self.h_ce), ("h_kl", self.h_kl), ("h_sq", self.h_sq)] {
            if !v.is_finite() {
                return Err(SparseError::config(METHOD, field, format!("{v} is not finite")));
            }
        }
        let mut total = ce.mul_scalar(self.h_ce as f32);
        if self.h_kl != 0.0 {
            let kl = distill_kl(student_logits, teacher_logits, self.temperature, 1.0)?;
            total = total.add(&kl.mul_scalar(self.h_kl as f32))?;
        }
        if self.h_sq != 0.0 {
            let sq = squarehead_loss(student_hidden, teacher_hidden, mask, self.eps)?;
            total = total.add(&sq.mul_scalar(self.h_sq as f32))?;
        }
        Ok(total)
    }
}

/// The cubic GMP schedule: `s_f + (s_i − s_f)(1 − t/T)³` with `t` clamped to `[0, T]` (`T = 0`: `s_f`).
///
/// Non-decreasing in `t` when `s_i ≤ s_f`; `s_i` at `t = 0`, exactly `s_f` at `t ≥ T`.
pub fn cubic_sparsity(t: usize, total: usize, initial: f64, final_sparsity: f64) -> f64 {
    if t >= total {
        return final_sparsity;
    }
    if t == 0 {
        return initial;
    }
    let frac = 1.0 - t as f64 / total as f64;
    let s = final_sparsity + (initial - final_sparsity) * frac * frac * frac;
    // Rounding must not step outside the interval the schedule moves in.
    s.clamp(initial.min(final_sparsity), initial.max(final_sparsity))
}

/// When and how far to prune: sparsity from `initial` at `start_step` to `final_sparsity` at `end_step` on the
/// cubic schedule, pruning every `every` steps in between (and at `end_step`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GmpSchedule {
    /// Sparsity at the first pruning step, in `[0, 1]`.
    pub initial: f64,
    /// Target sparsity, in `[initial, 1]`.
    pub final_sparsity: f64,
    /// The first pruning step.
    pub start_step: usize,
    /// The step at which `final_sparsity` is reached (`>= start_step`).
    pub end_step: usize,
    /// Steps between pruning steps (`>= 1`).
    pub every: usize,
}

impl GmpSchedule {
    /// A checked schedule.
    ///
    /// # Errors
    /// [`SparseError::Config`] for sparsities outside `[0, 1]` or decreasing, `end_step < start_step`, or
    /// `every == 0`.
    pub fn new(
        initial: f64,
        final_sparsity: f64,
        start_step: usize,
        end_step: usize,
        every: usize,
    ) -> SparseResult<Self> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(initial) {
            return Err(SparseError::config(METHOD, "initial_sparsity", format!("{initial} is not in [0, 1]")));
        }
        if !unit(final_sparsity) || final_sparsity < initial {
            return Err(SparseError::config(
                METHOD,
                "final_sparsity",
                format!("{final_sparsity} must be in [initial_sparsity = {initial}, 1]"),
            ));
        }
        if end_step < start_step {
            return Err(SparseError::config(
                METHOD,
                "end_step",
                format!("{end_step} is before start_step {start_step}"),
            ));
        }
        if every == 0 {
            return Err(SparseError::config(METHOD, "every", "must be at least 1"));
        }
        Ok(GmpSchedule { initial, final_sparsity, start_step, end_step, every })
    }

    /// The target sparsity if `step` is a pruning step, else `None`.
    pub fn target_at(&self, step: usize) -> Option<f64> {
        if step < self.start_step || step > self.end_step {
            return None;
        }
        let t = step - self.start_step;
        if step != self.end_step && !t.is_multiple_of(self.every) {
            return None;
        }
        Some(cubic_sparsity(t, self.end_step - self.start_step, self.initial, self.final_sparsity))
    }
}

/// Whether [`magnitude_masks`] ranks each matrix on its own or all matrices together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneScope {
    /// Each matrix pruned to the target sparsity.
    PerMatrix,
    /// The smallest entries over all matrices pruned, so that the total reaches the target.
    Global,
}

/// The number of entries pruned out of `n` at `sparsity`: `round(sparsity · n)`, clamped to `n`.
pub fn pruned_count(n: usize, sparsity: f64) -> usize {
    ((sparsity.clamp(0.0, 1.0) * n as f64).round() as usize).min(n)
}

/// New keep-masks after pruning `values` (one flat slice per matrix, `masks[i]` the current keep-mask of
/// `values[i]`) to `sparsity`.
///
/// Entries already pruned stay pruned (masks only shrink; when more are pruned than the target asks, nothing
/// more is). The rest are pruned in increasing `|w|`; ties by matrix, then flat position (the lower first), so
/// the result is deterministic. NaN magnitudes rank last (kept).
///
/// # Errors
/// [`SparseError::LengthMismatch`] when a mask's length differs from its matrix's; [`SparseError::Config`] for a
/// sparsity outside `[0, 1]`.
pub fn magnitude_masks(
    values: &[&[f32]],
    masks: &[Vec<bool>],
    sparsity: f64,
    scope: PruneScope,
) -> SparseResult<Vec<Vec<bool>>> {
    if !(0.0..=1.0).contains(&sparsity) {
        return Err(SparseError::config(METHOD, "sparsity", format!("{sparsity} is not in [0, 1]")));
    }
    if values.len() != masks.len() {
        return Err(SparseError::LengthMismatch { tensor: "masks".into(), indices: masks.len(), values: values.len() });
    }
    for (i, (v, m)) in values.iter().zip(masks).enumerate() {
        if v.len() != m.len() {
            return Err(SparseError::LengthMismatch {
                tensor: format!("matrix {i}"),
                indices: m.len(),
                values: v.len(),
            });
        }
    }
    match scope {
        PruneScope::PerMatrix => Ok(values
            .iter()
            .zip(masks)
            .map(|(v, m)| prune_group(&[v], std::slice::from_ref(m), sparsity).remove(0))
            .collect()),
        PruneScope::Global => Ok(prune_group(values, masks, sparsity)),
    }
}

/// Prunes the group jointly. Lengths are checked by the caller.
fn prune_group(values: &[&[f32]], masks: &[Vec<bool>], sparsity: f64) -> Vec<Vec<bool>> {
    let n: usize = values.iter().map(|v| v.len()).sum();
    let already: usize = masks.iter().map(|m| m.iter().filter(|&&k| !k).count()).sum();
    let target = pruned_count(n, sparsity);
    let mut out = masks.to_vec();
    if target <= already {
        return out;
    }
    // The kept entries as (|w|, matrix, position); the `target - already` smallest are pruned.
    let mut kept: Vec<(f32, usize, usize)> = Vec::with_capacity(n - already);
    for (i, (v, m)) in values.iter().zip(masks).enumerate() {
        for (j, (&w, &k)) in v.iter().zip(m).enumerate() {
            if k {
                kept.push((w.abs(), i, j));
            }
        }
    }
    let more = target - already;
    let order =
        |a: &(f32, usize, usize), b: &(f32, usize, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2));
    if more < kept.len() {
        kept.select_nth_unstable_by(more, order);
    }
    for &(_, i, j) in &kept[..more] {
        out[i][j] = false;
    }
    out
}

/// The parameters of `model` whose names fully match `pattern` (in visit order).
///
/// # Errors
/// [`SparseError::Config`] for an invalid regex or one that matches nothing.
pub fn select_params(model: &dyn Module, pattern: &str) -> SparseResult<Vec<Param>> {
    let re = Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| SparseError::config(METHOD, "target_parameters", format!("invalid regex: {e}")))?;
    let params: Vec<Param> = named_params(model).into_iter().filter(|p| re.is_match(p.name())).collect();
    if params.is_empty() {
        return Err(SparseError::config(METHOD, "target_parameters", format!("`{pattern}` matches no parameter")));
    }
    Ok(params)
}

/// Gradual magnitude pruning of chosen parameters: the keep-masks `m = (W ≠ 0)` recorded at construction,
/// shrunk on the schedule, and `W ← W ⊙ m` re-applied after every step.
pub struct GmpPruner {
    params: Vec<Param>,
    masks: Vec<Vec<bool>>,
    schedule: GmpSchedule,
    scope: PruneScope,
}

impl GmpPruner {
    /// Records the masks `W ≠ 0` of `params`.
    ///
    /// # Errors
    /// [`SparseError::Config`] when `params` is empty.
    pub fn new(params: Vec<Param>, schedule: GmpSchedule, scope: PruneScope) -> SparseResult<Self> {
        if params.is_empty() {
            return Err(SparseError::config(METHOD, "params", "no parameter to prune"));
        }
        let masks = params.iter().map(|p| p.value().iter().map(|&w| w != 0.0).collect()).collect();
        Ok(GmpPruner { params, masks, schedule, scope })
    }

    /// The pruned parameters.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The keep-masks, flat row-major, one per parameter.
    pub fn masks(&self) -> &[Vec<bool>] {
        &self.masks
    }

    /// The schedule.
    pub fn schedule(&self) -> GmpSchedule {
        self.schedule
    }

    /// The fraction of masked-out entries over all parameters.
    pub fn sparsity(&self) -> f64 {
        let n: usize = self.masks.iter().map(Vec::len).sum();
        let zeros: usize = self.masks.iter().map(|m| m.iter().filter(|&&k| !k).count()).sum();
        if n == 0 {
            0.0
        } else {
            zeros as f64 / n as f64
        }
    }

    /// Shrinks the masks to `sparsity` by magnitude (see [`magnitude_masks`]) and applies them.
    ///
    /// # Errors
    /// As [`magnitude_masks`].
    pub fn prune_to(&mut self, sparsity: f64) -> SparseResult<()> {
        let values: Vec<Vec<f32>> = self.params.iter().map(|p| p.value().iter().copied().collect()).collect();
        let views: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        self.masks = magnitude_masks(&views, &self.masks, sparsity, self.scope)?;
        self.apply_masks();
        Ok(())
    }

    /// `W ← W ⊙ m` on every parameter.
    pub fn apply_masks(&self) {
        for (p, m) in self.params.iter().zip(&self.masks) {
            no_grad(|| {
                p.update(|w| {
                    for (v, &keep) in w.iter_mut().zip(m) {
                        if !keep {
                            *v = 0.0;
                        }
                    }
                })
            });
        }
    }

    /// The hook for after optimizer step `step`: prunes when the schedule says so, then re-applies the masks.
    ///
    /// # Errors
    /// As [`magnitude_masks`].
    pub fn after_step(&mut self, step: usize) -> SparseResult<()> {
        match self.schedule.target_at(step) {
            Some(s) => self.prune_to(s),
            None => {
                self.apply_masks();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[path = "squarehead_tests.rs"]
mod tests;
