//! Dense decompositions (SVD, QR, LU) through faer, on ndarray matrices.
//!
//! Each function takes any 2-D ndarray (owned, view, `ArcArray`, fixed `Ix2` or dynamic `IxDyn`), copies it into
//! faer, factors it with faer's default parallelism (the current rayon pool) and returns owned ndarray factors.
//! The contracts, for `a` of shape `m x n` and `p = min(m, n)`:
//!
//! - [`svd`]: `A = U · diag(S) · Vᵀ`, thin: `U` is `m x p` and `Vt` is `p x n`, both with orthonormal rows/columns,
//!   `S` is non-negative and non-increasing.
//! - [`qr`]: `A = Q · R`, thin: `Q` is `m x p` with orthonormal columns, `R` is `p x n` upper trapezoidal.
//! - [`lu`]: `A = P · L · U` with partial (row) pivoting: `L` is `m x p` unit lower trapezoidal, `U` is `p x n`
//!   upper trapezoidal and `P` is the permutation matrix with `P[perm[i], i] = 1` (row `i` of `L · U` is row
//!   `perm[i]` of `A`); [`permutation_matrix`] builds it.
//!
//! ```
//! use ndarray::array;
//! let a = array![[3.0f32, 0.0], [0.0, -2.0], [0.0, 0.0]];
//! let (u, s, vt) = peft_core::linalg::svd(&a)?;
//! assert_eq!((u.dim(), s.len(), vt.dim()), ((3, 2), 2, (2, 2)));
//! assert!((s[0] - 3.0).abs() < 1e-6 && (s[1] - 2.0).abs() < 1e-6);
//! # Ok::<(), peft_core::Error>(())
//! ```

use crate::elem::Elem;
use crate::error::{Error, Result};
use ndarray::{Array1, Array2, ArrayBase, ArrayView2, Data, Dimension, Ix2};

/// Element types faer can factor: `f32` and `f64`.
pub trait LinalgElem: Elem + faer::traits::RealField {}

impl LinalgElem for f32 {}
impl LinalgElem for f64 {}

/// Checks that `a` is a finite 2-D matrix and returns it as an `Ix2` view.
fn matrix<'a, E: LinalgElem, S: Data<Elem = E>, D: Dimension>(
    op: &'static str,
    a: &'a ArrayBase<S, D>,
) -> Result<ArrayView2<'a, E>> {
    if a.ndim() != 2 {
        return Err(Error::Rank { op, expected: "a 2-D matrix", shape: a.shape().to_vec() });
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: format!("{op} input") });
    }
    Ok(a.view().into_dimensionality::<Ix2>().expect("peft-rs bug: ndim checked above"))
}

fn to_faer<E: LinalgElem>(a: ArrayView2<'_, E>) -> faer::Mat<E> {
    faer::Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[[i, j]])
}

fn from_faer<E: LinalgElem>(m: faer::MatRef<'_, E>) -> Array2<E> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)])
}

/// Thin singular value decomposition `A = U · diag(S) · Vt`.
///
/// For `a` of shape `m x n` and `p = min(m, n)`, returns `U` (`m x p`, orthonormal columns), `S` (`p`,
/// non-negative, non-increasing) and `Vt` (`p x n`, orthonormal rows).
///
/// # Errors
/// [`Error::Rank`] when `a` is not 2-D, [`Error::Numerical`] when the iteration does not converge; [`Error::NonFinite`] when `a`
/// holds NaN or infinity.
pub fn svd<E: LinalgElem, S: Data<Elem = E>, D: Dimension>(
    a: &ArrayBase<S, D>,
) -> Result<(Array2<E>, Array1<E>, Array2<E>)> {
    let a = matrix("svd", a)?;
    let (m, n) = a.dim();
    let p = m.min(n);
    if p == 0 {
        return Ok((Array2::zeros((m, 0)), Array1::zeros(0), Array2::zeros((0, n))));
    }
    let f =
        to_faer(a).thin_svd().map_err(|e| Error::Numerical { op: "svd", reason: format!("faer SVD failed: {e:?}") })?;
    let s = f.S().column_vector();
    let v = f.V();
    Ok((from_faer(f.U()), Array1::from_shape_fn(p, |i| s[i]), Array2::from_shape_fn((p, n), |(i, j)| v[(j, i)])))
}

