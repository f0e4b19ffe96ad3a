//! The per-forward context: train/eval mode, the dropout RNG, and a typed extension map for routing data
//! (per-sample adapter names, task ids, the token mask, or any type a method crate defines).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::SeedableRng;

/// One adapter name per sample along the batch axis (`"__base__"`: base model only), for mixed-adapter batches.
/// Read by every [`crate::nn::Linear`] site; build it through `PeftModel::mixed_batch` to have the names
/// checked against the model's adapters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterNames(pub Vec<String>);

/// One task id per sample along the batch axis, for task-routed adapters (Poly/MHR) and multi-task losses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskIds(pub Vec<usize>);

/// Which token positions are real (true) and which are padding (false), row-major `[batch, seq]`. Set by
/// calibration and by trainers so that statistics (EVA/CorDA covariances, router losses) skip padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMask {
    /// `[batch, seq]` flags, row-major.
    pub valid: Vec<bool>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
}

/// Per-token labels of a batch (`[batch, seq]`, row-major), for methods that skip positions by their label
/// (EVA's `use_label_mask` leaves out positions labelled `-100`, the value transformers' losses ignore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenLabels {
    /// `[batch, seq]` labels, row-major.
    pub labels: Vec<i64>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
}

impl TokenLabels {
    /// The labels for `rows` tokens of a flattened `[batch * seq, d]` activation, or `None` when the counts
    /// differ (as [`TokenMask::flags_for`]).
    pub fn labels_for(&self, rows: usize) -> Option<&[i64]> {
        (rows == self.labels.len()).then_some(self.labels.as_slice())
    }
}

/// Passed to every forward: whether dropout is active, its seeded RNG, and typed extensions.
///
/// ```
/// use peft_core::nn::{Ctx, TaskIds};
/// #[derive(Debug, PartialEq)]
/// struct Language(&'static str); // a method crate's own routing data
/// let ctx = Ctx::eval().with_task_ids(vec![0, 2]).with(Language("sw"));
/// assert_eq!(ctx.get::<TaskIds>(), Some(&TaskIds(vec![0, 2])));
/// assert_eq!(ctx.get::<Language>(), Some(&Language("sw")));
/// ```
pub struct Ctx {
    /// Training mode (dropout on).
    pub train: bool,
    rng: Mutex<StdRng>,
    ext: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("train", &self.train).field("extensions", &self.ext.len()).finish()
    }
}

impl Ctx {
    /// Evaluation mode: no dropout.
    pub fn eval() -> Self {
        Ctx { train: false, rng: Mutex::new(StdRng::seed_from_u64(0)), ext: HashMap::new() }
    }

    /// Training mode with a seeded dropout RNG.
    pub fn train(seed: u64) -> Self {
        Ctx { train: true, rng: Mutex::new(StdRng::seed_from_u64(seed)), ext: HashMap::new() }
    }

    /// Adds (or replaces) an extension value of type `T`.
    pub fn with<T: Any + Send + Sync>(mut self, value: T) -> Self {
        self.ext.insert(TypeId::of::<T>(), Arc::new(value));
        self
    }

    /// Adds (or replaces) an extension value in place.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.ext.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The extension value of type `T`, if set.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.ext.get(&TypeId::of::<T>()).and_then(|v| v.downcast_ref::<T>())
    }

    /// Removes the extension value of type `T`.
    pub fn remove<T: Any + Send + Sync>(&mut self) {
        self.ext.remove(&TypeId::of::<T>());
    }

    /// Routes sample `i` of the batch to adapter `names[i]` (`"__base__"`: base model only), as [`AdapterNames`].
    pub fn with_adapter_names(self, names: Vec<String>) -> Self {
        self.with(AdapterNames(names))
    }

    /// The per-sample adapter names, if set.
    pub fn adapter_names(&self) -> Option<&[String]> {
        self.get::<AdapterNames>().map(|a| a.0.as_slice())
    }

    /// Gives sample `i` of the batch the task id `ids[i]`, as [`TaskIds`].
    pub fn with_task_ids(self, ids: Vec<usize>) -> Self {
        self.with(TaskIds(ids))
    }

    /// The per-sample task ids, if set.
    pub fn task_ids(&self) -> Option<&[usize]> {
        self.get::<TaskIds>().map(|t| t.0.as_slice())
    }

    /// The token mask, if set.
    pub fn token_mask(&self) -> Option<&TokenMask> {
        self.get::<TokenMask>()
    }

    /// Runs `f` with exclusive access to the dropout RNG.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut g = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl TokenMask {
    /// A mask from per-row lengths: the first `len` positions of each row are real.
    pub fn from_lengths(lens: &[usize], seq: usize) -> Self {
        let valid = lens.iter().flat_map(|&l| (0..seq).map(move |t| t < l)).collect();
        TokenMask { valid, shape: [lens.len(), seq] }
    }

    /// The flags for `rows` tokens of a flattened `[batch * seq, d]` activation, or `None` when the counts
    /// differ (an activation of another shape, e.g. after pooling: then every row counts).
    pub fn flags_for(&self, rows: usize) -> Option<&[bool]> {
        (rows == self.valid.len()).then_some(self.valid.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_typed_and_replaceable() {
        let mut ctx = Ctx::eval().with_adapter_names(vec!["a".into()]);
        assert_eq!(ctx.adapter_names(), Some(&["a".to_string()][..]));
        assert!(ctx.task_ids().is_none());
        ctx.insert(TaskIds(vec![3]));
        ctx.insert(TaskIds(vec![4, 5]));
        assert_eq!(ctx.task_ids(), Some(&[4, 5][..]));
        ctx.remove::<TaskIds>();
        assert!(ctx.get::<TaskIds>().is_none());
        let m = TokenMask::from_lengths(&[2, 0], 3);
        assert_eq!(m.valid, [true, true, false, false, false, false]);
        assert!(m.flags_for(6).is_some() && m.flags_for(2).is_none());
    }
}
