//! What a sparse adapter costs: tuned entries, stored bytes (indices + values) and optimizer-state bytes.

use peft_core::optim::Optimizer;

use crate::tuner::SparseTuner;

/// The memory a sparse adapter holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseMemory {
    /// Entries tuned (Σ k).
    pub trainable_entries: usize,
    /// Bytes of the stored indices (4 or 8 per entry).
    pub index_bytes: usize,
    /// Bytes of the values (4 per entry).
    pub value_bytes: usize,
    /// Bytes of optimizer state the adapter holds itself (LT-SFT, SpIEL); see [`optimizer_state_bytes`] for the
    /// trainer's optimizer.
    pub own_state_bytes: usize,
}

/// The memory of `tuner`.
pub fn sparse_memory(tuner: &SparseTuner) -> SparseMemory {
    let mut m = SparseMemory { own_state_bytes: tuner.own_state_bytes(), ..SparseMemory::default() };
    for (_, d) in tuner.entries() {
        m.trainable_entries += d.k();
        m.index_bytes += d.indices().bytes();
        m.value_bytes += 4 * d.k();
    }
    m
}

/// Bytes of the state an optimizer holds (every buffer of its state dict, 4 bytes per f32 entry, plus 8 per
/// step counter): [`Optimizer::state_bytes`].
pub fn optimizer_state_bytes(opt: &impl Optimizer) -> usize {
    opt.state_bytes()
}

/// The O(k) bound for AdamW over `k` values in `tensors` tensors: two f32 moments per entry and a step counter
/// per tensor.
pub fn adamw_bytes_for(k: usize, tensors: usize) -> usize {
    8 * k + 8 * tensors
}
