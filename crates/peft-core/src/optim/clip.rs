//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use ndarray::ArrayD;
use rayon::prelude::*;

use super::accum::scale_in_place;
use super::CHUNK;

use crate::autograd::GradStore;
use crate::backend::PAR_ELEMWISE;
use crate::elem::Elem;
use crate::error::{Error, Result};

/// The global L2 norm of all gradients in the store, `sqrt(Σ g²)`, accumulated in f64.
pub fn grad_norm<E: Elem>(grads: &GradStore<E>) -> f64 {
    grads.iter().map(|(_, g)| sum_sq(g)).sum::<f64>().sqrt()
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`, and returns the norm before clipping.
///
/// As in PyTorch: the scale is `max_norm / (norm + 1e-6)`, applied only when it is below 1. When the norm is NaN
/// or infinite the gradients are left as they are and the norm is returned (PyTorch's `error_if_nonfinite=False`
/// would instead scale everything by NaN or 0); the optimizer's step then reports the offending parameter with
/// [`crate::Error::NonFinite`].
///
/// ```
/// use peft_core::optim::{clip_grad_norm, grad_norm};
/// use peft_core::GradStore;
/// use peft_core::tensor::TensorId;
/// let mut g = GradStore::<f32>::default();
/// g.insert(TensorId::fresh(), ndarray::arr1(&[3.0f32, 4.0]).into_dyn());
/// assert_eq!(clip_grad_norm(&mut g, 1.0)?, 5.0);
/// assert!((grad_norm(&g) - 1.0).abs() < 1e-6);
/// # Ok::<(), peft_core::Error>(())
/// ```
///
/// # Errors
/// [`crate::Error::Arg`] when `max_norm` is negative or NaN.
pub fn clip_grad_norm<E: Elem>(grads: &mut GradStore<E>, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::arg("clip_grad_norm", "max_norm", max_norm, "must be >= 0"));
    }
    let norm = grad_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        let c = E::of(coef);
        let ids: Vec<_> = grads.iter().map(|(id, _)| *id).collect();
        for id in ids {
            let mut g = grads.remove(id).expect("peft-rs bug: id listed by the store");
            scale_in_place(&mut g, c);
            grads.insert(id, g);
        }
    }
    Ok(norm)
}

fn sum_sq<E: Elem>(g: &ArrayD<E>) -> f64 {
    let sq = |s: &[E]| s.iter().map(|x| x.f64() * x.f64()).sum::<f64>();
    match g.as_slice_memory_order() {
        Some(s) if s.len() >= PAR_ELEMWISE => s.par_chunks(CHUNK).map(sq).sum(),
        Some(s) => sq(s),
        None => g.iter().map(|x| x.f64() * x.f64()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorId;
    use ndarray::{arr1, IxDyn};

    fn store(gs: &[&[f32]]) -> (GradStore<f32>, Vec<TensorId>) {
        let mut s = GradStore::default();
        let ids: Vec<_> = gs.iter().map(|_| TensorId::fresh()).collect();
        for (id, g) in ids.iter().zip(gs) {
            s.insert(*id, arr1(g).into_dyn());
        }
        (s, ids)
    }

    /// Reference from `tests/ref/optim_reference.py`: norm 13, scale 1/(13 + 1e-6).
    #[test]
    fn clips_to_max_norm_and_returns_pre_clip_norm() {
        let (mut s, ids) = store(&[&[3.0, 4.0], &[12.0]]);
        let norm = clip_grad_norm(&mut s, 1.0).unwrap();
        assert_eq!(norm, 13.0);
        let want = [[0.23076921301775288, 0.3076922840236705].as_slice(), &[0.9230768520710115]];
        for (id, w) in ids.iter().zip(want) {
            for (g, w) in s.get_id(*id).unwrap().iter().zip(w) {
                assert!((*g as f64 - w).abs() < 1e-7, "{g} vs {w}");
            }
        }
        assert!((grad_norm(&s) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn below_max_norm_leaves_gradients_alone() {
        let (mut s, ids) = store(&[&[3.0, 4.0], &[12.0]]);
        assert_eq!(clip_grad_norm(&mut s, 20.0).unwrap(), 13.0);
        assert_eq!(s.get_id(ids[0]).unwrap().as_slice().unwrap(), &[3.0, 4.0]);
        assert_eq!(s.get_id(ids[1]).unwrap().as_slice().unwrap(), &[12.0]);
    }

    #[test]
    fn non_finite_norm_is_returned_and_gradients_kept() {
        let (mut s, ids) = store(&[&[3.0, f32::INFINITY], &[12.0]]);
        assert_eq!(clip_grad_norm(&mut s, 1.0).unwrap(), f64::INFINITY);
        assert_eq!(s.get_id(ids[1]).unwrap().as_slice().unwrap(), &[12.0]);
        let (mut s, _) = store(&[&[f32::NAN]]);
        assert!(clip_grad_norm(&mut s, 1.0).unwrap().is_nan());
    }

    #[test]
    fn large_gradients_use_the_parallel_path_consistently() {
        let n = PAR_ELEMWISE + 3;
        let mut s = GradStore::default();
        let id = TensorId::fresh();
        s.insert(id, ArrayD::from_elem(IxDyn(&[n]), 1.0f32));
        let norm = clip_grad_norm(&mut s, 1.0).unwrap();
        assert!((norm - (n as f64).sqrt()).abs() < 1e-9);
        assert!((grad_norm(&s) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn bad_max_norm_is_rejected_and_empty_store_is_fine() {
        let (mut s, _) = store(&[&[1.0]]);
        assert!(clip_grad_norm(&mut s, -1.0).is_err());
        assert!(clip_grad_norm(&mut s, f64::NAN).is_err());
        assert_eq!(clip_grad_norm(&mut GradStore::<f32>::default(), 1.0).unwrap(), 0.0);
    }
}
