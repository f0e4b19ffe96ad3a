use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::Tensor;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;

/// A `[rows, cols]` weight with about `sparsity` of its entries zero and rows listed in `empty` all zero.
fn weight(rows: usize, cols: usize, sparsity: f64, empty: &[usize], seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w: Vec<f32> =
        (0..rows * cols).map(|_| if rng.gen::<f64>() < sparsity { 0.0 } else { rng.gen_range(-1.0..1.0) }).collect();
    for &r in empty.iter().filter(|&&r| r < rows) {
        w[r * cols..(r + 1) * cols].fill(0.0);
    }
    w
}

fn input(batch: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Array2::from_shape_fn((batch, cols), |_| rng.gen_range(-2.0..2.0))
}

/// Checks `got` against the f64 product, each entry within `1e-5 · Σ|w||x|` (f32 rounding of any sum order).
fn check_against_f64(w: &[f32], rows: usize, cols: usize, x: &Array2<f32>, got: &Array2<f32>) {
    let batch = x.nrows();
    assert_eq!(got.dim(), (batch, rows));
    for b in 0..batch {
        for o in 0..rows {
            let (mut exact, mut mag) = (0.0f64, 0.0f64);
            for k in 0..cols {
                let p = w[o * cols + k] as f64 * x[[b, k]] as f64;
                exact += p;
                mag += p.abs();
            }
            let err = (got[[b, o]] as f64 - exact).abs();
            assert!(err <= 1e-5 * mag + 1e-30, "[{b}, {o}]: {} vs {exact} (|.|-sum {mag})", got[[b, o]]);
        }
    }
}

fn dense_linear(w: &[f32], rows: usize, cols: usize, x: &Array2<f32>) -> Array2<f32> {
    let xt = Tensor::new(x.clone().into_dyn());
    let wt = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[rows, cols]), w.to_vec()).unwrap());
    let y = xt.linear(&wt, None).unwrap();
    Array2::from_shape_vec((x.nrows(), rows), y.to_vec()).unwrap()
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(24))]

    /// The CSR kernel equals the dense product (f64 reference and peft-core's dense `linear`) over random shapes,
    /// batch sizes on both sides of the kernel switch, and sparsities from 0% to 100% with forced empty rows.
    #[test]
    fn csr_matmul_equals_dense(
        rows in 0usize..24,
        cols in 0usize..24,
        batch in 0usize..10,
        sparsity in prop_oneof![Just(0.0f64), Just(1.0f64), 0.0f64..1.0],
        empty in proptest::collection::vec(0usize..24, 0..4),
        seed in any::<u64>(),
    ) {
        let w = weight(rows, cols, sparsity, &empty, seed);
        let x = input(batch, cols, seed ^ 1);
        let csr = CsrMatrix::from_dense(&w, rows, cols).unwrap();
        prop_assert_eq!(csr.nnz(), w.iter().filter(|v| **v != 0.0).count());
        let back = csr.to_dense();
        prop_assert_eq!(back.as_slice().unwrap(), &w[..]);
        let got = csr.matmul_t(x.view()).unwrap();
        check_against_f64(&w, rows, cols, &x, &got);
        if sparsity == 1.0 {
            prop_assert!(got.iter().all(|v| *v == 0.0));
        }
        for &r in empty.iter().filter(|&&r| r < rows) {
            prop_assert!(got.column(r).iter().all(|v| *v == 0.0));
            prop_assert_eq!(csr.row(r).unwrap().0.len(), 0);
        }
        if rows > 0 && cols > 0 && batch > 0 {
            let dense = dense_linear(&w, rows, cols, &x);
            // Both within the f32 bound of the same exact product.
            check_against_f64(&w, rows, cols, &x, &dense);
        }
    }
}

#[test]
fn parallel_paths_match_the_f64_product() {
    // Large enough for the rayon path in both kernels (nnz · batch ≥ 2^15).
    let (rows, cols) = (300, 200);
    let (mut gather_parallel, mut axpy_parallel) = (0, 0);
    for sparsity in [0.0, 0.5, 0.9] {
        let w = weight(rows, cols, sparsity, &[3, 150], 11);
        let csr = CsrMatrix::from_dense(&w, rows, cols).unwrap();
        for batch in [1, 3, 4, 8, 33, 64, 65, 130] {
            let x = input(batch, cols, 12);
            if csr.nnz() * batch >= PARALLEL_MIN_WORK {
                if batch < TRANSPOSED_MIN_BATCH {
                    gather_parallel += 1;
                } else {
                    axpy_parallel += 1;
                }
            }
            check_against_f64(&w, rows, cols, &x, &csr.matmul_t(x.view()).unwrap());
        }
    }
    assert!(gather_parallel > 0 && axpy_parallel > 0);
}

#[test]
fn non_standard_layouts_are_accepted() {
    let w = weight(5, 7, 0.5, &[], 1);
    let dense = Array2::from_shape_vec((5, 7), w.clone()).unwrap();
    // A transposed (column-major) view of the same matrix gives the same CSR.
    let t = dense.t().to_owned();
    assert_eq!(CsrMatrix::from_array(t.t()).unwrap(), CsrMatrix::from_dense(&w, 5, 7).unwrap());
    let csr = CsrMatrix::from_array(dense.view()).unwrap();
    let x = input(6, 7, 2);
    let xt = x.t().to_owned();
    assert_eq!(csr.matmul_t(xt.t()).unwrap(), csr.matmul_t(x.view()).unwrap());
}

