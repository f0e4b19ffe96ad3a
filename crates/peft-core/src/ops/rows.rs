//! Row-blocked loops shared by the fused ops (softmax, norms, losses): serial for small inputs, rayon over
//! blocks of rows once the work is large enough to pay for the threads.

use rayon::prelude::*;

use crate::backend::PAR_ELEMWISE;

/// Elements of work each rayon task gets at least (keeps tiny rows from becoming one task each).
const MIN_TASK_ELEMS: usize = 1 << 12;

/// True when `total` elements of work are worth spreading over threads.
pub(crate) fn parallel(total: usize) -> bool {
    total >= PAR_ELEMWISE && rayon::current_num_threads() > 1
}

/// Calls `f(i, chunk)` for each consecutive `block`-sized chunk `i` of `dst` (in parallel when large).
///
/// Does nothing when `block` is 0 or `dst` is empty.
pub(crate) fn for_each_block<E: Send>(dst: &mut [E], block: usize, f: impl Fn(usize, &mut [E]) + Sync + Send) {
    if block == 0 || dst.is_empty() {
        return;
    }
    if parallel(dst.len()) && dst.len() > block {
        let min_len = (MIN_TASK_ELEMS / block).max(1);
        dst.par_chunks_mut(block).with_min_len(min_len).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        dst.chunks_mut(block).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `(0..n).map(f).collect()`, in parallel when `n * work` elements of work are large.
pub(crate) fn map_rows<T: Send>(n: usize, work: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if parallel(n.saturating_mul(work)) && n > 1 {
        let min_len = (MIN_TASK_ELEMS / work.max(1)).max(1);
        (0..n).into_par_iter().with_min_len(min_len).map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}

/// Splits `shape` at `axis` into `(outer, n, inner)`: the product of the axes before, the axis size, the product
/// of the axes after. A C-contiguous array of that shape is `[outer, n, inner]`.
pub(crate) fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}
