//! [`SparseDelta`]: `k` (index, value) pairs on one named parameter, attached to the parameter-delta site.
//!
//! The forward pass sees `W + scatter(indices, values)` (built per call, never stored); the k values are a
//! trainable `[k]` parameter, so the optimizer's state for them is `O(k)`. Merging adds the values into `W` at
//! the indices; unmerging writes back the `k` original entries saved at merge time, so merge → unmerge restores
//! `W` bit for bit (a float add then subtract would not always).

use std::sync::{Arc, Mutex, RwLock};

use ndarray::{ArrayD, IxDyn};
use peft_core::{Param, ParamDelta, Tensor};

use crate::error::{SparseError, SparseResult};
use crate::indices::{densify, scatter_add_flat, GradTap, SparseIndices};

/// A sparse delta on one parameter: sorted flat indices and a trainable `[k]` value vector.
pub struct SparseDelta {
    name: String,
    kind: &'static str,
    param_name: String,
    shape: Vec<usize>,
    indices: RwLock<Arc<SparseIndices>>,
    values: Param,
    tap: RwLock<Option<GradTap<f32>>>,
    saved: Mutex<Option<Vec<f32>>>,
}

impl std::fmt::Debug for SparseDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseDelta({} on {}, k={})", self.name, self.param_name, self.k())
    }
}

impl SparseDelta {
    /// A delta named `name` (the adapter) of method `kind` on `param`, at `indices`, with values `values`
    /// (trainable). The values parameter is named `<param>.values.<name>`.
    ///
    /// # Errors
    /// [`SparseError::LengthMismatch`] when the lengths differ; [`SparseError::IndexOutOfRange`] when an index is
    /// beyond the parameter.
    pub fn new(
        name: &str,
        kind: &'static str,
        param: &Param,
        indices: SparseIndices,
        values: Vec<f32>,
    ) -> SparseResult<Self> {
        if values.len() != indices.len() {
            return Err(SparseError::LengthMismatch {
                tensor: param.name().into(),
                indices: indices.len(),
                values: values.len(),
            });
        }
        let numel = param.numel();
        if let Some(last) = (!indices.is_empty()).then(|| indices.get(indices.len() - 1)) {
            if last >= numel {
                return Err(SparseError::IndexOutOfRange {
                    tensor: param.name().into(),
                    index: last as u64,
                    position: indices.len() - 1,
                    numel,
                });
            }
        }
        let k = values.len();
        let values = Param::new(
            format!("{}.values.{name}", param.name()),
            ArrayD::from_shape_vec(IxDyn(&[k]), values).expect("peft-rs bug: k values"),
            true,
        );
        Ok(SparseDelta {
            name: name.into(),
            kind,
            param_name: param.name().into(),
            shape: param.shape(),
            indices: RwLock::new(Arc::new(indices)),
            values,
            tap: RwLock::new(None),
            saved: Mutex::new(None),
        })
    }

    /// A zero delta at `indices` (identity).
    ///
    /// # Errors
    /// As [`SparseDelta::new`].
    pub fn zeros(name: &str, kind: &'static str, param: &Param, indices: SparseIndices) -> SparseResult<Self> {
        let k = indices.len();
        Self::new(name, kind, param, indices, vec![0.0; k])
    }

    /// The parameter's name.
    pub fn param_name(&self) -> &str {
        &self.param_name
    }

    /// The parameter's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of entries (k).
    pub fn k(&self) -> usize {
        self.values.numel()
    }

