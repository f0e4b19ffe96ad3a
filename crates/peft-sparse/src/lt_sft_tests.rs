use peft_core::adapter::PeftModel;
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;
use peft_core::train::{Loss, Trainer, TrainerConfig};

use super::*;
use crate::memory::optimizer_state_bytes;
use crate::testutil::{input, Tiny};

const TARGET: &str = r".*encoder\.layer\.\d+\..*\.weight";

fn tuner(m: &PeftModel<Tiny>) -> &SparseTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<SparseTuner>().unwrap()
}

fn bits(m: &PeftModel<Tiny>) -> Vec<Vec<u32>> {
    m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn identity_at_init() {
    let x = input(5, 8, 9);
    let y0 = Tiny::new(8, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let m = PeftModel::new(Tiny::new(8, 2, 1), LtSftConfig::new(TARGET, 0.25), "default", 7).unwrap();
    assert!(max_abs_diff(m.forward(&x, &Ctx::eval()).unwrap().as_slice(), y0.as_slice()) <= 1e-6);
}

#[test]
fn full_phase_then_reset_then_sparse_phase_keeps_outside_mask_at_theta0() {
    let mut cfg = LtSftConfig::new(TARGET, 0.25);
    (cfg.full_steps, cfg.full_lr, cfg.lr) = (3, 1e-2, 1e-2);
    let mut m = PeftModel::new(Tiny::new(8, 2, 1), cfg, "default", 7).unwrap();
    let theta0 = bits(&m);
    let total_k = tuner(&m).trainable_entries();
    assert_eq!(total_k, 96);
    // Full phase: dense state, 16 bytes per target entry (θ⁰, grad, m, v) + 12 per value.
    assert_eq!(tuner(&m).own_state_bytes(), 16 * 6 * 64 + 12 * 96);
    let x = input(6, 8, 4);
    let tc = TrainerConfig { lr: 1e-2, total_steps: 8, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), &m, tc).unwrap();
    let step = |t: &mut Trainer<'_>| t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
    step(&mut t);
    assert_ne!(bits(&m), theta0, "the full phase trains the targets densely");
    let changed: Vec<Vec<f32>> = m.base_params().iter().map(|p| p.value().iter().copied().collect()).collect();
    step(&mut t);
    step(&mut t);
    // Phase over: targets reset to θ⁰ exactly, the mask is k entries per tensor, dense state freed.
    assert_eq!(bits(&m), theta0);
    assert_eq!(tuner(&m).own_state_bytes(), 12 * 96);
    // The same through the `Tuner` trait, which memory reports read without knowing the method.
    assert_eq!(m.tuner("default").unwrap().state_bytes(), 12 * 96);
    for (_, d) in tuner(&m).entries() {
        assert_eq!(d.indices().len(), 16);
        assert!(d.values().value().iter().all(|v| *v == 0.0));
    }
    let _ = changed;
    for _ in 0..5 {
        step(&mut t);
    }
    assert_eq!(optimizer_state_bytes(t.optimizer()), 0);
    drop(t);
    assert_eq!(bits(&m), theta0, "the sparse phase never writes the base");
    assert!(tuner(&m).entries().iter().all(|(_, d)| d.values().value().iter().any(|v| *v != 0.0)));
    // Merge == unmerged forward; merge -> unmerge restores θ⁰ bit for bit.
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    m.merge_adapter().unwrap();
    assert!(max_abs_diff(m.forward(&x, &Ctx::eval()).unwrap().as_slice(), y.as_slice()) <= 1e-5);
    m.unmerge_adapter().unwrap();
    assert_eq!(bits(&m), theta0);
}

#[test]
fn the_mask_is_the_top_k_changed_entries() {
    // One full step, then inspect: the chosen indices are the k largest |θ − θ⁰| of that step.
    let mut cfg = LtSftConfig::new(TARGET, 0.25);
    (cfg.full_steps, cfg.full_lr) = (1, 1e-2);
    let m = PeftModel::new(Tiny::new(8, 2, 1), cfg, "default", 7).unwrap();
    let theta0: Vec<Vec<f32>> = tuner(&m).entries().iter().map(|(p, _)| p.value().iter().copied().collect()).collect();
    // Reproduce the full step's update outside: capture θ after the step via a second model without reset.
    let mut cfg2 = LtSftConfig::new(TARGET, 0.25);
    (cfg2.full_steps, cfg2.full_lr) = (5, 1e-2);
    let m2 = PeftModel::new(Tiny::new(8, 2, 1), cfg2, "default", 7).unwrap();
    let x = input(6, 8, 4);
    for mm in [&m, &m2] {
        let tc = TrainerConfig { lr: 1e-2, total_steps: 1, ..TrainerConfig::default() };
        let mut t = Trainer::new(mm.trainable_params(), mm, tc).unwrap();
        t.step(|ctx| Ok(Loss::Single(mm.forward(&x, ctx)?.square().mean_all()))).unwrap();
    }
    for (((p2, _), (_, d)), t0) in tuner(&m2).entries().iter().zip(tuner(&m).entries()).zip(&theta0) {
        let moved: Vec<f32> = p2.value().iter().zip(t0).map(|(a, b)| (a - b).abs()).collect();
        assert_eq!(d.indices().to_u64(), crate::select::top_k_indices(&moved, d.k()));
    }
}
