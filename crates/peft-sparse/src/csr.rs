//! Compressed sparse row (CSR) weights and a CPU kernel for `y = x · Wᵀ` with `W` in CSR: inference of a pruned
//! (e.g. [`crate::squarehead`]) linear layer without its zeros.
//!
//! [`CsrMatrix::from_dense`] drops exact zeros (`±0.0`; NaN and infinities are kept) of a row-major `[out, in]`
//! weight. [`CsrMatrix::matmul_t`] computes `x · Wᵀ` for `x` `[batch, in]`, with rayon over blocks of output rows
//! and two inner loops:
//! - batch below [`TRANSPOSED_MIN_BATCH`]: per output row, a gather dot product over the row's nonzeros (four
//!   accumulators);
//! - larger batches: `x` cut into tiles of 64 rows, each transposed once to `[in, 64]` (so it stays in L2), then
//!   per output row an axpy of `v · xᵀ[k, :]` per nonzero `(k, v)`: with AVX2 + FMA (detected at run time, see
//!   [`simd_active`]) 64 lanes are held in eight 256-bit accumulators while the row's nonzeros stream past, so
//!   each output is stored once; elsewhere a portable loop the compiler vectorises. The result is transposed back.
//!   The tile buffers are a per-thread scratch reused across calls (fresh ones cost page faults that measured as
//!   most of the time at high sparsity).
//!
//! Sums run in another order than a dense GEMM's (and with FMA on the AVX2 path), so results agree with it up to
//! f32 rounding, not bit for bit.
//!
//! # Measured speed
//! CSR time / dense time (peft-core's `Tensor::linear`, the `Linear` forward, under `no_grad`; criterion medians)
//! from `cargo bench -p peft-sparse --bench sparse_gemm -- --warm-up-time 1 --measurement-time 2` on an "AMD EPYC"
//! (2-core VM, AVX2, nothing else running, 2026-12-07, commit after 4cae8da). Random (not magnitude) positions;
//! below 1 the CSR kernel is faster. The dense times of one shape vary by up to 1.7x across columns although the
//! dense work is the same, which is the run-to-run noise of this machine: read single cells with that in mind.
//!
//! | `[out, in]`, batch | 0% | 50% | 75% | 90% | 95% |
//! |---|---|---|---|---|---|
//! | 1536×384, 1   | 4.08 | 2.12 | 1.01 | 0.66 | 0.40 |
//! | 1536×384, 8   | 4.32 | 3.63 | 1.14 | 0.73 | 0.35 |
//! | 1536×384, 128 | 4.07 | 1.74 | 1.88 | 0.94 | 0.70 |
//! | 384×1536, 1   | 4.29 | 2.28 | 1.16 | 0.62 | 0.31 |
//! | 384×1536, 8   | 3.49 | 3.20 | 1.24 | 0.49 | 0.45 |
//! | 384×1536, 128 | 4.22 | 2.10 | 1.17 | 1.06 | 0.59 |
//!
//! Dense wins at 0-50% everywhere and is about even at 75%; from 90% the kernel is faster at 1 and 8 rows
//! (0.49-0.73) and about even at 128 (0.94-1.06); at 95% it is faster everywhere measured. On SquareHead's
//! magnitude-pruned MiniLM (all 36 encoder matrices per pass, so the weights come from memory, not cache) the
//! `cargo xtask bench` report measures the same kernel per run: at 90% CSR/dense 0.27-0.32 at 1 row and 0.69-0.88
//! at 128 rows (AVX2; 1.17-1.39 with the portable loop), at 75% 0.45-0.58 and 1.05-1.55, at 50% 0.74-1.17 and
//! 1.65-2.31 (`docs/bench/glue-sparse/`). Below batch 4 the kernel is a gather dot product, without AVX2.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::{SparseError, SparseResult};

/// From this batch size on, [`CsrMatrix::matmul_t`] uses the transposed (axpy) kernel.
pub const TRANSPOSED_MIN_BATCH: usize = 4;

/// Input rows per tile of the transposed kernel (the AVX2 kernel's 64 lanes).
const TILE_ROWS: usize = 64;

/// Below this much work (`nnz · batch` multiply-adds) the kernel runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// A `[rows, cols]` f32 matrix in compressed sparse row form.
#[derive(Clone, Debug, PartialEq)]
pub struct CsrMatrix {
    rows: usize,
    cols: usize,
    /// `indptr[r]..indptr[r + 1]` are row `r`'s entries; `rows + 1` long.
    indptr: Vec<usize>,
    /// Column of each entry, increasing within a row.
    indices: Vec<u32>,
    /// Value of each entry.
    values: Vec<f32>,
}

