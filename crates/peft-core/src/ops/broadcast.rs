//! NumPy broadcasting: the result shape of two operands and the reduction of a gradient back to an input shape.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::elem::Elem;
use crate::error::{Error, Result};

/// The broadcast shape of `a` and `b` (NumPy rules: align right, size-1 axes stretch).
///
/// # Errors
/// [`Error::Shape`] when an axis differs and neither side is 1.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db {
            da
        } else if da == 1 {
            db
        } else if db == 1 {
            da
        } else {
            return Err(Error::Shape { op, lhs: a.to_vec(), rhs: b.to_vec() });
        };
    }
    Ok(out)
}

/// Sums `g` (of a broadcast result shape) down to `shape`, the shape of the input that was broadcast.
pub fn sum_to<E: Elem>(g: &ArrayD<E>, shape: &[usize]) -> ArrayD<E> {
    if g.shape() == shape {
        return g.clone();
    }
    // Fast path: `shape` is a trailing block of `g` (a bias gradient): sum the rows of a contiguous slice.
    let lead = shape.iter().take_while(|&&d| d == 1).count();
    let tail = &shape[lead..];
    if let Some(gs) = g.as_slice() {
        let n: usize = tail.iter().product();
        if n > 0 && tail.len() <= g.ndim() && g.shape()[g.ndim() - tail.len()..] == *tail {
            let mut acc = vec![E::zero(); n];
            for row in gs.chunks_exact(n) {
                acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
            }
            return ArrayD::from_shape_vec(IxDyn(shape), acc).expect("peft-rs bug: sum_to shape");
        }
    }
    let extra = g.ndim() - shape.len();
    let mut r = g.clone();
    for _ in 0..extra {
        r = r.sum_axis(Axis(0));
    }
    for (i, &d) in shape.iter().enumerate() {
        if d == 1 && r.shape()[i] != 1 {
            r = r.sum_axis(Axis(i)).insert_axis(Axis(i));
        }
    }
    r.into_shape_with_order(IxDyn(shape)).expect("peft-rs bug: sum_to shape")
}
