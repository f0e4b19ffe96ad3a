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
}

impl Ctx {
    /// Evaluation mode: no dropout.
    pub fn eval() -> Self {
        Ctx { train: false, rng: Mutex::new(StdRng::seed_from_u64(0)), adapter_names: None }
    }

    /// Training mode with a seeded dropout RNG.
    pub fn train(seed: u64) -> Self {
        Ctx { train: true, rng: Mutex::new(StdRng::seed_from_u64(seed)), adapter_names: None }
    }

    /// Routes sample `i` of the batch to adapter `names[i]` (`"__base__"`: base model only).
    pub fn with_adapter_names(mut self, names: Vec<String>) -> Self {
        self.adapter_names = Some(Arc::new(names));
        self
    }

    /// Runs `f` with exclusive access to the dropout RNG.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut g = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}
