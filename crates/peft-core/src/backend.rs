//! The compute backend: one GEMM entry point (the `gemm` crate, chosen by measurement; see docs/perf.md) and
//! the threading thresholds for elementwise work.

use crate::elem::Elem;

/// A strided read-only matrix view over a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, E> {
    /// Backing storage.
    pub data: &'a [E],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride in elements.
    pub rs: isize,
    /// Column stride in elements.
    pub cs: isize,
}

impl<'a, E> MatRef<'a, E> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [E], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, rs: cols as isize, cs: 1 }
    }

    /// The transpose (a stride swap, no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        ((self.rows - 1) as isize * self.rs + (self.cols - 1) as isize * self.cs) as usize
    }
}

/// Work (m·n·k) above which GEMM uses every rayon thread.
const PAR_GEMM_WORK: usize = 48 * 48 * 48;

/// Elements above which elementwise kernels run in parallel.
pub const PAR_ELEMWISE: usize = 1 << 15;

/// `dst (row-major m x n) = [dst +] lhs (m x k) · rhs (k x n)`.
///
/// `accumulate` adds into `dst` instead of overwriting it. Panics (a peft-rs bug, never user input) when the
/// views do not fit their slices.
pub fn gemm<E: Elem>(dst: &mut [E], lhs: MatRef<'_, E>, rhs: MatRef<'_, E>, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "peft-rs bug: gemm inner dims");
    assert_eq!(dst.len(), m * n, "peft-rs bug: gemm dst size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.iter_mut().for_each(|v| *v = E::zero());
        }
        return;
    }
    assert!(lhs.max_index() < lhs.data.len() && rhs.max_index() < rhs.data.len(), "peft-rs bug: gemm view bounds");
    let par = if m * n * k >= PAR_GEMM_WORK && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every strided access inside the slices; dst is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            E::one(),
            E::one(),
            false,
            false,
            false,
            par,
        );
    }
}
