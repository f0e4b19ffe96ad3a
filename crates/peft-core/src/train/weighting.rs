//! Combining per-task losses into the loss a multi-task step backpropagates.

use crate::tensor::Tensor;

/// Turns `(task id, loss)` pairs into one scalar loss. Stateful weightings (uncertainty weighting, loss-ratio
/// balancing as in MFTCoder) keep their state between calls.
pub trait LossWeighting: Send {
    /// The combined loss of step `step`.
    ///
    /// # Errors
    /// Shape errors; an empty list.
    fn combine(&mut self, step: usize, losses: &[(usize, Tensor)]) -> crate::Result<Tensor>;
}

/// The plain sum of the task losses.
pub struct SumLosses;

impl LossWeighting for SumLosses {
    fn combine(&mut self, _step: usize, losses: &[(usize, Tensor)]) -> crate::Result<Tensor> {
        let mut it = losses.iter();
        let Some((_, first)) = it.next() else {
            return Err(crate::Error::Empty { op: "SumLosses", what: "the task loss list" });
        };
        it.try_fold(first.clone(), |acc, (_, l)| acc.add(l))
    }
}

/// Fixed weights by task id: `Σ w[task]·loss`.
pub struct StaticWeights(pub Vec<f32>);

impl LossWeighting for StaticWeights {
    fn combine(&mut self, _step: usize, losses: &[(usize, Tensor)]) -> crate::Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (k, l) in losses {
            let Some(&w) = self.0.get(*k) else {
                return Err(crate::Error::Index {
                    op: "StaticWeights",
                    index: *k as i64,
                    position: vec![],
                    axis: 0,
                    size: self.0.len(),
                });
            };
            let t = l.mul_scalar(w);
            total = Some(match total {
                Some(a) => a.add(&t)?,
                None => t,
            });
        }
        total.ok_or(crate::Error::Empty { op: "StaticWeights", what: "the task loss list" })
    }
}
