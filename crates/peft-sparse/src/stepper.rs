//! [`ValueStepper`]: how LT-SFT and SpIEL train their values themselves. The trainer's optimizer keys its state
//! by parameter and cannot follow entries that move when a mask changes, so these methods take their values'
//! gradients out of the step's gradients ([`ValueStepper::take`], in `transform_grads`) and update them after the
//! trainer's step ([`ValueStepper::apply`], in `after_step`) with a [`SparseAdamW`], which remaps its O(k) state
//! when indices change. The values get their own learning rate, linear schedule and gradient-norm clip (from the
//! method's config); the trainer's clip and schedule apply to the other trainable tensors (the head).

use std::sync::{Arc, Mutex};

use peft_core::autograd::GradStore;

use crate::adamw::{SparseAdamW, SparseAdamWConfig};
use crate::delta::SparseDelta;

/// Learning-rate factor: linear warmup over `warmup` steps, then linear decay to 0 at `total` (constant when
/// `total` is `None`).
pub fn linear_factor(step: usize, warmup: usize, total: Option<usize>) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    match total {
        Some(t) if t > warmup => ((t.saturating_sub(step)) as f64 / (t - warmup) as f64).clamp(0.0, 1.0),
        _ => 1.0,
    }
}

/// Stashed gradients and the optimizer of a self-trained sparse adapter.
pub struct ValueStepper {
    /// The optimizer (one slot per delta, in the tuner's order).
    pub opt: Mutex<SparseAdamW>,
    stash: Mutex<Vec<Option<Vec<f32>>>>,
    warmup: usize,
    total: Option<usize>,
    max_grad_norm: Option<f64>,
}

impl ValueStepper {
    /// A stepper for deltas of sizes `ks`.
    pub fn new(
        cfg: SparseAdamWConfig,
        ks: &[usize],
        warmup: usize,
        total: Option<usize>,
        max_grad_norm: Option<f64>,
    ) -> Self {
        ValueStepper {
            opt: Mutex::new(SparseAdamW::new(cfg, ks)),
            stash: Mutex::new(vec![None; ks.len()]),
            warmup,
            total,
            max_grad_norm,
        }
    }

    /// Removes the deltas' value gradients from `grads`, adding them to the stash (when `keep`) or dropping them.
    pub fn take(&self, deltas: &[Arc<SparseDelta>], mut grads: GradStore, keep: bool) -> GradStore {
        let mut stash = self.stash.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, d) in deltas.iter().enumerate() {
            let Some(g) = grads.remove(d.values().id()) else { continue };
            if !keep {
                continue;
            }
            let g: Vec<f32> = g.iter().copied().collect();
            match &mut stash[slot] {
                Some(acc) if acc.len() == g.len() => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                s => *s = Some(g),
            }
        }
        grads
    }

    /// Bytes held: optimizer state plus stashed gradients.
    pub fn state_bytes(&self) -> usize {
        let stash: usize =
            self.stash.lock().unwrap_or_else(|p| p.into_inner()).iter().flatten().map(|g| 4 * g.len()).sum();
        self.opt.lock().unwrap_or_else(|p| p.into_inner()).state_bytes() + stash
    }

    /// Clears the stash (the indices changed under it).
    pub fn clear(&self) {
        self.stash.lock().unwrap_or_else(|p| p.into_inner()).iter_mut().for_each(|s| *s = None);
    }

    /// Steps every delta with its stashed gradient (clipped by the global norm over the deltas), at the scheduled
    /// learning rate of step `step`; empties the stash. Returns the clip coefficient the gradients were multiplied
    /// by (1 when the norm is within `max_grad_norm` or there is no clip).
    pub fn apply(&self, deltas: &[Arc<SparseDelta>], step: usize) -> f64 {
        let mut stash = self.stash.lock().unwrap_or_else(|p| p.into_inner());
        let norm: f64 =
            stash.iter().flatten().flat_map(|g| g.iter()).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        let clip = match self.max_grad_norm {
            Some(c) if norm > c => (c / (norm + 1e-6)) as f32,
            _ => 1.0,
        };
        let mut opt = self.opt.lock().unwrap_or_else(|p| p.into_inner());
        let lr = opt.config().lr * linear_factor(step, self.warmup, self.total);
        for (slot, d) in deltas.iter().enumerate() {
            let Some(mut g) = stash[slot].take() else { continue };
            if !g.iter().all(|x| x.is_finite()) {
                continue;
            }
            if clip != 1.0 {
                g.iter_mut().for_each(|x| *x *= clip);
            }
            d.values().update(|v| {
                if let Some(vs) = v.as_slice_mut() {
                    opt.step(slot, vs, &g, lr);
                }
            });
        }
        f64::from(clip)
    }
}