    /// The current indices (a cheap shared handle).
    pub fn indices(&self) -> Arc<SparseIndices> {
        Arc::clone(&self.indices.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The trainable `[k]` values.
    pub fn values(&self) -> &Param {
        &self.values
    }

    /// Replaces indices and values together (same k: the values parameter keeps its identity, so optimizers keep
    /// tracking it).
    ///
    /// # Errors
    /// [`SparseError::LengthMismatch`] for another k; [`SparseError::IndexOutOfRange`];
    /// [`SparseError::State`] while merged.
    pub fn set(&self, indices: SparseIndices, values: Vec<f32>) -> SparseResult<()> {
        if indices.len() != self.k() || values.len() != self.k() {
            return Err(SparseError::LengthMismatch {
                tensor: self.param_name.clone(),
                indices: indices.len(),
                values: values.len(),
            });
        }
        let numel: usize = self.shape.iter().product();
        if let Some(last) = (!indices.is_empty()).then(|| indices.get(indices.len() - 1)) {
            if last >= numel {
                return Err(SparseError::IndexOutOfRange {
                    tensor: self.param_name.clone(),
                    index: last as u64,
                    position: indices.len() - 1,
                    numel,
                });
            }
        }
        if self.is_merged() {
            return Err(SparseError::State {
                tensor: self.param_name.clone(),
                reason: "cannot re-index a merged delta".into(),
            });
        }
        self.values.set(ArrayD::from_shape_vec(IxDyn(&[values.len()]), values).expect("peft-rs bug: k values"))?;
        *self.indices.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(indices);
        Ok(())
    }

    /// Installs (or removes) the dense-gradient observer called during backward.
    pub fn set_tap(&self, tap: Option<GradTap<f32>>) {
        *self.tap.write().unwrap_or_else(|p| p.into_inner()) = tap;
    }

    /// True while merged into its parameter (through [`SparseDelta::merge_into`]).
    pub fn is_merged(&self) -> bool {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Adds the values into `param` at the indices, first saving the k entries it overwrites.
    ///
    /// # Errors
    /// [`SparseError::State`] when merged already; errors of [`Param::merge_delta`] (non-finite results).
    pub fn merge_into(&self, param: &Param) -> SparseResult<()> {
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if saved.is_some() {
            return Err(SparseError::State { tensor: self.param_name.clone(), reason: "merged already".into() });
        }
        let idx = self.indices();
        let v = param.value();
        let vs = v.as_slice().ok_or_else(|| self.shape_error(v.shape()))?;
        let orig: Vec<f32> = idx.iter().map(|i| vs[i]).collect();
        drop(v);
        param.merge_delta(&self.name)?;
        *saved = Some(orig);
        Ok(())
    }

    /// Takes a merge back exactly: the parameter's k entries get their saved values back.
    ///
    /// # Errors
    /// [`SparseError::State`] when not merged; errors of [`Param::unmerge_delta`].
    pub fn unmerge_from(&self, param: &Param) -> SparseResult<()> {
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        let Some(orig) = saved.as_ref() else {
            return Err(SparseError::State { tensor: self.param_name.clone(), reason: "not merged".into() });
        };
        param.unmerge_delta(&self.name)?;
        let idx = self.indices();
        param.update(|w| {
            if let Some(ws) = w.as_slice_mut() {
                for (i, &o) in idx.iter().zip(orig) {
                    ws[i] = o;
                }
            }
        });
        *saved = None;
        Ok(())
    }

    fn shape_error(&self, found: &[usize]) -> SparseError {
        SparseError::ShapeMismatch {
            tensor: self.param_name.clone(),
            expected: self.shape.clone(),
            found: found.to_vec(),
        }
    }
}

impl ParamDelta for SparseDelta {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        self.kind
    }
    fn apply(&self, base: &Tensor) -> peft_core::Result<Tensor> {
        let tap = self.tap.read().unwrap_or_else(|p| p.into_inner()).clone();
        scatter_add_flat(base, &self.indices(), &self.values.tensor(), tap).map_err(|e| match e {
            SparseError::Core(c) => c,
            _ => peft_core::Error::Shape { op: "sparse delta", lhs: base.shape().to_vec(), rhs: vec![self.k()] },
        })
    }
    fn delta_value(&self) -> peft_core::Result<ArrayD<f32>> {
        let v = self.values.value();
        densify(&self.shape, &self.indices(), v.as_slice().unwrap_or(&[])).map_err(|_| peft_core::Error::Shape {
            op: "sparse delta",
            lhs: self.shape.clone(),
            rhs: vec![self.k()],
        })
    }
    fn params(&self) -> Vec<Param> {
        vec![self.values.clone()]
    }
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
