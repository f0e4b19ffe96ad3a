use super::*;
use crate::testing::proptest_config;
use proptest::prelude::*;

fn close(a: f32, b: f64) -> bool {
    (f64::from(a) - b).abs() <= 1e-5 * b.abs().max(1.0)
}

/// Batch: task 0 has one sample of 6 tokens (mean 1), task 1 two samples of 1 and 2 tokens (losses 4; 1, 7).
fn batch() -> (Tensor, Vec<f32>, Vec<usize>) {
    #[rustfmt::skip]
    let l = vec![
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
        4.0, 9.0, 9.0, 9.0, 9.0, 9.0,
        1.0, 7.0, 9.0, 9.0, 9.0, 9.0,
    ];
    #[rustfmt::skip]
    let m = vec![
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
        1.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
    ];
    (Tensor::from_vec(l, &[3, 6]).unwrap(), m, vec![0, 1, 1])
}

#[test]
fn the_four_cases_on_a_batch_computed_by_hand() {
    let (l, m, t) = batch();
    let v = |b| mft_loss(b, &l, &m, &t, None).unwrap().item().unwrap();
    // case1: (6 + 4 + 8) / 9 tokens.
    assert!(close(v(MftBalance::Plain), 18.0 / 9.0));
    // case2: mean of 1, 4, 4.
    assert!(close(v(MftBalance::SampleBalanced), 3.0));
    // case3: task 0 mean 1, task 1 (4 + 8) / 3 = 4; uniform weights.
    assert!(close(v(MftBalance::TaskBalanced), 2.5));
    // case4: task 0: 1; task 1: mean(4, 4) = 4.
    assert!(close(v(MftBalance::TaskSampleBalanced), 2.5));
    // Weights: 3:1 for task 0.
    let w = mft_loss(MftBalance::TaskBalanced, &l, &m, &t, Some(&[3.0, 1.0])).unwrap().item().unwrap();
    assert!(close(w, (3.0 * 1.0 + 4.0) / 4.0));
    assert_eq!(task_token_means(&l, &m, &t, 3).unwrap(), vec![Some(1.0), Some(4.0), None]);
}

/// Spec §1.4's test: case3 with two tasks of very different token counts equals the average of the two per-task
/// token means; case1 == case3 when one task only.
#[test]
fn case3_averages_task_means_and_equals_case1_for_one_task() {
    let (b, t) = (4, 50);
    let vals: Vec<f32> = (0..b * t).map(|i| ((i * 37 % 23) as f32) / 7.0).collect();
    let l = Tensor::from_vec(vals.clone(), &[b, t]).unwrap();
    // Task 0: rows 0-2, all 50 tokens each; task 1: row 3, 2 tokens.
    let mut m = vec![1.0f32; b * t];
    for v in &mut m[3 * t + 2..] {
        *v = 0.0;
    }
    let tasks = [0, 0, 0, 1];
    let mean0 = vals[..3 * t].iter().map(|&v| f64::from(v)).sum::<f64>() / (3 * t) as f64;
    let mean1 = (f64::from(vals[3 * t]) + f64::from(vals[3 * t + 1])) / 2.0;
    let c3 = mft_loss(MftBalance::TaskBalanced, &l, &m, &tasks, None).unwrap().item().unwrap();
    assert!(close(c3, (mean0 + mean1) / 2.0), "{c3} vs {}", (mean0 + mean1) / 2.0);
    let c1 = mft_loss(MftBalance::Plain, &l, &m, &tasks, None).unwrap().item().unwrap();
    assert!(!close(c1, (mean0 + mean1) / 2.0), "the token mean is dominated by task 0");
    let one = [0, 0, 0, 0];
    let c1 = mft_loss(MftBalance::Plain, &l, &m, &one, None).unwrap().item().unwrap();
    let c3 = mft_loss(MftBalance::TaskBalanced, &l, &m, &one, None).unwrap().item().unwrap();
    assert_eq!(c1, c3);
}