impl CsrMatrix {
    /// The nonzeros of the row-major `[rows, cols]` matrix `dense`.
    ///
    /// # Errors
    /// [`SparseError::ShapeMismatch`] when `dense.len() != rows * cols`; [`SparseError::Config`] when `cols`
    /// exceeds `u32::MAX` (column indices are `u32`).
    pub fn from_dense(dense: &[f32], rows: usize, cols: usize) -> SparseResult<Self> {
        if rows.checked_mul(cols) != Some(dense.len()) {
            return Err(SparseError::ShapeMismatch {
                tensor: "CsrMatrix::from_dense".into(),
                expected: vec![rows, cols],
                found: vec![dense.len()],
            });
        }
        if u32::try_from(cols).is_err() {
            return Err(SparseError::config("csr", "cols", format!("{cols} columns do not fit u32 indices")));
        }
        let mut indptr = Vec::with_capacity(rows + 1);
        indptr.push(0);
        let (mut indices, mut values) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for (c, &v) in dense[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    indices.push(c as u32);
                    values.push(v);
                }
            }
            indptr.push(values.len());
        }
        Ok(CsrMatrix { rows, cols, indptr, indices, values })
    }

    /// The nonzeros of a 2-D array (any layout).
    ///
    /// # Errors
    /// As [`CsrMatrix::from_dense`].
    pub fn from_array(dense: ArrayView2<'_, f32>) -> SparseResult<Self> {
        let (rows, cols) = dense.dim();
        let owned = dense.as_standard_layout();
        let slice = owned.as_slice().ok_or_else(|| SparseError::config("csr", "dense", "not contiguous"))?;
        Self::from_dense(slice, rows, cols)
    }

    /// Rows (`out` of a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (`in` of a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// `1 − nnz / (rows · cols)` (`0` for an empty shape).
    pub fn sparsity(&self) -> f64 {
        let n = self.rows * self.cols;
        if n == 0 {
            0.0
        } else {
            1.0 - self.nnz() as f64 / n as f64
        }
    }

    /// Row `r`'s column indices and values (`None` past the last row).
    pub fn row(&self, r: usize) -> Option<(&[u32], &[f32])> {
        let (a, b) = (*self.indptr.get(r)?, *self.indptr.get(r + 1)?);
        Some((&self.indices[a..b], &self.values[a..b]))
    }

    /// The dense `[rows, cols]` matrix.
    pub fn to_dense(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.rows, self.cols));
        for r in 0..self.rows {
            let (a, b) = (self.indptr[r], self.indptr[r + 1]);
            for (&c, &v) in self.indices[a..b].iter().zip(&self.values[a..b]) {
                out[[r, c as usize]] = v;
            }
        }
        out
    }

    /// `x · Wᵀ` for `x` `[batch, cols]`: `[batch, rows]`.
    ///
    /// # Errors
    /// [`SparseError::ShapeMismatch`] when `x` has not `cols` columns.
    pub fn matmul_t(&self, x: ArrayView2<'_, f32>) -> SparseResult<Array2<f32>> {
        let (batch, inner) = x.dim();
        if inner != self.cols {
            return Err(SparseError::ShapeMismatch {
                tensor: "CsrMatrix::matmul_t input".into(),
                expected: vec![batch, self.cols],
                found: vec![batch, inner],
            });
        }
        let x = x.as_standard_layout();
        let xs = x.as_slice().ok_or_else(|| SparseError::config("csr", "x", "not contiguous"))?;
        let mut out = vec![0.0f32; batch * self.rows];
        self.matmul_t_into(xs, batch, &mut out)?;
        Array2::from_shape_vec((batch, self.rows), out)
            .map_err(|e| SparseError::config("csr", "output", format!("cannot shape the output: {e}")))
    }

    /// `x · Wᵀ` on row-major slices: `x` `[batch, cols]`, written to `out` `[batch, rows]` (overwritten).
    ///
    /// # Errors
    /// [`SparseError::ShapeMismatch`] when a slice's length does not fit `batch`.
    pub fn matmul_t_into(&self, x: &[f32], batch: usize, out: &mut [f32]) -> SparseResult<()> {
        if batch.checked_mul(self.cols) != Some(x.len()) {
            return Err(SparseError::ShapeMismatch {
                tensor: "CsrMatrix::matmul_t input".into(),
                expected: vec![batch, self.cols],
                found: vec![x.len()],
            });
        }
        if batch.checked_mul(self.rows) != Some(out.len()) {
            return Err(SparseError::ShapeMismatch {
                tensor: "CsrMatrix::matmul_t output".into(),
                expected: vec![batch, self.rows],
                found: vec![out.len()],
            });
        }
        if batch == 0 || self.rows == 0 {
            return Ok(());
        }
        if self.cols == 0 {
            out.fill(0.0);
            return Ok(());
        }
        let parallel = self.nnz().saturating_mul(batch) >= PARALLEL_MIN_WORK;
        if batch < TRANSPOSED_MIN_BATCH {
            for (xr, yr) in x.chunks_exact(self.cols).zip(out.chunks_exact_mut(self.rows)) {
                self.gather_rows(xr, yr, parallel);
            }
            return Ok(());
        }
        // Tiles of at most TILE_ROWS input rows, so the transposed tile (cols · 64 floats: 96 KiB at 384 columns,
        // 384 KiB at 1536) stays in L2 while every output row streams through it.
        if batch > TILE_ROWS {
            for (xc, oc) in x.chunks(TILE_ROWS * self.cols).zip(out.chunks_mut(TILE_ROWS * self.rows)) {
                self.transposed(xc, xc.len() / self.cols, oc, parallel);
            }
        } else {
            self.transposed(x, batch, out, parallel);
        }
        Ok(())
    }

    /// The axpy kernel on one tile: `x` `[batch, cols]` into `out` `[batch, rows]`.
    fn transposed(&self, x: &[f32], batch: usize, out: &mut [f32], parallel: bool) {
        with_scratch((self.cols + self.rows) * batch, |scratch| {
            let (xt, yt) = scratch.split_at_mut(self.cols * batch);
            // xᵀ: [cols, batch].
            for (b, xr) in x.chunks_exact(self.cols).enumerate() {
                for (k, &v) in xr.iter().enumerate() {
                    xt[k * batch + b] = v;
                }
            }
            let xt = &*xt;
            let block = self.row_block();
            let run = |(i, chunk): (usize, &mut [f32])| {
                for (j, yrow) in chunk.chunks_exact_mut(batch).enumerate() {
                    self.axpy_row(i * block + j, xt, batch, yrow);
                }
            };
            if parallel {
                yt.par_chunks_mut(block * batch).enumerate().for_each(run);
            } else {
                yt.chunks_mut(block * batch).enumerate().for_each(run);
            }
            for (o, yrow) in yt.chunks_exact(batch).enumerate() {
                for (b, &v) in yrow.iter().enumerate() {
                    out[b * self.rows + o] = v;
                }
            }
        });
    }

    /// Output rows per parallel task: about four tasks per thread.
    fn row_block(&self) -> usize {
        (self.rows / (4 * rayon::current_num_threads()).max(1)).clamp(1, 256)
    }

    /// `y[o] = Σ v · x[k]` over row `o`'s entries, for every output row.
    fn gather_rows(&self, x: &[f32], y: &mut [f32], parallel: bool) {
        let block = self.row_block();
        let run = |(i, chunk): (usize, &mut [f32])| {
            for (j, yo) in chunk.iter_mut().enumerate() {
                *yo = self.gather_dot(i * block + j, x);
            }
        };
        if parallel {
            y.par_chunks_mut(block).enumerate().for_each(run);
        } else {
            y.chunks_mut(block).enumerate().for_each(run);
        }
    }

    /// Row `o`'s dot product with `x`, four partial sums.
    fn gather_dot(&self, o: usize, x: &[f32]) -> f32 {
        let (a, b) = (self.indptr[o], self.indptr[o + 1]);
        let (idx, val) = (&self.indices[a..b], &self.values[a..b]);
        let mut acc = [0.0f32; 4];
        let (ic, vc) = (idx.chunks_exact(4), val.chunks_exact(4));
        let (ir, vr) = (ic.remainder(), vc.remainder());
        for (i4, v4) in ic.zip(vc) {
            for l in 0..4 {
                acc[l] += v4[l] * x[i4[l] as usize];
            }
        }
        let mut tail = 0.0f32;
        for (&i, &v) in ir.iter().zip(vr) {
            tail += v * x[i as usize];
        }
        (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
    }

    /// `y = Σ v · xᵀ[k, :]` over row `o`'s entries (`y` is `batch` long, zero on entry): the AVX2 kernel where the
    /// CPU has AVX2 and FMA (and [`set_simd`] has not turned it off), else the portable loop.
    fn axpy_row(&self, o: usize, xt: &[f32], batch: usize, y: &mut [f32]) {
        let (a, b) = (self.indptr[o], self.indptr[o + 1]);
        let (idx, val) = (&self.indices[a..b], &self.values[a..b]);
        #[cfg(target_arch = "x86_64")]
        if simd::available() && y.len() == batch && simd::in_bounds(idx, xt.len(), batch) {
            // SAFETY: AVX2 and FMA are present (checked at run time); every row `k` of `idx` satisfies
            // `(k + 1)·batch <= xt.len()` and `y` is `batch` long (both checked just above), which is all the
            // kernel reads and writes.
            unsafe { simd::axpy_row(idx, val, xt, batch, y) };
            return;
        }
        Self::axpy_row_portable(idx, val, xt, batch, y);
    }

    /// The portable axpy loop of [`CsrMatrix::axpy_row`].
    fn axpy_row_portable(idx: &[u32], val: &[f32], xt: &[f32], batch: usize, y: &mut [f32]) {
        y.fill(0.0);
        for (&k, &v) in idx.iter().zip(val) {
            let src = &xt[k as usize * batch..(k as usize + 1) * batch];
            for (yi, &xi) in y.iter_mut().zip(src) {
                *yi += v * xi;
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch of the transposed kernel (`xᵀ` and `yᵀ` of one tile, at most `(cols + rows) · 64` floats,
    /// kept between calls): fresh buffers of this size come from `mmap` and cost a page fault per 4 KiB on every
    /// call, which measured as most of the time at high sparsity (0.9 ms of 1.2 ms for a 1536×384 matrix at
    /// 99.9% sparsity and 64 rows, 2-core EPYC VM).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch (a fresh buffer when the scratch is in use further up the
/// stack, as when a rayon task of an outer `matmul_t` runs on this thread). The contents are unspecified.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Turns the AVX2 kernel off (`false`) or back on where the CPU has it, process-wide (for measuring one against
/// the other and for testing the portable path on AVX2 machines).
pub fn set_simd(on: bool) {
    simd::DISABLED.store(!on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`CsrMatrix::matmul_t`] uses the AVX2 kernel for batches of [`TRANSPOSED_MIN_BATCH`] rows or more.
pub fn simd_active() -> bool {
    simd::available()
}

/// The AVX2 + FMA axpy kernel: 64 batch lanes held in eight 256-bit accumulators while the row's nonzeros stream
/// past, so each output element is stored once instead of once per nonzero.
mod simd {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set by [`super::set_simd`]`(false)`.
    pub(super) static DISABLED: AtomicBool = AtomicBool::new(false);

    /// AVX2 and FMA present and not disabled.
    pub(super) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            !DISABLED.load(Ordering::Relaxed)
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = DISABLED.load(Ordering::Relaxed);
            false
        }
    }

    /// Every row `k` in `idx` lies inside `xt` (`(k + 1)·batch <= len`).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn in_bounds(idx: &[u32], len: usize, batch: usize) -> bool {
        idx.iter().all(|&k| (k as usize).checked_add(1).and_then(|r| r.checked_mul(batch)).is_some_and(|e| e <= len))
    }

    /// `y[c] = Σ_j val[j] · xt[idx[j]·batch + c]` for `c < batch`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `(k + 1)·batch <= xt.len()` for every `k` in `idx`; `y.len() == batch`;
    /// `idx` and `val` have the same length.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_row(idx: &[u32], val: &[f32], xt: &[f32], batch: usize, y: &mut [f32]) {
        use std::arch::x86_64::{
            _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
        };
        let (xp, yp) = (xt.as_ptr(), y.as_mut_ptr());
        let mut c = 0;
        while c + 64 <= batch {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (&k, &v) in idx.iter().zip(val) {
                let vv = _mm256_set1_ps(v);
                // SAFETY (caller): row k spans xt[k·batch .. (k+1)·batch] and c + 64 <= batch.
                let src = unsafe { xp.add(k as usize * batch + c) };
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(vv, unsafe { _mm256_loadu_ps(src.add(8 * l)) }, *a);
                }
            }
            for (l, a) in acc.iter().enumerate() {
                // SAFETY (caller): y is batch long and c + 64 <= batch.
                unsafe { _mm256_storeu_ps(yp.add(c + 8 * l), *a) };
            }
            c += 64;
        }
        while c + 8 <= batch {
            let mut a = _mm256_setzero_ps();
            for (&k, &v) in idx.iter().zip(val) {
                // SAFETY (caller): as above with c + 8 <= batch.
                a = _mm256_fmadd_ps(_mm256_set1_ps(v), unsafe { _mm256_loadu_ps(xp.add(k as usize * batch + c)) }, a);
            }
            // SAFETY (caller): c + 8 <= batch = y.len().
            unsafe { _mm256_storeu_ps(yp.add(c), a) };
            c += 8;
        }
        for (b, yb) in y.iter_mut().enumerate().skip(c) {
            let mut s = 0.0f32;
            for (&k, &v) in idx.iter().zip(val) {
                s = v.mul_add(xt[k as usize * batch + b], s);
            }
            *yb = s;
        }
    }
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
