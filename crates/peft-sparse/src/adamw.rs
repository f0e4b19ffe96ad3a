//! [`SparseAdamW`]: AdamW over the `k` values of sparse deltas with a per-entry `age` (SpIEL's SftAdamW), so
//! entries that join the mask late get their own bias correction, and its state is 12 bytes per tuned entry
//! (`exp_avg`, `exp_avg_sq` as f32, `age` as u32) whatever the model size.
//!
//! For entry `j` with gradient `g`, after `age ← age + 1`:
//! ```text
//! θ ← θ − lr·wd·θ
//! m ← β₁m + (1 − β₁)g      v ← β₂v + (1 − β₂)g²
//! θ ← θ − lr · m / ((√v + ε) · (1 − β₁^age) / √(1 − β₂^age))
//! ```
//! With `ε = 0` and equal ages this is exactly `torch.optim.AdamW`'s update.

use crate::indices::SparseIndices;

/// SftAdamW's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseAdamWConfig {
    /// Learning rate (before any schedule factor).
    pub lr: f64,
    /// Moment decay rates.
    pub betas: (f64, f64),
    /// Added to `√v` (SpIEL uses 1e-6).
    pub eps: f64,
    /// Decoupled weight decay, pulling the deltas toward zero (toward the pretrained weights).
    pub weight_decay: f64,
}

impl Default for SparseAdamWConfig {
    fn default() -> Self {
        SparseAdamWConfig { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-6, weight_decay: 0.0 }
    }
}

/// The optimizer state of one sparse delta: three k-vectors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseAdamState {
    /// First moments.
    pub exp_avg: Vec<f32>,
    /// Second moments.
    pub exp_avg_sq: Vec<f32>,
    /// Updates seen per entry.
    pub age: Vec<u32>,
}

impl SparseAdamState {
    /// Zero state for `k` entries.
    pub fn zeros(k: usize) -> Self {
        SparseAdamState { exp_avg: vec![0.0; k], exp_avg_sq: vec![0.0; k], age: vec![0; k] }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.exp_avg.len() + self.exp_avg_sq.len() + self.age.len())
    }
}

/// What a newly activated entry's state starts from: SpIEL seeds it from the gradients accumulated while it was a
/// regrowth candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seed {
    /// Mean gradient per optimizer step over the accumulation, in the scale the optimizer steps with.
    pub mean_grad: f32,
    /// Mean squared gradient per optimizer step, in the same scale.
    pub mean_sq: f32,
    /// Optimizer steps the accumulation spans (becomes the entry's age).
    pub age: u32,
}

/// AdamW over sparse-delta values with per-entry age; one [`SparseAdamState`] per delta ("slot").
#[derive(Clone, Debug)]
pub struct SparseAdamW {
    cfg: SparseAdamWConfig,
    states: Vec<SparseAdamState>,
}

impl SparseAdamW {
    /// Zero state for deltas of sizes `ks`.
    pub fn new(cfg: SparseAdamWConfig, ks: &[usize]) -> Self {
        SparseAdamW { cfg, states: ks.iter().map(|&k| SparseAdamState::zeros(k)).collect() }
    }

    /// The hyperparameters.
    pub fn config(&self) -> SparseAdamWConfig {
        self.cfg
    }

    /// The state of slot `slot`.
    pub fn state(&self, slot: usize) -> Option<&SparseAdamState> {
        self.states.get(slot)
    }

    /// Bytes of optimizer state (12 per entry).
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(SparseAdamState::bytes).sum()
    }

    /// One update of slot `slot`'s `values` with gradient `grad` at learning rate `lr` (ignored when the lengths
    /// disagree with the slot's state).
    pub fn step(&mut self, slot: usize, values: &mut [f32], grad: &[f32], lr: f64) {
        let Some(st) = self.states.get_mut(slot) else { return };
        if values.len() != st.age.len() || grad.len() != values.len() {
            return;
        }
        let (b1, b2) = self.cfg.betas;
        let decay = (1.0 - lr * self.cfg.weight_decay) as f32;
        let (w1, w2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let eps = self.cfg.eps as f32;
        for j in 0..values.len() {
            st.age[j] += 1;
            let a = f64::from(st.age[j]);
            let bc1 = 1.0 - b1.powf(a);
            let bc2_sqrt = (1.0 - b2.powf(a)).sqrt();
            let g = grad[j];
            let m = b1f * st.exp_avg[j] + w1 * g;
            let v = b2f * st.exp_avg_sq[j] + w2 * g * g;
            st.exp_avg[j] = m;
            st.exp_avg_sq[j] = v;
            let denom = (v.sqrt() + eps) * (bc1 / bc2_sqrt) as f32;
            values[j] = values[j] * decay - (lr as f32) * m / denom;
        }
    }

    /// Moves slot `slot`'s state from indices `old` to indices `new` (same tensor): entries present in both keep
    /// their state; new ones start from `seed(flat index)` (zero state when `None`).
    pub fn remap(
        &mut self,
        slot: usize,
        old: &SparseIndices,
        new: &SparseIndices,
        seed: impl Fn(usize) -> Option<Seed>,
    ) {
        let Some(st) = self.states.get_mut(slot) else { return };
        let (b1, b2) = self.cfg.betas;
        let mut next = SparseAdamState::zeros(new.len());
        for (j, flat) in new.iter().enumerate() {
            if let Some(i) = old.position(flat).filter(|&i| i < st.age.len()) {
                next.exp_avg[j] = st.exp_avg[i];
                next.exp_avg_sq[j] = st.exp_avg_sq[i];
                next.age[j] = st.age[i];
            } else if let Some(s) = seed(flat) {
                let a = f64::from(s.age);
                next.age[j] = s.age;
                next.exp_avg[j] = s.mean_grad * (1.0 - b1.powf(a)) as f32;
                next.exp_avg_sq[j] = s.mean_sq * (1.0 - b2.powf(a)) as f32;
            }
        }
        *st = next;
    }
}

#[cfg(test)]
#[path = "adamw_tests.rs"]
mod tests;
