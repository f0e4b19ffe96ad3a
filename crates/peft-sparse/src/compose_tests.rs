use ndarray::{ArrayD, IxDyn};
use peft_core::Param;

use super::*;

fn param() -> Param {
    Param::new("w", ArrayD::from_shape_fn(IxDyn(&[3, 4]), |d| (d[0] * 4 + d[1]) as f32 * 0.25), false)
}

#[test]
fn disjoint_composition_equals_sequential_application() {
    let a = SparseDiff::new("w", &[3, 4], vec![0, 5], vec![1.5, -2.0]).unwrap();
    let b = SparseDiff::new("w", &[3, 4], vec![2, 11], vec![0.25, 4.0]).unwrap();
    let c = compose(&[&a, &b]).unwrap();
    assert_eq!(c.overlap, 0);
    let (p, q) = (param(), param());
    a.apply_to(&p).unwrap();
    b.apply_to(&p).unwrap();
    c.diff.apply_to(&q).unwrap();
    assert_eq!(p.value(), q.value());
}

#[test]
fn overlapping_entries_are_summed_and_counted() {
    let a = SparseDiff::new("w", &[3, 4], vec![1, 5], vec![1.0, 2.0]).unwrap();
    let b = SparseDiff::new("w", &[3, 4], vec![5, 6], vec![0.5, 3.0]).unwrap();
    let c = compose(&[&a, &b]).unwrap();
    assert_eq!(c.overlap, 1);
    assert_eq!(c.diff.indices.to_u64(), vec![1, 5, 6]);
    assert_eq!(c.diff.values, vec![1.0, 2.5, 3.0]);
}

#[test]
fn apply_then_revert_restores_exactly_for_representable_values() {
    let p = param();
    let orig = p.value().to_owned();
    let a = SparseDiff::new("w", &[3, 4], vec![0, 3, 7], vec![0.5, -0.25, 1.0]).unwrap();
    a.apply_to(&p).unwrap();
    assert_ne!(p.value(), orig.clone().into_shared());
    a.revert_from(&p).unwrap();
    assert_eq!(p.value(), orig.into_shared());
}

#[test]
fn mismatched_shapes_are_refused() {
    let a = SparseDiff::new("w", &[3, 4], vec![0], vec![1.0]).unwrap();
    let b = SparseDiff::new("w", &[4, 3], vec![0], vec![1.0]).unwrap();
    assert!(matches!(compose(&[&a, &b]), Err(SparseError::ShapeMismatch { .. })));
    let wrong = Param::new("w", ArrayD::zeros(IxDyn(&[2, 2])), false);
    assert!(matches!(a.apply_to(&wrong), Err(SparseError::ShapeMismatch { .. })));
    assert!(matches!(SparseDiff::new("w", &[2], vec![0, 1], vec![1.0]), Err(SparseError::LengthMismatch { .. })));
}
