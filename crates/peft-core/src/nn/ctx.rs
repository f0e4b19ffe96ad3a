//! The per-forward context: train/eval mode, the dropout RNG and per-sample adapter routing.

use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::SeedableRng;

/// Passed to every forward: whether dropout is active, its seeded RNG, and (for mixed-adapter batches) the
/// adapter name of each sample along the batch axis (`"__base__"` for none).
pub struct Ctx {
    /// Training mode (dropout on).
    pub train: bool,
    rng: Mutex<StdRng>,
    /// One adapter name per sample, or `None` to use each site's active adapters for every sample.
    pub adapter_names: Option<Arc<Vec<String>>>,
    /// One task id per sample along the batch axis, for task-routed adapters (Poly/MHR); `None` when unused.
    pub task_ids: Option<Arc<Vec<usize>>>,
}

impl Ctx {
    /// Evaluation mode: no dropout.
    pub fn eval() -> Self {
        Ctx { train: false, rng: Mutex::new(StdRng::seed_from_u64(0)), adapter_names: None, task_ids: None }
    }

    /// Training mode with a seeded dropout RNG.
    pub fn train(seed: u64) -> Self {
        Ctx { train: true, rng: Mutex::new(StdRng::seed_from_u64(seed)), adapter_names: None, task_ids: None }
    }

    /// Routes sample `i` of the batch to adapter `names[i]` (`"__base__"`: base model only).
    pub fn with_adapter_names(mut self, names: Vec<String>) -> Self {
        self.adapter_names = Some(Arc::new(names));
        self
    }

    /// Gives sample `i` of the batch the task id `ids[i]` (read by task-routed adapters such as Poly/MHR).
    pub fn with_task_ids(mut self, ids: Vec<usize>) -> Self {
        self.task_ids = Some(Arc::new(ids));
        self
    }

    /// Runs `f` with exclusive access to the dropout RNG.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut g = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}