/// Thin QR decomposition `A = Q · R`.
///
/// For `a` of shape `m x n` and `p = min(m, n)`, returns `Q` (`m x p`, orthonormal columns) and `R` (`p x n`,
/// upper trapezoidal). Signs follow faer's Householder convention (the diagonal of `R` may be negative).
///
/// # Errors
/// [`Error::Rank`] when `a` is not 2-D; [`Error::NonFinite`] when `a` holds NaN or infinity.
pub fn qr<E: LinalgElem, S: Data<Elem = E>, D: Dimension>(a: &ArrayBase<S, D>) -> Result<(Array2<E>, Array2<E>)> {
    let a = matrix("qr", a)?;
    let (m, n) = a.dim();
    if m.min(n) == 0 {
        return Ok((Array2::zeros((m, 0)), Array2::zeros((0, n))));
    }
    let f = to_faer(a).qr();
    Ok((from_faer(f.compute_thin_Q().as_ref()), from_faer(f.thin_R())))
}

/// LU decomposition with partial (row) pivoting, `A = P · L · U`.
///
/// For `a` of shape `m x n` and `p = min(m, n)`, returns `perm` (length `m`), `L` (`m x p`, unit lower
/// trapezoidal) and `U` (`p x n`, upper trapezoidal), where row `i` of `L · U` equals row `perm[i]` of `A`, i.e.
/// `A = P · L · U` with `P = permutation_matrix(&perm)`. Singular matrices factor fine (zero pivots in `U`).
///
/// # Errors
/// [`Error::Rank`] when `a` is not 2-D; [`Error::NonFinite`] when `a` holds NaN or infinity.
pub fn lu<E: LinalgElem, S: Data<Elem = E>, D: Dimension>(
    a: &ArrayBase<S, D>,
) -> Result<(Vec<usize>, Array2<E>, Array2<E>)> {
    let a = matrix("lu", a)?;
    let (m, n) = a.dim();
    if m.min(n) == 0 {
        return Ok(((0..m).collect(), Array2::zeros((m, 0)), Array2::zeros((0, n))));
    }
    let f = to_faer(a).partial_piv_lu();
    let (l, u) = (from_faer(f.L()), from_faer(f.U()));
    if l.iter().chain(u.iter()).all(|v| v.is_finite()) {
        // faer's forward array maps row i of L·U to row fwd[i] of A.
        return Ok((f.P().arrays().0.to_vec(), l, u));
    }
    // faer divides by an exactly zero pivot (a column that is zero below the diagonal); redo it the LAPACK way.
    Ok(lu_unblocked(a))
}

/// Right-looking unblocked LU with partial pivoting that, like LAPACK `getf2`, leaves a column unscaled when its
/// pivot is exactly zero. O(m·n·p) scalar work: only used when faer hits an exactly singular column.
fn lu_unblocked<E: LinalgElem>(a: ArrayView2<'_, E>) -> (Vec<usize>, Array2<E>, Array2<E>) {
    let (m, n) = a.dim();
    let p = m.min(n);
    let mut w = a.to_owned();
    let mut perm: Vec<usize> = (0..m).collect();
    for j in 0..p {
        let piv = (j..m).fold(j, |best, i| if w[[i, j]].abs() > w[[best, j]].abs() { i } else { best });
        if piv != j {
            for c in 0..n {
                w.swap([j, c], [piv, c]);
            }
            perm.swap(j, piv);
        }
        let d = w[[j, j]];
        if d == E::zero() {
            continue;
        }
        for i in j + 1..m {
            let f = w[[i, j]] / d;
            w[[i, j]] = f;
            for c in j + 1..n {
                let t = w[[j, c]];
                w[[i, c]] -= f * t;
            }
        }
    }
    let l = Array2::from_shape_fn((m, p), |(i, j)| match i.cmp(&j) {
        std::cmp::Ordering::Greater => w[[i, j]],
        std::cmp::Ordering::Equal => E::one(),
        std::cmp::Ordering::Less => E::zero(),
    });
    let u = Array2::from_shape_fn((p, n), |(i, j)| if i <= j { w[[i, j]] } else { E::zero() });
    (perm, l, u)
}

