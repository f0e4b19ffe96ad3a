//! Trainer behaviour on a small regression problem.

use std::cell::{Cell, RefCell};

use ndarray::{ArrayD, IxDyn};

use super::*;
use crate::nn::{Linear, RandomInit, WeightSource};

fn lin(seed: u64) -> Linear {
    let l = Linear::load("lin", 3, 2, true, &RandomInit::new(seed, 0.5)).unwrap();
    for p in l.base().params() {
        p.set_trainable(true);
    }
    l
}

fn data(n: usize, seed: u64) -> (Tensor, Tensor) {
    let x = RandomInit::new(seed, 1.0).get("x", &[n, 3]).unwrap();
    let y = RandomInit::new(seed + 1, 1.0).get("y", &[n, 2]).unwrap();
    (Tensor::new(x), Tensor::new(y))
}

fn mse(l: &Linear, x: &Tensor, y: &Tensor, ctx: &Ctx) -> crate::Result<Loss> {
    Ok(Loss::Single(l.forward(x, ctx)?.sub(y)?.square().mean_all()))
}

fn cfg(total: usize) -> TrainerConfig {
    TrainerConfig { lr: 0.05, total_steps: total, warmup_steps: 2, ..TrainerConfig::default() }
}

fn values(l: &Linear) -> Vec<ArrayD<f32>> {
    l.base().params().iter().map(|p| p.value().to_owned()).collect()
}

#[test]
fn trainer_fits_and_reports_each_step() {
    let l = lin(0);
    let (x, y) = data(16, 1);
    let mut t = Trainer::new(l.base().params(), &NoHooks, cfg(30)).unwrap();
    let reports = t.fit((0..30).map(|_| ()), |_, ctx| mse(&l, &x, &y, ctx), &mut Silent).unwrap();
    assert_eq!(reports.len(), 30);
    assert!(reports[29].loss < 0.6 * reports[0].loss, "{} -> {}", reports[0].loss, reports[29].loss);
    assert_eq!(reports[0].lr, 0.0, "warmup starts at 0");
    assert!((reports[2].lr - 0.05).abs() < 1e-12);
    assert!(reports.iter().all(|r| r.grad_norm.is_finite() && !r.skipped));
}

