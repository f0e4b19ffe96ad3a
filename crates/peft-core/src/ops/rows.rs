//! Row-blocked loops shared by the fused ops (softmax, norms, losses): serial for small inputs, rayon over
//! blocks of rows once the work is large enough to pay for the threads; the row bodies run under
//! [`wide`] (AVX2 code generation where the CPU has it).

use rayon::prelude::*;

use crate::backend::{wide, PAR_ELEMWISE};

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
        dst.par_chunks_mut(block).with_min_len(min_len).enumerate().for_each(|(i, c)| wide(|| f(i, c)));
    } else {
        wide(|| dst.chunks_mut(block).enumerate().for_each(|(i, c)| f(i, c)));
    }
}

/// `(0..n).map(f).collect()`, in parallel when `n * work` elements of work are large.
pub(crate) fn map_rows<T: Send>(n: usize, work: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if parallel(n.saturating_mul(work)) && n > 1 {
        let min_len = (MIN_TASK_ELEMS / work.max(1)).max(1);
        (0..n).into_par_iter().with_min_len(min_len).map(|i| wide(|| f(i))).collect()
    } else {
        wide(|| (0..n).map(f).collect())
    }
}

/// Splits `shape` at `axis` into `(outer, n, inner)`: the product of the axes before, the axis size, the product
/// of the axes after. A C-contiguous array of that shape is `[outer, n, inner]`.
pub(crate) fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// Like [`for_each_block`] (`f(i, chunk, aux_i)`), also handing each chunk its own entry of `aux` (one per block).
pub(crate) fn for_each_block_with<E: Send, T: Send>(
    dst: &mut [E],
    block: usize,
    aux: &mut [T],
    f: impl Fn(usize, &mut [E], &mut T) + Sync + Send,
) {
    if block == 0 || dst.is_empty() {
        return;
    }
    debug_assert_eq!(dst.len() / block, aux.len(), "peft-rs bug: one aux entry per block");
    if parallel(dst.len()) && dst.len() > block {
        let min_len = (MIN_TASK_ELEMS / block).max(1);
        dst.par_chunks_mut(block)
            .zip(aux.par_iter_mut())
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(i, (c, a))| wide(|| f(i, c, a)));
    } else {
        wide(|| dst.chunks_mut(block).zip(aux.iter_mut()).enumerate().for_each(|(i, (c, a))| f(i, c, a)));
    }
}

/// Runs `f(rows_range, out_chunk)` over contiguous ranges of `rows` rows of `width` elements, one range per
/// rayon task when large (a few tasks per thread), and returns each task's result in row order.
///
/// `out`, when given, is split into the matching `range.len() * width` chunks. Used by backward passes that
/// write a per-row gradient and also reduce over rows (a layer-norm weight gradient, say): each task returns its
/// partial sum and the caller adds the few partials.
pub(crate) fn row_tasks<E: Send, T: Send>(
    out: Option<&mut [E]>,
    rows: usize,
    width: usize,
    f: impl Fn(std::ops::Range<usize>, Option<&mut [E]>) -> T + Sync + Send,
) -> Vec<T> {
    if rows == 0 || width == 0 {
        return Vec::new();
    }
    let tasks = if parallel(rows * width) { (rayon::current_num_threads() * 4).min(rows) } else { 1 };
    let per = rows.div_ceil(tasks);
    let tasks = rows.div_ceil(per);
    let slots: Vec<Option<&mut [E]>> = match out {
        Some(o) => o.chunks_mut(per * width).map(Some).collect(),
        None => (0..tasks).map(|_| None).collect(),
    };
    let run = |(t, slot): (usize, Option<&mut [E]>)| wide(|| f(t * per..((t + 1) * per).min(rows), slot));
    if tasks > 1 {
        slots.into_par_iter().enumerate().map(run).collect()
    } else {
        slots.into_iter().enumerate().map(run).collect()
    }
}
