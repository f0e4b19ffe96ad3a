//! Sparse diffs as plain data, and their composition: `θ = θ⁰ + Δ₁ + Δ₂` (LT-SFT's language + task SFTs). The
//! sum of two diffs on one tensor is a diff on the union of their supports; entries in both are added and counted
//! as overlap.

use peft_core::Param;

use crate::delta::SparseDelta;
use crate::error::{SparseError, SparseResult};
use crate::indices::SparseIndices;

/// A sparse change of one tensor: its shape, sorted flat indices and values.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseDiff {
    /// The tensor's name.
    pub name: String,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Sorted flat indices.
    pub indices: SparseIndices,
    /// One value per index.
    pub values: Vec<f32>,
}

/// The sum of several diffs and how many entries overlapped.
#[derive(Clone, Debug, PartialEq)]
pub struct Composition {
    /// The summed diff.
    pub diff: SparseDiff,
    /// Entries present in more than one input.
    pub overlap: usize,
}

impl SparseDiff {
    /// A diff, checked.
    ///
    /// # Errors
    /// [`SparseError::LengthMismatch`]; index errors of [`SparseIndices::new`].
    pub fn new(name: &str, shape: &[usize], indices: Vec<u64>, values: Vec<f32>) -> SparseResult<Self> {
        let numel = shape.iter().product();
        let indices = SparseIndices::new(name, indices, numel)?;
        if indices.len() != values.len() {
            return Err(SparseError::LengthMismatch {
                tensor: name.into(),
                indices: indices.len(),
                values: values.len(),
            });
        }
        Ok(SparseDiff { name: name.into(), shape: shape.to_vec(), indices, values })
    }

    /// The current content of a delta.
    pub fn of(delta: &SparseDelta) -> Self {
        SparseDiff {
            name: delta.param_name().into(),
            shape: delta.shape().to_vec(),
            indices: (*delta.indices()).clone(),
            values: delta.values().value().iter().copied().collect(),
        }
    }

    fn check_param(&self, p: &Param) -> SparseResult<()> {
        if p.shape() != self.shape {
            return Err(SparseError::ShapeMismatch {
                tensor: self.name.clone(),
                expected: self.shape.clone(),
                found: p.shape(),
            });
        }
        Ok(())
    }

    /// Adds the diff into `p` (`θ += Δ` at the indices).
    ///
    /// # Errors
    /// [`SparseError::ShapeMismatch`].
    pub fn apply_to(&self, p: &Param) -> SparseResult<()> {
        self.add_into(p, 1.0)
    }

    /// Subtracts the diff from `p` (LT-SFT's `revert`).
    ///
    /// # Errors
    /// [`SparseError::ShapeMismatch`].
    pub fn revert_from(&self, p: &Param) -> SparseResult<()> {
        self.add_into(p, -1.0)
    }

    fn add_into(&self, p: &Param, sign: f32) -> SparseResult<()> {
        self.check_param(p)?;
        p.update(|w| {
            if let Some(ws) = w.as_slice_mut() {
                for (i, &v) in self.indices.iter().zip(&self.values) {
                    ws[i] += sign * v;
                }
            }
        });
        Ok(())
    }
}

/// The sum of `diffs` (all on one tensor shape) with the overlap count. Values of overlapping entries are added
/// in the order given.
///
/// # Errors
/// [`SparseError::ShapeMismatch`] when the diffs address different shapes; [`SparseError::Config`] for none.
pub fn compose(diffs: &[&SparseDiff]) -> SparseResult<Composition> {
    let first = diffs.first().ok_or_else(|| SparseError::config("compose", "diffs", "nothing to compose"))?;
    for d in diffs {
        if d.shape != first.shape {
            return Err(SparseError::ShapeMismatch {
                tensor: d.name.clone(),
                expected: first.shape.clone(),
                found: d.shape.clone(),
            });
        }
    }
    let mut pairs: Vec<(u64, usize, f32)> = Vec::new();
    for (o, d) in diffs.iter().enumerate() {
        pairs.extend(d.indices.iter().zip(&d.values).map(|(i, &v)| (i as u64, o, v)));
    }
    pairs.sort_by_key(|&(i, o, _)| (i, o));
    let (mut idx, mut vals, mut overlap) = (Vec::<u64>::new(), Vec::<f32>::new(), 0usize);
    for (i, _, v) in pairs {
        if idx.last() == Some(&i) {
            if let Some(last) = vals.last_mut() {
                *last += v;
            }
            overlap += 1;
        } else {
            idx.push(i);
            vals.push(v);
        }
    }
    Ok(Composition { diff: SparseDiff::new(&first.name, &first.shape, idx, vals)?, overlap })
}

#[cfg(test)]
#[path = "compose_tests.rs"]
mod tests;
