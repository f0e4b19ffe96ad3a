//! Where layer constructors get their initial values: a checkpoint, a map, or seeded random init.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::nn::LinearBase;

/// A source of named initial values for parameters. Constructors ask for `(name, shape)`; a checkpoint-backed
/// source returns the stored tensor (an error when it is missing or has another shape), a random source makes one.
pub trait WeightSource {
    /// The tensor for `name`, which must have `shape`.
    ///
    /// # Errors
    /// [`Error::UnknownName`] when the source has no such tensor; [`Error::Shape`] when its shape differs.
    fn get(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>>;

    /// Like [`WeightSource::get`] for parameters that are initialised to a constant when absent (LayerNorm
    /// weight/bias in random init). Defaults to `get`.
    ///
    /// # Errors
    /// As [`WeightSource::get`].
    fn get_or(&self, name: &str, shape: &[usize], _fill: f32) -> Result<ArrayD<f32>> {
        self.get(name, shape)
    }

    /// True when the source holds `name` (optional tensors such as biases).
    fn contains(&self, name: &str) -> bool;

    /// A ready-made base for the linear site at module path `path` (`[out_f, in_f]` weight, plus an `[out_f]`
    /// bias when `bias`), or `Ok(None)` (the default) to let [`crate::nn::Linear::load`] build a dense one from
    /// `<path>.weight` / `<path>.bias`. Sources that hold linears in another form (a quantized checkpoint) or
    /// convert them while loading (quantizing layer by layer, never holding the dense model) answer here.
    ///
    /// # Errors
    /// Implementation-specific (missing or mis-shaped tensors, a corrupt quantized state).
    fn linear_base(&self, path: &str, in_f: usize, out_f: usize, bias: bool) -> Result<Option<Arc<dyn LinearBase>>> {
        let _ = (path, in_f, out_f, bias);
        Ok(None)
    }
}

/// Tensors held in a map (tests, converted checkpoints).
#[derive(Default, Clone)]
pub struct MapWeights(pub HashMap<String, ArrayD<f32>>);

impl WeightSource for MapWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let t = self.0.get(name).ok_or_else(|| Error::UnknownName { name: name.to_string() })?;
        if t.shape() != shape {
            return Err(Error::WeightShape {
                origin: "in-memory weights".into(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t.clone())
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// Seeded random init: normal(0, std) for matrices, `fill` for norms; every name exists.
pub struct RandomInit {
    rng: Mutex<StdRng>,
    std: f32,
}

impl RandomInit {
    /// Normal(0, `std`) init from `seed`.
    pub fn new(seed: u64, std: f32) -> Self {
        RandomInit { rng: Mutex::new(StdRng::seed_from_u64(seed)), std }
    }
}

impl WeightSource for RandomInit {
    fn get(&self, _name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let n = Normal::new(0.0, self.std)
            .map_err(|_| Error::arg("RandomInit", "std", self.std, "must be finite and >= 0"))?;
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ArrayD::from_shape_fn(IxDyn(shape), |_| n.sample(&mut *rng)))
    }
    fn get_or(&self, _name: &str, shape: &[usize], fill: f32) -> Result<ArrayD<f32>> {
        Ok(ArrayD::from_elem(IxDyn(shape), fill))
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
}
