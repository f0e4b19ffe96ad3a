//! Gradient accumulation: sum the gradients of several micro-batches, then average.

use ndarray::ArrayD;
use rayon::prelude::*;

use super::CHUNK;
use crate::autograd::GradStore;
use crate::backend::PAR_ELEMWISE;
use crate::elem::Elem;
use crate::error::{Error, Result};

/// Sums [`GradStore`]s across micro-batches and averages them, so `n` micro-batches of a mean loss give the
/// gradient of the mean loss over their union (for equal micro-batch sizes).
///
/// Gradients are matched by id, which is stable for [`crate::Param`] tensors across forward passes. A parameter
/// missing from some micro-batches contributes zero there (as PyTorch's `.grad` accumulation does). The first
/// store is taken over without copying.
///
/// ```
/// use peft_core::optim::GradAccumulator;
/// use peft_core::Param;
/// let w = Param::new("w", ndarray::arr1(&[1.0f32]).into_dyn(), true);
/// let mut acc = GradAccumulator::new();
/// for x in [1.0f32, 3.0] {
///     acc.add(w.tensor().mul_scalar(x).sum_all().backward()?)?;
/// }
/// let g = acc.mean()?;
/// assert_eq!(g.get_id(w.id()).unwrap()[[0]], 2.0);
/// # Ok::<(), peft_core::Error>(())
/// ```
pub struct GradAccumulator<E: Elem = f32> {
    sum: GradStore<E>,
    count: usize,
}

impl<E: Elem> Default for GradAccumulator<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Elem> GradAccumulator<E> {
    /// An empty accumulator.
    pub fn new() -> Self {
        GradAccumulator { sum: GradStore::default(), count: 0 }
    }

