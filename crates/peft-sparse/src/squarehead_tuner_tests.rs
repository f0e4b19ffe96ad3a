use peft_core::adapter::{AdapterError, PeftModel};
use peft_core::nn::{named_params, Ctx};
use peft_core::train::{Loss, Trainer, TrainerConfig};

use super::*;
use crate::registry;
use crate::squarehead::pruned_count;
use crate::testutil::{input, Tiny};

const TARGET: &str = r".*encoder\.layer\.\d+\..*\.weight";
const D: usize = 8;

fn model(c: SquareheadConfig) -> PeftModel<Tiny> {
    let mut pm = PeftModel::wrap(Tiny::new(D, 2, 1), 3);
    let mut c = c;
    c.modules_to_save = Some(vec!["classifier".into()]);
    pm.add_adapter_boxed("default", Box::new(c)).unwrap();
    pm.set_adapter("default").unwrap();
    pm
}

fn tuner(m: &PeftModel<Tiny>) -> &SquareheadTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<SquareheadTuner>().unwrap()
}

fn zeros(p: &Param) -> Vec<bool> {
    p.value().iter().map(|v| *v == 0.0).collect()
}

/// `steps` trainer steps on the squared output (any loss will do: the pruner works in the hook).
fn train(m: &PeftModel<Tiny>, steps: usize) -> Vec<f64> {
    let x = input(6, D, 4);
    let tc = TrainerConfig { lr: 1e-2, total_steps: steps, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), m, tc).unwrap();
    (0..steps).map(|_| t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap().loss).collect()
}

#[test]
fn injection_changes_nothing_and_trains_every_base_parameter() {
    let plain = Tiny::new(D, 2, 1);
    let x = input(5, D, 2);
    let y0 = plain.forward(&x, &Ctx::eval()).unwrap();
    let m = model(SquareheadConfig::new(TARGET, 0.5, Some(4)));
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0.to_vec());
    let n_base: usize = named_params(&plain).iter().map(|p| p.numel()).sum();
    let trainable: usize = m.trainable_params().iter().map(|p| p.numel()).sum();
    assert_eq!(trainable, n_base, "the student is fine-tuned in full");
    assert_eq!(tuner(&m).targets().len(), 6);
    assert_eq!(tuner(&m).sparsity(), 0.0);
}

#[test]
fn the_trainer_hook_prunes_on_schedule_and_the_pattern_survives_later_steps() {
    let m = model(SquareheadConfig::new(TARGET, 0.75, Some(4)));
    train(&m, 5);
    // Step 4 reached 75% in every matrix (per-matrix scope): round(0.75·64) = 48 zeros each.
    for p in tuner(&m).targets() {
        assert_eq!(zeros(p).iter().filter(|z| **z).count(), pruned_count(64, 0.75), "{}", p.name());
    }
    assert_eq!(tuner(&m).mask_sparsity(), Some(0.75));
    let pattern: Vec<Vec<bool>> = tuner(&m).targets().iter().map(zeros).collect();
    // AdamW keeps moving the pruned entries (their moments are non-zero); the hook puts them back to zero.
    train(&m, 6);
    let after: Vec<Vec<bool>> = tuner(&m).targets().iter().map(zeros).collect();
    assert_eq!(after, pattern);
    // Biases and the head are not pruned.
    for p in
        named_params(m.model()).iter().filter(|p| !p.name().ends_with(".weight") || p.name().starts_with("classifier"))
    {
        assert!(zeros(p).iter().all(|z| !z), "{} was pruned", p.name());
    }
}

#[test]
fn the_schedule_is_cubic_and_only_grows() {
    let m = model(SquareheadConfig { prune_every: 1, ..SquareheadConfig::new(TARGET, 0.9, Some(6)) });
    let x = input(6, D, 4);
    let tc = TrainerConfig { lr: 1e-2, total_steps: 8, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), &m, tc).unwrap();
    let mut seen = Vec::new();
    for _ in 0..8 {
        t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
        seen.push(tuner(&m).sparsity());
    }
    for (step, s) in seen.iter().enumerate() {
        let want = pruned_count(64, crate::squarehead::cubic_sparsity(step.min(6), 6, 0.0, 0.9)) as f64 / 64.0;
        assert!((s - want).abs() < 1e-12, "step {step}: {s} vs {want}");
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}