#[test]
fn samples_without_tokens_are_skipped_and_bad_input_is_typed() {
    let (l, mut m, t) = batch();
    // Sample 1 (task 1) loses its only token: case2/case4 skip it instead of dividing by zero.
    m[6] = 0.0;
    let c2 = mft_loss(MftBalance::SampleBalanced, &l, &m, &t, None).unwrap().item().unwrap();
    assert!(close(c2, 2.5), "{c2}");
    let c4 = mft_loss(MftBalance::TaskSampleBalanced, &l, &m, &t, None).unwrap().item().unwrap();
    assert!(close(c4, 2.5), "{c4}");
    let none = vec![0.0; 18];
    assert!(matches!(mft_loss(MftBalance::Plain, &l, &none, &t, None), Err(Error::Empty { .. })));
    assert!(matches!(mft_loss(MftBalance::Plain, &l, &m[..17], &t, None), Err(Error::Count { .. })));
    assert!(matches!(mft_loss(MftBalance::Plain, &l, &m, &t[..2], None), Err(Error::Count { .. })));
    let flat = Tensor::from_vec(vec![1.0; 18], &[18]).unwrap();
    assert!(matches!(mft_loss(MftBalance::Plain, &flat, &m, &t, None), Err(Error::Rank { .. })));
    assert!(matches!(mft_loss(MftBalance::TaskBalanced, &l, &m, &t, Some(&[1.0])), Err(Error::Count { .. })));
    assert!(matches!(mft_loss(MftBalance::TaskBalanced, &l, &m, &t, Some(&[1.0, f64::NAN])), Err(Error::Arg { .. })));
    assert!(matches!(mft_loss(MftBalance::TaskBalanced, &l, &m, &t, Some(&[0.0, 0.0])), Err(Error::Empty { .. })));
    let mut bad = m.clone();
    bad[0] = -1.0;
    assert!(matches!(mft_loss(MftBalance::Plain, &l, &bad, &t, None), Err(Error::Arg { .. })));
    assert!(matches!(task_token_means(&l, &m, &t, 1), Err(Error::Index { .. })));
    // No token positions at all: typed errors or no means, not an out-of-range index.
    let empty = Tensor::from_vec(vec![], &[3, 0]).unwrap();
    assert!(matches!(mft_loss(MftBalance::TaskBalanced, &empty, &[], &t, None), Err(Error::Empty { .. })));
    assert_eq!(task_token_means(&empty, &[], &t, 2).unwrap(), vec![None, None]);
}

proptest! {
    #![proptest_config(proptest_config(24))]
    /// Finite-difference check of every mode's gradient in the per-token losses (f64 central differences of the
    /// f32 loss, step 1e-2; the loss is linear in ℓ, so only rounding separates them).
    #[test]
    fn gradients_match_finite_differences(
        b in 1usize..5, t in 1usize..6, seed in 0u64..1000, mode in 0usize..4,
    ) {
        let mut r = seed;
        let mut next = || { r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (r >> 33) as f32 / (1u64 << 31) as f32 };
        let vals: Vec<f32> = (0..b * t).map(|_| 3.0 * next()).collect();
        let mut mask: Vec<f32> = (0..b * t).map(|_| if next() < 0.7 { 1.0 } else { 0.0 }).collect();
        mask[0] = 1.0;
        let tasks: Vec<usize> = (0..b).map(|_| (next() * 3.0) as usize % 3).collect();
        let w = [0.5, 1.0, 2.0];
        let bal = [MftBalance::Plain, MftBalance::SampleBalanced, MftBalance::TaskBalanced, MftBalance::TaskSampleBalanced][mode];
        let f = |v: &[f32]| -> f64 {
            let l = Tensor::from_vec(v.to_vec(), &[b, t]).unwrap();
            f64::from(mft_loss(bal, &l, &mask, &tasks, Some(&w)).unwrap().item().unwrap())
        };
        let x = Tensor::var(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[b, t]), vals.clone()).unwrap());
        let y = mft_loss(bal, &x, &mask, &tasks, Some(&w)).unwrap();
        let g = y.backward().unwrap();
        let gx: Vec<f32> = g.get(&x).unwrap().iter().copied().collect();
        for i in 0..b * t {
            let (mut p, mut q) = (vals.clone(), vals.clone());
            p[i] += 1e-2;
            q[i] -= 1e-2;
            let fd = (f(&p) - f(&q)) / 2e-2;
            prop_assert!((fd - f64::from(gx[i])).abs() <= 1e-3 * fd.abs().max(1.0), "{i}: fd {fd} vs {}", gx[i]);
        }
    }
}