    /// Adds one micro-batch's gradients.
    ///
    /// # Errors
    /// [`Error::Shape`] when a gradient's shape differs from the one accumulated for the same id; nothing is added
    /// then.
    pub fn add(&mut self, grads: GradStore<E>) -> Result<()> {
        if self.count == 0 {
            self.sum = grads;
            self.count = 1;
            return Ok(());
        }
        for (id, g) in grads.iter() {
            if let Some(acc) = self.sum.get_id(*id) {
                if acc.shape() != g.shape() {
                    return Err(Error::Shape {
                        op: "GradAccumulator::add",
                        lhs: acc.shape().to_vec(),
                        rhs: g.shape().to_vec(),
                    });
                }
            }
        }
        let mut grads = grads;
        let ids: Vec<_> = grads.iter().map(|(id, _)| *id).collect();
        for id in ids {
            let g = grads.remove(id).expect("peft-rs bug: id listed by the store");
            match self.sum.remove(id) {
                Some(mut acc) => {
                    add_assign(&mut acc, &g);
                    self.sum.insert(id, acc);
                }
                None => self.sum.insert(id, g),
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Number of micro-batches added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// True before the first [`GradAccumulator::add`].
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The summed gradients (for losses already divided by the number of micro-batches).
    pub fn sum(self) -> GradStore<E> {
        self.sum
    }

    /// The summed gradients divided by the number of micro-batches.
    ///
    /// # Errors
    /// [`Error::Empty`] when nothing was added.
    pub fn mean(self) -> Result<GradStore<E>> {
        if self.count == 0 {
            return Err(Error::Empty { op: "GradAccumulator::mean", what: "the micro-batch gradient sum" });
        }
        let scale = E::of(1.0 / self.count as f64);
        let mut sum = self.sum;
        if self.count > 1 {
            let ids: Vec<_> = sum.iter().map(|(id, _)| *id).collect();
            for id in ids {
                let mut g = sum.remove(id).expect("peft-rs bug: id listed by the store");
                scale_in_place(&mut g, scale);
                sum.insert(id, g);
            }
        }
        Ok(sum)
    }
}

/// `acc += g` for two arrays of one shape (in parallel chunks when large and both are contiguous).
fn add_assign<E: Elem>(acc: &mut ArrayD<E>, g: &ArrayD<E>) {
    match (acc.is_standard_layout(), g.as_slice()) {
        (true, Some(gs)) => {
            let a = acc.as_slice_mut().expect("peft-rs bug: standard layout");
            if a.len() >= PAR_ELEMWISE {
                a.par_chunks_mut(CHUNK).zip(gs.par_chunks(CHUNK)).for_each(|(a, g)| add_slices(a, g));
            } else {
                add_slices(a, gs);
            }
        }
        _ => *acc += g,
    }
}

fn add_slices<E: Elem>(a: &mut [E], g: &[E]) {
    a.iter_mut().zip(g).for_each(|(a, &g)| *a += g);
}

/// `g *= c` elementwise (in parallel chunks when large).
pub(crate) fn scale_in_place<E: Elem>(g: &mut ArrayD<E>, c: E) {
    match g.as_slice_memory_order_mut() {
        Some(s) if s.len() >= PAR_ELEMWISE => s.par_chunks_mut(CHUNK).for_each(|s| s.iter_mut().for_each(|x| *x *= c)),
        Some(s) => s.iter_mut().for_each(|x| *x *= c),
        None => g.mapv_inplace(|x| x * c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Optimizer, Sgd};
    use crate::param::Param;
    use crate::tensor::{Tensor, TensorId};
    use ndarray::{arr1, arr2, s, ArrayD, IxDyn};

    /// Mean squared error of the linear model `x·Wᵀ + b` against `y`.
    fn mse(w: &Param<f64>, b: &Param<f64>, x: &ArrayD<f64>, y: &ArrayD<f64>) -> Tensor<f64> {
        let pred = Tensor::new(x.clone()).linear(&w.tensor(), Some(&b.tensor())).unwrap();
        pred.sub(&Tensor::new(y.clone())).unwrap().square().mean_all()
    }

    #[test]
    fn accumulated_mean_equals_one_big_batch_for_a_linear_model() {
        let x = arr2(&[[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0], [0.0, 1.0], [2.0, 2.0], [-3.0, 1.0]]).into_dyn();
        let y = arr2(&[[1.0], [0.0], [2.0], [-1.0], [0.5], [3.0]]).into_dyn();
        let w = Param::new("w", arr2(&[[0.3, -0.2]]).into_dyn(), true);
        let b = Param::new("b", arr1(&[0.1]).into_dyn(), true);
        let big = mse(&w, &b, &x, &y).backward().unwrap();
        let mut acc = GradAccumulator::new();
        for k in 0..3 {
            let xs = x.slice(s![2 * k..2 * k + 2, ..]).to_owned().into_dyn();
            let ys = y.slice(s![2 * k..2 * k + 2, ..]).to_owned().into_dyn();
            acc.add(mse(&w, &b, &xs, &ys).backward().unwrap()).unwrap();
        }
        assert_eq!(acc.count(), 3);
        let avg = acc.mean().unwrap();
        for p in [&w, &b] {
            let (g1, g2) = (big.get_id(p.id()).unwrap(), avg.get_id(p.id()).unwrap());
            for (a, b) in g1.iter().zip(g2.iter()) {
                assert!((a - b).abs() < 1e-12, "{g1} vs {g2}");
            }
        }
        // And the SGD step taken from either is the same.
        let (w2, b2) = (Param::new("w", w.value().to_owned(), true), Param::new("b", b.value().to_owned(), true));
        let mut o1 = Sgd::with_lr(vec![w.clone(), b.clone()], 0.1, 0.0).unwrap();
        let mut o2 = Sgd::with_lr(vec![w2.clone(), b2.clone()], 0.1, 0.0).unwrap();
        o1.step(&big).unwrap();
        let mut avg2 = GradStore::default();
        avg2.insert(w2.id(), avg.get_id(w.id()).unwrap().clone());
        avg2.insert(b2.id(), avg.get_id(b.id()).unwrap().clone());
        o2.step(&avg2).unwrap();
        assert!((w.value()[[0, 0]] - w2.value()[[0, 0]]).abs() < 1e-12);
    }

    #[test]
    fn ids_missing_from_some_batches_count_as_zero() {
        let (a, b) = (TensorId::fresh(), TensorId::fresh());
        let mut acc = GradAccumulator::<f32>::new();
        let mut g1 = GradStore::default();
        g1.insert(a, arr1(&[2.0f32]).into_dyn());
        let mut g2 = GradStore::default();
        g2.insert(a, arr1(&[4.0f32]).into_dyn());
        g2.insert(b, arr1(&[6.0f32]).into_dyn());
        acc.add(g1).unwrap();
        acc.add(g2).unwrap();
        let m = acc.mean().unwrap();
        assert_eq!(m.get_id(a).unwrap()[[0]], 3.0);
        assert_eq!(m.get_id(b).unwrap()[[0]], 3.0);
    }

    #[test]
    fn shape_mismatch_is_an_error_and_adds_nothing() {
        let (a, b) = (TensorId::fresh(), TensorId::fresh());
        let mut acc = GradAccumulator::<f32>::new();
        let mut g1 = GradStore::default();
        g1.insert(a, arr1(&[1.0f32]).into_dyn());
        g1.insert(b, arr1(&[1.0f32]).into_dyn());
        acc.add(g1).unwrap();
        let mut g2 = GradStore::default();
        g2.insert(a, arr1(&[1.0f32]).into_dyn());
        g2.insert(b, ArrayD::zeros(IxDyn(&[2])));
        assert!(matches!(acc.add(g2), Err(Error::Shape { .. })));
        assert_eq!(acc.count(), 1);
        let sum = acc.sum();
        assert_eq!(sum.get_id(a).unwrap()[[0]], 1.0);
    }

    #[test]
    fn mean_of_nothing_is_an_error() {
        assert!(GradAccumulator::<f32>::new().mean().is_err());
    }

    #[test]
    fn large_gradients_accumulate_in_parallel() {
        let n = PAR_ELEMWISE + 1;
        let id = TensorId::fresh();
        let mut acc = GradAccumulator::<f32>::new();
        for v in [1.0f32, 2.0, 6.0] {
            let mut g = GradStore::default();
            g.insert(id, ArrayD::from_elem(IxDyn(&[n]), v));
            acc.add(g).unwrap();
        }
        let m = acc.mean().unwrap();
        assert!(m.get_id(id).unwrap().iter().all(|&x| x == 3.0));
    }
}