/// The `m x m` permutation matrix `P` with `P[perm[i], i] = 1`, so that `(P · X)[perm[i]] = X[i]`.
///
/// # Errors
/// [`Error::NotPermutation`] when `perm` is not a permutation of `0..perm.len()`.
pub fn permutation_matrix<E: Elem>(perm: &[usize]) -> Result<Array2<E>> {
    let m = perm.len();
    let mut seen = vec![false; m];
    for &p in perm {
        if p >= m || std::mem::replace(&mut seen[p], true) {
            return Err(Error::NotPermutation { op: "permutation_matrix", perm: perm.to_vec(), len: m });
        }
    }
    let mut out = Array2::zeros((m, m));
    for (i, &p) in perm.iter().enumerate() {
        out[[p, i]] = E::one();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::array_strategy;
    use ndarray::{array, ArrayD, IxDyn};
    use proptest::prelude::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(m: usize, n: usize, seed: u64) -> Array2<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        Array2::from_shape_fn((m, n), |_| rng.gen_range(-1.0..1.0))
    }

    /// A rank-`r` `m x n` matrix.
    fn low_rank(m: usize, n: usize, r: usize, seed: u64) -> Array2<f64> {
        random(m, r, seed).dot(&random(r, n, seed + 1))
    }

    fn max_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
        assert_eq!(a.dim(), b.dim());
        // NaN-propagating max.
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |m, d| if d > m || d.is_nan() { d } else { m })
    }

    fn assert_orthonormal_columns(q: &Array2<f64>, tol: f64) {
        let eye = Array2::eye(q.ncols());
        assert!(max_diff(&q.t().dot(q), &eye) < tol, "QᵀQ != I: {q:?}");
    }

    fn check_svd(a: &Array2<f64>, tol: f64) {
        let (u, s, vt) = svd(a).unwrap();
        let p = a.nrows().min(a.ncols());
        assert_eq!((u.dim(), s.len(), vt.dim()), ((a.nrows(), p), p, (p, a.ncols())));
        let us = &u * &s.view().insert_axis(ndarray::Axis(0));
        assert!(max_diff(&us.dot(&vt), a) < tol, "U·diag(S)·Vt != A");
        assert_orthonormal_columns(&u, tol);
        assert_orthonormal_columns(&vt.t().to_owned(), tol);
        assert!(s.iter().all(|&v| v >= 0.0));
        assert!(s.windows(2).into_iter().all(|w| w[0] >= w[1]), "S not sorted: {s:?}");
    }

    fn check_qr(a: &Array2<f64>, tol: f64) {
        let (q, r) = qr(a).unwrap();
        let p = a.nrows().min(a.ncols());
        assert_eq!((q.dim(), r.dim()), ((a.nrows(), p), (p, a.ncols())));
        assert!(max_diff(&q.dot(&r), a) < tol, "Q·R != A");
        assert_orthonormal_columns(&q, tol);
        assert!(r.indexed_iter().all(|((i, j), &v)| i <= j || v == 0.0), "R not upper: {r:?}");
    }

    fn check_lu(a: &Array2<f64>, tol: f64) {
        let (perm, l, u) = lu(a).unwrap();
        let p = a.nrows().min(a.ncols());
        assert_eq!((perm.len(), l.dim(), u.dim()), (a.nrows(), (a.nrows(), p), (p, a.ncols())));
        let pm = permutation_matrix::<f64>(&perm).unwrap();
        assert!(max_diff(&pm.dot(&l).dot(&u), a) < tol, "P·L·U != A");
        assert!(
            l.indexed_iter().all(|((i, j), &v)| (i > j && v.abs() <= 1.0 + 1e-12) || (i == j && v == 1.0) || v == 0.0),
            "L: {l:?} U: {u:?}"
        );
        assert!(u.indexed_iter().all(|((i, j), &v)| i <= j || v == 0.0), "U not upper: {u:?}");
    }

    fn cases() -> Vec<Array2<f64>> {
        vec![
            random(6, 6, 1),
            random(9, 4, 2),
            random(4, 9, 3),
            random(1, 5, 4),
            random(5, 1, 5),
            random(1, 1, 6),
            low_rank(8, 6, 2, 7),
            low_rank(5, 9, 3, 9),
            Array2::zeros((3, 4)),
            // exactly singular: a zero column and a repeated column
            array![[0.0, 1.0, 1.0], [0.0, 2.0, 2.0], [0.0, 3.0, 3.0], [0.0, 5.0, 5.0]],
            random(40, 33, 11),
        ]
    }

    #[test]
    fn svd_reconstructs_tall_wide_and_rank_deficient_inputs() {
        for a in cases() {
            check_svd(&a, 1e-10);
        }
    }

    #[test]
    fn qr_reconstructs_with_orthonormal_q() {
        for a in cases() {
            check_qr(&a, 1e-10);
        }
    }

    #[test]
    fn lu_reconstructs_with_row_pivoting() {
        for a in cases() {
            check_lu(&a, 1e-10);
        }
    }

    #[test]
    fn decompositions_work_in_f32_on_dynamic_arrays() {
        let a = random(12, 7, 21).mapv(|v| v as f32).into_dyn();
        let (u, s, vt) = svd(&a).unwrap();
        let rec = (&u * &s.view().insert_axis(ndarray::Axis(0))).dot(&vt);
        let a2 = a.view().into_dimensionality::<Ix2>().unwrap();
        assert!(rec.iter().zip(a2.iter()).all(|(x, y)| (x - y).abs() < 1e-5));
        let (q, r) = qr(&a).unwrap();
        assert!(q.dot(&r).iter().zip(a2.iter()).all(|(x, y)| (x - y).abs() < 1e-5));
        let (perm, l, u) = lu(&a).unwrap();
        let plu = permutation_matrix::<f32>(&perm).unwrap().dot(&l).dot(&u);
        assert!(plu.iter().zip(a2.iter()).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    #[test]
    fn svd_singular_values_match_hand_computed() {
        // [[3, 0], [4, 5]] has singular values sqrt(45) and sqrt(5).
        let (_, s, _) = svd(&array![[3.0f64, 0.0], [4.0, 5.0]]).unwrap();
        assert!((s[0] - 45f64.sqrt()).abs() < 1e-12 && (s[1] - 5f64.sqrt()).abs() < 1e-12);
        // A rank-2 matrix has exactly two non-zero singular values.
        let (_, s, _) = svd(&low_rank(7, 7, 2, 31)).unwrap();
        assert!(s[1] > 1e-3 && s.iter().skip(2).all(|&v| v < 1e-12), "{s:?}");
    }

    #[test]
    fn lu_pivots_on_the_largest_entry() {
        let (perm, l, u) = lu(&array![[1.0f64, 2.0], [4.0, 3.0]]).unwrap();
        assert_eq!(perm, vec![1, 0]);
        assert_eq!(l, array![[1.0, 0.0], [0.25, 1.0]]);
        assert_eq!(u, array![[4.0, 3.0], [0.0, 1.25]]);
    }

    #[test]
    fn lu_fallback_matches_faer_on_nonsingular_input() {
        let a = random(7, 5, 41);
        let (perm, l, u) = lu(&a).unwrap();
        let (perm2, l2, u2) = lu_unblocked(a.view());
        assert_eq!(perm, perm2);
        assert!(max_diff(&l, &l2) < 1e-12 && max_diff(&u, &u2) < 1e-12);
    }

    #[test]
    fn empty_matrices_give_empty_factors() {
        let a = Array2::<f64>::zeros((0, 3));
        let (u, s, vt) = svd(&a).unwrap();
        assert_eq!((u.dim(), s.len(), vt.dim()), ((0, 0), 0, (0, 3)));
        let (q, r) = qr(&a.t()).unwrap();
        assert_eq!((q.dim(), r.dim()), ((3, 0), (0, 0)));
        let (perm, l, u) = lu(&a).unwrap();
        assert_eq!((perm.len(), l.dim(), u.dim()), (0, (0, 0), (0, 3)));
    }

    #[test]
    fn non_matrix_input_is_a_typed_error() {
        let v = ArrayD::<f32>::zeros(IxDyn(&[4]));
        let t = ArrayD::<f32>::zeros(IxDyn(&[2, 2, 2]));
        for a in [&v, &t] {
            assert!(matches!(svd(a), Err(Error::Rank { op: "svd", .. })));
            assert!(matches!(qr(a), Err(Error::Rank { op: "qr", .. })));
            assert!(matches!(lu(a), Err(Error::Rank { op: "lu", .. })));
        }
    }

    #[test]
    fn non_finite_input_is_a_typed_error() {
        let a = array![[1.0f32, f32::NAN], [0.0, 1.0]];
        assert!(matches!(svd(&a), Err(Error::NonFinite { .. })));
        assert!(matches!(qr(&a), Err(Error::NonFinite { .. })));
        assert!(matches!(lu(&a.mapv(|v| if v.is_nan() { f32::INFINITY } else { v })), Err(Error::NonFinite { .. })));
    }

    #[test]
    fn permutation_matrix_rejects_non_permutations() {
        assert!(matches!(permutation_matrix::<f32>(&[0, 0]), Err(Error::NotPermutation { .. })));
        assert!(matches!(permutation_matrix::<f32>(&[2, 0]), Err(Error::NotPermutation { .. })));
        assert_eq!(permutation_matrix::<f32>(&[1, 0]).unwrap(), array![[0.0, 1.0], [1.0, 0.0]]);
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(24))]
        #[test]
        fn decompositions_reconstruct_random_shapes(
            a in (1usize..12, 1usize..12).prop_flat_map(|(m, n)| array_strategy(vec![m, n], -1.0, 1.0))
        ) {
            let a = a.into_dimensionality::<Ix2>().unwrap();
            check_svd(&a, 1e-10);
            check_qr(&a, 1e-10);
            check_lu(&a, 1e-10);
        }
    }
}