#[test]
fn coba_is_uniform_in_warmup_then_sums_to_one_above_the_floor_and_follows_the_task_order() {
    let run = |swap: bool| {
        let mut c = Coba::with(3, 5, 50, 5.0);
        let mut all = Vec::new();
        for s in 0..30 {
            let s = s as f64;
            // Task 0 keeps falling; task 1 flattens after step 4; task 2 mirrors task 0.
            let t1 = if s < 4.0 { 2.0 - 0.1 * s } else { 1.6 - 0.001 * (s - 4.0) };
            let mut l = [Some(2.0 - 0.05 * s), Some(t1), Some(2.0 - 0.05 * s)];
            if swap {
                l.swap(0, 1);
            }
            c.observe(&l).unwrap();
            all.push(c.weights().to_vec());
        }
        all
    };
    let (a, b) = (run(false), run(true));
    for (s, (w, v)) in a.iter().zip(&b).enumerate() {
        if s + 2 < 5 {
            assert_eq!(w, &[1.0 / 3.0; 3], "step {s}: uniform during the warmup");
        }
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
        assert!(w.iter().all(|&x| x >= 1.0 / 30.0 - 1e-12), "floored at 1/(10N): {w:?}");
        // Identical histories get identical weights; swapping two tasks swaps their weights.
        assert!((w[0] - w[2]).abs() < 1e-12, "{w:?}");
        assert!((w[0] - v[1]).abs() < 1e-12 && (w[1] - v[0]).abs() < 1e-12, "{w:?} vs {v:?}");
    }
    assert_ne!(a[29][0], a[29][1], "different histories, different weights");
    let mut c = Coba::with(2, 5, 50, 5.0);
    c.observe(&[Some(0.5), None]).unwrap();
    assert!(matches!(c.observe(&[Some(1.0)]), Err(Error::Count { .. })));
    assert!(matches!(c.observe(&[Some(f64::NAN), None]), Err(Error::Arg { .. })));
}

/// CoBa against the reference's `compute_per_task_weight` and its training-loop timeline, ported to plain Python
/// (lists instead of torch tensors; `gen_mft_coba_fixture.py`, which wrote `mft_coba_fixture.in`) on this history:
/// warmup 3, history 4, τ = 5, three tasks, raw losses as the reference runs. Entry `j`: the weights for step
/// `j + 2`, after `j + 1` validation samples.
#[test]
fn coba_matches_the_reference_on_a_fixed_history() {
    let hist = [
        [2.0, 1.0, 3.0],
        [1.8, 0.99, 2.9],
        [1.7, 0.985, 2.5],
        [1.55, 0.984, 2.45],
        [1.5, 0.99, 2.2],
        [1.42, 0.97, 2.1],
    ];
    let mut c = Coba::with(3, 3, 4, 5.0).normalize_by_first(false);
    let mut got = Vec::new();
    for h in hist {
        c.observe(&h.map(Some)).unwrap();
        got.push(c.weights().to_vec());
    }
    let want: [[f64; 3]; 6] = include!("mft_coba_fixture.in");
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() < 1e-12, "step {s}: {g:?} vs {w:?}");
        }
    }
}

#[test]
fn task_weights_apply_fixed_or_coba_weights_to_task_losses() {
    let losses = vec![(0, Tensor::scalar(1.0)), (2, Tensor::scalar(4.0))];
    let mut w = TaskWeights::fixed(vec![1.0, 5.0, 3.0]);
    assert!(close(w.combine(0, &losses).unwrap().item().unwrap(), (1.0 + 12.0) / 4.0));
    assert!(matches!(w.combine(0, &[(3, Tensor::scalar(1.0))]), Err(Error::Index { .. })));
    let coba = Arc::new(Mutex::new(Coba::with(3, 100, 10, 5.0)));
    let mut w = TaskWeights::coba(coba.clone());
    assert!(close(w.combine(0, &losses).unwrap().item().unwrap(), 2.5));
    assert!(matches!(TaskWeights::fixed(vec![]).combine(0, &[]), Err(Error::Empty { .. })));
}
