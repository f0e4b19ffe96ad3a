//! The compute backend: one GEMM entry point (faer or the `gemm` crate per shape, chosen by measurement; see
//! docs/perf.md) and the threading thresholds for elementwise work.

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

/// Work (m·n·k) from which GEMM runs on every rayon thread (between 160³ and 192³). Measured on 2 cores
/// (docs/perf.md): below about 176³ a second thread never pays for itself and slows faer down by up to 3x
/// (32³: 29 vs 92 GFLOP/s).
const PAR_GEMM_WORK: usize = 1 << 22;

/// Elements above which elementwise kernels run in parallel.
pub const PAR_ELEMWISE: usize = 1 << 15;

/// Runs `body` compiled for AVX2 + FMA when this x86-64 CPU has them (detected once, cached by std), else as is.
///
/// The workspace builds for the baseline x86-64 target (SSE2), so a plain elementwise loop vectorises 4 `f32`
/// wide; inside `body` the same loop (inlined) uses 8-wide AVX2. Rust never contracts `a * b + c` into an FMA
/// on its own, so plain arithmetic rounds identically on both paths (only explicit `mul_add` differs, which
/// peft-rs's elementwise code does not use). Measured in docs/perf.md (`ops_timings -- gelu`).
///
/// ```
/// let x = vec![1.5f32; 1000];
/// let mut y = vec![0f32; 1000];
/// peft_core::backend::wide(|| y.iter_mut().zip(&x).for_each(|(o, &v)| *o = v * v + 1.0));
/// assert_eq!(y[999], 3.25);
/// ```
#[inline(always)]
pub fn wide<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: both target features were detected on the running CPU.
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// `dst (row-major m x n) = [dst +] lhs (m x k) · rhs (k x n)`.
///
/// `accumulate` adds into `dst` instead of overwriting it. Panics (a peft-rs bug, never user input) when the
/// views do not fit their slices.
///
/// The kernel is chosen per shape from the measurements in docs/perf.md: faer 0.24 (whose x86 kernels use
/// AVX-512 where present) for sequential products and for parallel ones with a long inner dimension and a
/// wide output, where it is as fast or up to 2x faster (the LoRA-A gradient `r x tokens · tokens x in`); the
/// `gemm` crate 0.19 for parallel products with `k <= 32` or `n <= 16` (the LoRA `x·Aᵀ` forward at small r,
/// the `B·A` merge), where faer's 2-thread split is up to 1.8x slower. Products of at least `PAR_GEMM_WORK`
/// (m·n·k) use every thread of the current rayon pool.
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
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PAR_GEMM_WORK;
    if !(parallel && (k <= 32 || n <= 16)) {
        let par = if parallel { faer::Par::rayon(threads) } else { faer::Par::Seq };
        if with_faer(dst, lhs, rhs, accumulate, par) {
            return;
        }
    }
    let par = if parallel { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
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

/// Runs the product through faer when `E` is `f32` or `f64` (faer's element types); returns false otherwise.
fn with_faer<E: Elem>(dst: &mut [E], lhs: MatRef<'_, E>, rhs: MatRef<'_, E>, accumulate: bool, par: faer::Par) -> bool {
    use std::any::TypeId;
    let (id, n) = (TypeId::of::<E>(), rhs.cols);
    // SAFETY: E is exactly the type the pointers are cast to (TypeId equality), and the caller checked that the
    // views stay inside their slices.
    unsafe {
        if id == TypeId::of::<f32>() {
            faer_matmul::<f32>(dst.as_mut_ptr().cast(), n, cast(lhs), cast(rhs), accumulate, 1.0, par);
        } else if id == TypeId::of::<f64>() {
            faer_matmul::<f64>(dst.as_mut_ptr().cast(), n, cast(lhs), cast(rhs), accumulate, 1.0, par);
        } else {
            return false;
        }
    }
    true
}

/// Reinterprets a view's element type. Safety: `T` must be the same type as `E`.
unsafe fn cast<E, T>(v: MatRef<'_, E>) -> MatRef<'_, T> {
    // SAFETY: same type (caller), so same layout and length.
    let data = unsafe { std::slice::from_raw_parts(v.data.as_ptr().cast::<T>(), v.data.len()) };
    MatRef { data, rows: v.rows, cols: v.cols, rs: v.rs, cs: v.cs }
}

/// Safety: `dst` is valid for a row-major `lhs.rows x n` matrix and the views stay inside their slices.
unsafe fn faer_matmul<T: faer::traits::RealField + Copy>(
    dst: *mut T,
    n: usize,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    accumulate: bool,
    one: T,
    par: faer::Par,
) {
    // SAFETY: see the function contract.
    let (d, a, b) = unsafe {
        (
            faer::MatMut::from_raw_parts_mut(dst, lhs.rows, n, n as isize, 1),
            faer::MatRef::from_raw_parts(lhs.data.as_ptr(), lhs.rows, lhs.cols, lhs.rs, lhs.cs),
            faer::MatRef::from_raw_parts(rhs.data.as_ptr(), rhs.rows, rhs.cols, rhs.rs, rhs.cs),
        )
    };
    let beta = if accumulate { faer::Accum::Add } else { faer::Accum::Replace };
    faer::linalg::matmul::matmul(d, beta, a, b, one, par);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference product of strided views, in f64.
    fn naive<E: Elem>(lhs: MatRef<'_, E>, rhs: MatRef<'_, E>) -> Vec<f64> {
        let at = |v: &MatRef<'_, E>, i: usize, j: usize| v.data[(i as isize * v.rs + j as isize * v.cs) as usize].f64();
        let mut out = vec![0.0; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                out[i * rhs.cols + j] = (0..lhs.cols).map(|p| at(&lhs, i, p) * at(&rhs, p, j)).sum();
            }
        }
        out
    }

    fn values<E: Elem>(len: usize, seed: usize) -> Vec<E> {
        (0..len).map(|i| E::of((((i * 7919 + seed * 104729) % 2003) as f64 / 1001.0) - 1.0)).collect()
    }

    /// Every dispatch branch (faer seq/par, gemm par), both transposes, overwrite and accumulate, f32 and f64.
    fn check_all_paths<E: Elem>(tol: f64) {
        // (m, k, n): sequential; parallel faer; parallel gemm via small k; parallel gemm via small n.
        let shapes = [(3, 5, 4), (1, 7, 1), (170, 180, 150), (300, 16, 900), (700, 800, 8)];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (m, k, n) in shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (values::<E>(m * k, 1), values::<E>(k * n, 2));
                let la = if ta { MatRef::row_major(&a, k, m).t() } else { MatRef::row_major(&a, m, k) };
                let rb = if tb { MatRef::row_major(&b, n, k).t() } else { MatRef::row_major(&b, k, n) };
                let want = naive(la, rb);
                let init = values::<E>(m * n, 3);
                for accumulate in [false, true] {
                    let mut dst = init.clone();
                    pool.install(|| gemm(&mut dst, la, rb, accumulate));
                    for (i, (&got, &w)) in dst.iter().zip(&want).enumerate() {
                        let w = if accumulate { w + init[i].f64() } else { w };
                        let err = (got.f64() - w).abs() / (1.0 + w.abs());
                        assert!(err < tol, "({m},{k},{n}) ta={ta} tb={tb} acc={accumulate} [{i}]: {got} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_naive_product_on_every_dispatch_path() {
        check_all_paths::<f32>(1e-4);
        check_all_paths::<f64>(1e-12);
    }

    #[test]
    fn gemm_with_empty_inner_dim_zeroes_or_keeps_dst() {
        let (a, b) = ([0f32; 0], [0f32; 0]);
        let mut dst = vec![1f32; 6];
        gemm(&mut dst, MatRef::row_major(&a, 2, 0), MatRef::row_major(&b, 0, 3), true);
        assert_eq!(dst, vec![1.0; 6]);
        gemm(&mut dst, MatRef::row_major(&a, 2, 0), MatRef::row_major(&b, 0, 3), false);
        assert_eq!(dst, vec![0.0; 6]);
    }
}