/// Two micro-batches of 8 accumulated = one batch of 16 (mean losses, equal halves).
#[test]
fn gradient_accumulation_equals_the_full_batch() {
    let (x, y) = data(16, 2);
    let (a, b) = (lin(3), lin(3));
    let mut full = Trainer::new(a.base().params(), &NoHooks, cfg(5)).unwrap();
    let mut acc = Trainer::new(b.base().params(), &NoHooks, TrainerConfig { grad_accum: 2, ..cfg(5) }).unwrap();
    let halves = [
        (x.narrow(0, 0, 8).unwrap(), y.narrow(0, 0, 8).unwrap()),
        (x.narrow(0, 8, 8).unwrap(), y.narrow(0, 8, 8).unwrap()),
    ];
    for _ in 0..5 {
        let r1 = full.step(|ctx| mse(&a, &x, &y, ctx)).unwrap();
        let mut k = 0;
        let r2 = acc
            .step(|ctx| {
                let (hx, hy) = &halves[k];
                k += 1;
                mse(&b, hx, hy, ctx)
            })
            .unwrap();
        assert!((r1.loss - r2.loss).abs() < 1e-5, "{} vs {}", r1.loss, r2.loss);
    }
    for (p, q) in values(&a).iter().zip(values(&b)) {
        assert!(crate::testing::max_abs_diff(p.as_slice().unwrap(), q.as_slice().unwrap()) < 1e-5);
    }
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_parameters() {
    let l = lin(4);
    let (x, y) = data(8, 5);
    let mut t = Trainer::new(l.base().params(), &NoHooks, cfg(10)).unwrap();
    t.step(|ctx| mse(&l, &x, &y, ctx)).unwrap();
    let good = values(&l);
    let e = t.step(|ctx| Ok(Loss::Single(l.forward(&x, ctx)?.mul_scalar(f32::NAN).mean_all()))).unwrap_err();
    assert!(matches!(e, TrainError::NonFinite { step: 1, .. }), "{e}");
    assert_eq!(values(&l), good);
    // An infinite gradient with a finite loss (x·∞ is ∞ only in the gradient path): also stopped.
    let big = Tensor::new(ArrayD::from_elem(IxDyn(&[8, 3]), f32::MAX));
    let e = t
        .step(|ctx| {
            Ok(Loss::Single(
                l.forward(&big, ctx)?
                    .mul_scalar(0.0)
                    .sum_all()
                    .add(&l.forward(&big, ctx)?.square().sum_all().mul_scalar(0.0))?,
            ))
        })
        .unwrap_err();
    assert!(matches!(e, TrainError::NonFinite { .. }), "{e}");
    assert_eq!(values(&l), good);
}

#[test]
fn skip_policy_skips_then_reports_divergence() {
    let l = lin(6);
    let (x, _) = data(8, 7);
    let policy = NonFinitePolicy::Skip { max_in_a_row: 3, max_fraction: 1.0 };
    let mut t = Trainer::new(l.base().params(), &NoHooks, TrainerConfig { non_finite: policy, ..cfg(100) }).unwrap();
    let nan = |ctx: &mut Ctx| Ok(Loss::Single(l.forward(&x, ctx)?.mul_scalar(f32::NAN).mean_all()));
    assert!(t.step(nan).unwrap().skipped);
    assert!(t.step(nan).unwrap().skipped);
    let e = t.step(nan).unwrap_err();
    assert!(matches!(e, TrainError::Diverged { skipped: 3, in_a_row: 3, .. }), "{e}");
}

/// Records what the trainer asked for.
struct Hooks {
    aux: Param,
    after: RefCell<Vec<usize>>,
    transformed: Cell<usize>,
}

impl TrainHooks for Hooks {
    fn aux_loss(&self) -> crate::Result<Option<Tensor>> {
        Ok(Some(self.aux.tensor().square().sum_all()))
    }
    fn transform_grads(&self, mut g: GradStore) -> crate::Result<GradStore> {
        self.transformed.set(self.transformed.get() + 1);
        // Zero the gradient of the aux parameter: it must not move.
        if let Some(v) = g.remove(self.aux.id()) {
            g.insert(self.aux.id(), v.mapv(|_| 0.0));
        }
        Ok(g)
    }
    fn after_step(&self, step: usize) -> crate::Result<()> {
        self.after.borrow_mut().push(step);
        Ok(())
    }
}

#[test]
fn hooks_are_called_in_order() {
    let l = lin(8);
    let (x, y) = data(8, 9);
    let h = Hooks {
        aux: Param::new("aux", ArrayD::from_elem(IxDyn(&[2]), 1.0), true),
        after: RefCell::new(Vec::new()),
        transformed: Cell::new(0),
    };
    let mut params = l.base().params();
    params.push(h.aux.clone());
    let mut t = Trainer::new(params, &h, TrainerConfig { grad_accum: 2, ..cfg(3) }).unwrap();
    let r = t.step(|ctx| mse(&l, &x, &y, ctx)).unwrap();
    assert_eq!(r.aux_loss, Some(2.0));
    let task = f64::from(
        crate::no_grad(|| l.forward(&x, &Ctx::eval()).unwrap().sub(&y).unwrap().square().mean_all()).item().unwrap(),
    );
    assert!(r.loss > 2.0 && (r.loss - 2.0) < task + 1.0);
    t.step(|ctx| mse(&l, &x, &y, ctx)).unwrap();
    assert_eq!(*h.after.borrow(), [0, 1]);
    assert_eq!(h.transformed.get(), 4, "once per micro-batch");
    assert_eq!(h.aux.value().as_slice().unwrap(), &[1.0, 1.0], "its gradient was zeroed by the transform");
}

#[test]
fn multi_task_losses_are_weighted() {
    let l = lin(10);
    let (x, y) = data(8, 11);
    let mut t = Trainer::new(l.base().params(), &NoHooks, cfg(3))
        .unwrap()
        .with_loss_weighting(Box::new(StaticWeights(vec![1.0, 0.0])));
    let r = t
        .step(|ctx| {
            let a = l.forward(&x, ctx)?.sub(&y)?.square().mean_all();
            Ok(Loss::Tasks(vec![(0, a.clone()), (1, a.mul_scalar(100.0))]))
        })
        .unwrap();
    assert!((r.loss - r.task_losses[0].1).abs() < 1e-6, "task 1 has weight 0");
    assert_eq!(r.task_losses.len(), 2);
    let mut bad = Trainer::new(l.base().params(), &NoHooks, cfg(3))
        .unwrap()
        .with_loss_weighting(Box::new(StaticWeights(vec![1.0])));
    assert!(bad.step(|ctx| Ok(Loss::Tasks(vec![(3, l.forward(&x, ctx)?.sum_all())]))).is_err());
}

/// 6 steps straight = 3 steps, checkpoint, a new trainer resumed from it, 3 more steps (bit for bit).
#[test]
fn checkpoint_resume_continues_exactly() {
    let (x, y) = data(8, 12);
    let a = lin(13);
    let mut t = Trainer::new(a.base().params(), &NoHooks, cfg(6)).unwrap();
    for _ in 0..6 {
        t.step(|ctx| mse(&a, &x, &y, ctx)).unwrap();
    }
    let straight = values(&a);

    let b = lin(13);
    let dir = tempfile::tempdir().unwrap();
    {
        let mut t = Trainer::new(b.base().params(), &NoHooks, cfg(6)).unwrap();
        for _ in 0..3 {
            t.step(|ctx| mse(&b, &x, &y, ctx)).unwrap();
        }
        t.save_checkpoint(dir.path()).unwrap();
        // Training on after the checkpoint, then "crashing": the checkpoint still holds step 3.
        t.step(|ctx| mse(&b, &x, &y, ctx)).unwrap();
    }
    // A stale temporary of a killed writer is cleaned by the next save.
    std::fs::create_dir_all(dir.path().join(".step-00000009.tmp-1")).unwrap();
    let c = lin(99); // other values: the checkpoint must overwrite them
    let mut t = Trainer::new(c.base().params(), &NoHooks, cfg(6)).unwrap();
    assert!(t.load_checkpoint(dir.path()).unwrap());
    assert_eq!(t.steps_done(), 3);
    for _ in 0..3 {
        t.step(|ctx| mse(&c, &x, &y, ctx)).unwrap();
    }
    assert_eq!(values(&c), straight);
    t.save_checkpoint(dir.path()).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(
        names.contains(&"step-00000006".to_string())
            && !names.iter().any(|n| n.contains("tmp") || n == "step-00000003"),
        "{names:?}"
    );
    // A checkpoint of other parameters is refused.
    let other = Linear::load("other", 3, 2, true, &RandomInit::new(0, 0.5)).unwrap();
    let mut t = Trainer::new(other.base().params(), &NoHooks, cfg(6)).unwrap();
    assert!(matches!(t.load_checkpoint(dir.path()), Err(TrainError::Checkpoint { .. })));
    let empty = tempfile::tempdir().unwrap();
    assert!(!t.load_checkpoint(empty.path()).unwrap());
}

#[test]
fn bad_settings_are_config_errors() {
    let l = lin(0);
    for c in [
        TrainerConfig { grad_accum: 0, ..cfg(1) },
        TrainerConfig { lr: f64::NAN, ..cfg(1) },
        TrainerConfig { max_grad_norm: Some(0.0), ..cfg(1) },
    ] {
        assert!(matches!(Trainer::new(l.base().params(), &NoHooks, c), Err(TrainError::Config(_))));
    }
}