#[test]
fn signed_zeros_are_dropped_and_nan_kept() {
    let csr = CsrMatrix::from_dense(&[0.0, -0.0, f32::NAN, 1.0], 2, 2).unwrap();
    assert_eq!(csr.nnz(), 2);
    assert_eq!(csr.row(0).unwrap().0.len(), 0);
    assert_eq!(csr.row(1).unwrap().0, &[0, 1]);
    assert!(csr.row(2).is_none());
    assert_eq!(csr.sparsity(), 0.5);
}

#[test]
fn shape_errors_are_typed() {
    assert!(matches!(CsrMatrix::from_dense(&[1.0; 5], 2, 3), Err(SparseError::ShapeMismatch { .. })));
    assert!(matches!(CsrMatrix::from_dense(&[], usize::MAX, 2), Err(SparseError::ShapeMismatch { .. })));
    let csr = CsrMatrix::from_dense(&[1.0; 6], 2, 3).unwrap();
    let x = Array2::<f32>::zeros((4, 2));
    assert!(matches!(csr.matmul_t(x.view()), Err(SparseError::ShapeMismatch { .. })));
    let mut out = vec![0.0; 8];
    assert!(matches!(csr.matmul_t_into(&[0.0; 11], 4, &mut out), Err(SparseError::ShapeMismatch { .. })));
    assert!(matches!(csr.matmul_t_into(&[0.0; 12], 4, &mut out[..7]), Err(SparseError::ShapeMismatch { .. })));
    assert!(csr.matmul_t_into(&[0.0; 12], 4, &mut out).is_ok());
}

#[test]
fn into_overwrites_the_output() {
    let csr = CsrMatrix::from_dense(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 2, 3).unwrap();
    for batch in [1, 5] {
        let x = vec![2.0f32; batch * 3];
        let mut out = vec![7.0f32; batch * 2];
        csr.matmul_t_into(&x, batch, &mut out).unwrap();
        assert!(out.chunks(2).all(|r| r == [2.0, 0.0]), "{out:?}");
    }
    let empty = CsrMatrix::from_dense(&[], 2, 0).unwrap();
    let mut out = vec![7.0f32; 2];
    empty.matmul_t_into(&[], 1, &mut out).unwrap();
    assert_eq!(out, vec![0.0, 0.0]);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx2_kernel_matches_the_portable_loop_and_the_f64_sum() {
    use rand::seq::SliceRandom;
    if !super::simd::available() {
        eprintln!("skipped: this CPU has no AVX2 + FMA (the portable loop is what runs here)");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let cols = 37;
    // Every block width: the 64-lane blocks, the 8-lane blocks and the scalar tail, alone and together.
    for batch in [1usize, 7, 8, 9, 63, 64, 65, 72, 128, 133, 200] {
        let xt: Vec<f32> = (0..cols * batch).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        for nnz in [0usize, 1, 5, 37] {
            let mut idx: Vec<u32> = (0..cols as u32).collect();
            idx.shuffle(&mut rng);
            idx.truncate(nnz);
            idx.sort_unstable();
            let val: Vec<f32> = idx.iter().map(|_| rng.gen_range(-2.0f32..2.0)).collect();
            let mut fast = vec![f32::NAN; batch];
            assert!(super::simd::in_bounds(&idx, xt.len(), batch));
            // SAFETY: AVX2 + FMA checked above; indices < cols, xt is cols·batch long, fast is batch long.
            unsafe { super::simd::axpy_row(&idx, &val, &xt, batch, &mut fast) };
            let mut slow = vec![0.0f32; batch];
            CsrMatrix::axpy_row_portable(&idx, &val, &xt, batch, &mut slow);
            for b in 0..batch {
                let exact: f64 =
                    idx.iter().zip(&val).map(|(&k, &v)| f64::from(v) * f64::from(xt[k as usize * batch + b])).sum();
                let mag: f64 = idx
                    .iter()
                    .zip(&val)
                    .map(|(&k, &v)| (f64::from(v) * f64::from(xt[k as usize * batch + b])).abs())
                    .sum();
                // Each is a recursive sum of nnz products: |error| <= γ_nnz · Σ|v·x| (+ the f32 rounding of the result).
                let bound = 2.0 * (nnz as f64 * f64::from(f32::EPSILON)) * mag + f64::from(f32::EPSILON) * exact.abs();
                for (name, got) in [("avx2", fast[b]), ("portable", slow[b])] {
                    assert!(
                        (f64::from(got) - exact).abs() <= bound,
                        "{name} batch {batch} nnz {nnz} lane {b}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn out_of_bounds_rows_are_detected_before_the_kernel() {
    assert!(super::simd::in_bounds(&[0, 3], 4 * 8, 8));
    assert!(!super::simd::in_bounds(&[0, 4], 4 * 8, 8));
    assert!(!super::simd::in_bounds(&[u32::MAX], usize::MAX, usize::MAX / 2), "an overflowing row end");
}
