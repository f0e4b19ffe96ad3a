use super::*;

#[test]
fn top_k_breaks_ties_by_lower_index_and_sorts() {
    assert_eq!(top_k_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 2), vec![1, 2]);
    assert_eq!(top_k_indices(&[1.0, f32::NAN, 0.5], 2), vec![0, 2]);
    assert_eq!(top_k_indices(&[1.0, 2.0], 5), vec![0, 1]);
    assert!(top_k_indices(&[1.0, 2.0], 0).is_empty());
}

#[test]
fn global_top_k_uses_one_threshold_across_tensors() {
    let a = [0.1f32, 5.0, 0.2];
    let b = [4.0f32, 0.3, 6.0, 0.0];
    let got = top_k_global(&[&a, &b], 3);
    assert_eq!(got, vec![vec![1], vec![0, 2]]);
    assert_eq!(top_k_global(&[&a, &b], 0), vec![Vec::<u64>::new(), vec![]]);
}

#[test]
fn accumulators_sum_abs_grad_and_fisher() {
    let mut a = ScoreAccumulator::new(Score::AbsGrad, 3);
    let mut f = ScoreAccumulator::new(Score::Fisher, 3);
    for g in [[1.0f32, -2.0, 0.5], [-1.0, 1.0, 0.5]] {
        a.add(&g);
        f.add(&g);
    }
    a.add(&[1.0]); // wrong length: ignored
    assert_eq!(a.scores(), &[2.0, 3.0, 1.0]);
    assert_eq!(f.scores(), &[2.0, 5.0, 0.5]);
    assert_eq!(a.batches(), 2);
    assert_eq!(a.top_k(1), vec![1]);
}

#[test]
fn structured_selection_takes_whole_rows_and_heads() {
    // 4 rows x 2 cols; row sums 1, 10, 3, 4.
    let s = [0.5f32, 0.5, 5.0, 5.0, 1.0, 2.0, 2.0, 2.0];
    assert_eq!(top_rows(&s, 4, 2, 1), vec![2, 3]);
    // heads of 2 rows: sums 11, 7.
    assert_eq!(top_heads(&s, 4, 2, 2, 1), vec![0, 1, 2, 3]);
}
