use ndarray::arr1;
use peft_core::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
use peft_core::Param;

use super::*;

fn grads(step: usize) -> Vec<f32> {
    (0..5).map(|j| ((step * 5 + j) as f32 * 0.77 + 0.3).sin()).collect()
}

#[test]
fn equals_torch_adamw_when_ages_agree_and_eps_is_zero() {
    let init = [0.5f32, -1.0, 0.25, 2.0, -0.1];
    let p = Param::new("w", arr1(&init).into_dyn(), true);
    let mut core =
        AdamW::new(vec![ParamGroup::new(vec![p.clone()], 0.05, 0.01)], AdamWConfig { betas: (0.9, 0.999), eps: 0.0 })
            .unwrap();
    let cfg = SparseAdamWConfig { lr: 0.05, betas: (0.9, 0.999), eps: 0.0, weight_decay: 0.01 };
    let mut sparse = SparseAdamW::new(cfg, &[5]);
    let mut mine = init.to_vec();
    for s in 0..6 {
        let g = grads(s);
        let mut store = peft_core::GradStore::default();
        store.insert(p.id(), arr1(&g).into_dyn());
        core.step(&store).unwrap();
        sparse.step(0, &mut mine, &g, 0.05);
    }
    for (a, b) in p.value().iter().zip(&mine) {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
}

#[test]
fn seeded_state_reproduces_plain_adam_on_a_freshly_activated_entry() {
    // Entry trained from scratch with a constant gradient for `age` steps...
    let (g, age) = (0.3f32, 4u32);
    let cfg = SparseAdamWConfig::default();
    let mut plain = SparseAdamW::new(cfg, &[1]);
    let mut v = [0.0f32];
    for _ in 0..age {
        plain.step(0, &mut v, &[g], 0.0);
    }
    // ...and the same entry activated late with a seed from `age` accumulated gradients.
    let mut seeded = SparseAdamW::new(cfg, &[1]);
    let old = SparseIndices::new("w", vec![], 10).unwrap();
    let new = SparseIndices::new("w", vec![5], 10).unwrap();
    seeded.remap(0, &SparseIndices::new("w", vec![2], 10).unwrap(), &old, |_| None);
    seeded.remap(0, &old, &new, |_| Some(Seed { mean_grad: g, mean_sq: g * g, age }));
    let (a, b) = (plain.state(0).unwrap(), seeded.state(0).unwrap());
    assert_eq!(a.age, b.age);
    assert!((a.exp_avg[0] - b.exp_avg[0]).abs() <= 1e-7);
    assert!((a.exp_avg_sq[0] - b.exp_avg_sq[0]).abs() <= 1e-8);
    let (mut x, mut y) = ([0.0f32], [0.0f32]);
    plain.step(0, &mut x, &[0.1], 1e-2);
    seeded.step(0, &mut y, &[0.1], 1e-2);
    assert!((x[0] - y[0]).abs() <= 1e-8, "{} vs {}", x[0], y[0]);
}

#[test]
fn remap_keeps_state_of_kept_entries_and_zeroes_new_ones() {
    let mut opt = SparseAdamW::new(SparseAdamWConfig::default(), &[3]);
    let mut v = [0.0f32; 3];
    opt.step(0, &mut v, &[1.0, 2.0, 3.0], 1e-3);
    let old = SparseIndices::new("w", vec![1, 4, 7], 10).unwrap();
    let new = SparseIndices::new("w", vec![0, 4, 7], 10).unwrap();
    let before = opt.state(0).unwrap().clone();
    opt.remap(0, &old, &new, |_| None);
    let s = opt.state(0).unwrap();
    assert_eq!((s.exp_avg[0], s.exp_avg_sq[0], s.age[0]), (0.0, 0.0, 0));
    assert_eq!(s.exp_avg[1..], before.exp_avg[1..]);
    assert_eq!(s.age[1..], before.age[1..]);
}

#[test]
fn state_is_twelve_bytes_per_entry() {
    assert_eq!(SparseAdamW::new(SparseAdamWConfig::default(), &[10, 30]).state_bytes(), 12 * 40);
}