#[test]
fn a_pruned_model_trained_further_keeps_its_zeros() {
    // The student of a second round: weights with zeros copied in after injection (as a saved pruned model or a
    // teacher copy arrives). The masks are recorded at the first step, so the copied zeros are kept.
    let src = model(SquareheadConfig::new(TARGET, 0.5, Some(1)));
    train(&src, 2);
    let m = model(SquareheadConfig::new(TARGET, 0.5, Some(3)));
    for (p, q) in tuner(&m).targets().iter().zip(tuner(&src).targets()) {
        p.set(q.value().to_owned()).unwrap();
    }
    let pattern: Vec<Vec<bool>> = tuner(&src).targets().iter().map(zeros).collect();
    train(&m, 5);
    let after: Vec<Vec<bool>> = tuner(&m).targets().iter().map(zeros).collect();
    assert_eq!(after, pattern, "the copied zeros were lost or more were pruned");
}

#[test]
fn global_scope_reaches_the_target_over_all_matrices() {
    let m = model(SquareheadConfig { global: true, ..SquareheadConfig::new(TARGET, 0.5, Some(2)) });
    train(&m, 3);
    let t = tuner(&m);
    assert_eq!(t.sparsity(), 0.5);
    let per: Vec<usize> = t.targets().iter().map(|p| zeros(p).iter().filter(|z| **z).count()).collect();
    assert_eq!(per.iter().sum::<usize>(), 6 * 32);
}

#[test]
fn save_load_save_keeps_the_pruned_model_and_loading_does_not_prune() {
    let m = model(SquareheadConfig::new(TARGET, 0.5, Some(2)));
    train(&m, 3);
    let x = input(6, D, 9);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let (m2, report) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()).unwrap();
    assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{report:?}");
    assert_eq!(m2.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
    // Loaded frozen (saved folders say inference mode): no pruner, the zeros as saved.
    assert_eq!(tuner(&m2).mask_sparsity(), None);
    assert_eq!(tuner(&m2).sparsity(), 0.5);
    let dir2 = tempfile::tempdir().unwrap();
    m2.save_pretrained(dir2.path()).unwrap();
    crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
    // Merge is a no-op (the values are the base values); unmerge is refused with a typed error.
    assert!(m2.tuner("default").unwrap().merge().is_ok());
    assert!(matches!(m2.tuner("default").unwrap().unmerge(), Err(AdapterError::NotSupportedBy { .. })));
}

#[test]
fn bad_configs_are_typed_errors() {
    let bad = |c: SquareheadConfig| PeftModel::new(Tiny::new(D, 2, 1), c, "default", 0).err();
    let base = || SquareheadConfig::new(TARGET, 0.5, Some(4));
    let cases: Vec<(SquareheadConfig, &str)> = vec![
        (SquareheadConfig { final_sparsity: 1.5, ..base() }, "final_sparsity"),
        (SquareheadConfig { initial_sparsity: 0.7, ..base() }, "final_sparsity"),
        (SquareheadConfig { prune_every: 0, ..base() }, "every"),
        (SquareheadConfig { h_sq: f64::NAN, ..base() }, "h_sq"),
        (SquareheadConfig { h_kl: -1.0, ..base() }, "h_kl"),
        (SquareheadConfig { temperature: 0.0, ..base() }, "temperature"),
        (SquareheadConfig::new(r".*\.bias", 0.5, Some(4)), "target_parameters"),
    ];
    for (c, field) in cases {
        let e = bad(c).expect("a bad config was accepted");
        assert!(matches!(&e, AdapterError::InvalidConfig { field: f, .. } if f == field), "{field}: {e:?}");
    }
    assert!(matches!(
        bad(SquareheadConfig::new("nothing", 0.5, Some(4))),
        Some(AdapterError::Core(peft_core::Error::NoTargetMatched { .. }))
    ));
    // Unknown keys are reported, not fatal.
    let mut v = base().to_json().unwrap();
    v["sparsity_typo"] = serde_json::Value::from(0.3);
    let (_, ignored) = SquareheadConfig::from_json(&v).unwrap();
    assert_eq!(ignored.len(), 1);
}

#[test]
fn the_config_round_trips_and_gives_the_loss_weights() {
    let c = SquareheadConfig { h_kl: 0.5, temperature: 2.0, ..SquareheadConfig::new(TARGET, 0.9, Some(40)) };
    let (back, ignored) = SquareheadConfig::from_json(&c.to_json().unwrap()).unwrap();
    assert!(ignored.is_empty());
    assert_eq!(back, c);
    let l = c.loss();
    assert_eq!((l.h_ce, l.h_kl, l.h_sq, l.temperature), (1.0, 0.5, 1.0, 2.0));
    assert_eq!(c.schedule().unwrap().map(|s| s.end_step), Some(40));
    let unset = SquareheadConfig::new(TARGET, 0.9, None);
    assert!(matches!(unset.schedule(), Err(SparseError::Config { field: "prune_end_step", .. })));
    assert_eq!(SquareheadConfig { inference_mode: true, ..unset }.schedule().unwrap(), None);
}
