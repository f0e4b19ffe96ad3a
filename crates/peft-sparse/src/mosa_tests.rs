use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::PeftModel;
use peft_core::nn::Ctx;
use peft_core::testing::{array_strategy, assert_grads, max_abs_diff};
use peft_core::train::{Loss, Trainer, TrainerConfig};
use proptest::prelude::*;

use peft_core::adapter::AdapterError;

use super::*;
use crate::testutil::{input, Tiny};
use crate::{registry, FFN_OUTPUTS};

const D: usize = 8;

fn config(n: usize) -> MosaConfig {
    let mut c = MosaConfig::new(FFN_OUTPUTS, 4, n);
    c.dropout = 0.0;
    c.scaling = 0.5;
    c
}

fn model(c: MosaConfig) -> PeftModel<Tiny> {
    PeftModel::new(Tiny::new(D, 2, 1), c, "default", 11).unwrap()
}

fn mosa(m: &PeftModel<Tiny>) -> &MosaTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<MosaTuner>().unwrap()
}

fn train(m: &PeftModel<Tiny>, steps: usize) {
    let x = input(6, D, 4);
    let cfg = TrainerConfig { lr: 5e-2, total_steps: steps, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), m, cfg).unwrap();
    for _ in 0..steps {
        t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
    }
}

fn bits(a: &ArrayD<f32>) -> Vec<u32> {
    a.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn identity_at_init() {
    let x = input(5, D, 9);
    let y0 = Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let m = model(config(3));
    assert_eq!(mosa(&m).layers().len(), 2);
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0.to_vec());
    assert_eq!(m.forward(&x, &Ctx::train(3)).unwrap().to_vec(), y0.to_vec());
}

#[test]
fn masks_are_disjoint_covering_and_equal_quantile() {
    for n in [1usize, 2, 3, 5] {
        let m = model(config(n));
        for (_, l) in mosa(&m).layers() {
            let (down, up) = l.expert_ids();
            if n == 1 {
                assert!(down.is_none() && up.is_none());
                continue;
            }
            for ids in [down.unwrap(), up.unwrap()] {
                check_expert_ids("ids", &ids, n).unwrap();
                // One id per entry: disjoint and covering by construction; the sizes are equal quantiles.
                let counts: Vec<usize> = (0..n).map(|e| ids.iter().filter(|&&v| v == e as f32).count()).collect();
                assert_eq!(counts.iter().sum::<usize>(), ids.len());
                let (lo, hi) = (ids.len() / n, ids.len().div_ceil(n));
                assert!(counts.iter().all(|&c| c == lo || c == hi), "{counts:?}");
                // The masks built from the map sum to one everywhere.
                let mut sum = ArrayD::<f32>::zeros(ids.raw_dim());
                for e in 0..n {
                    sum = sum + l.down_or_up_mask(&ids, e);
                }
                assert!(sum.iter().all(|&v| v == 1.0));
            }
        }
    }
}

impl MosaLinear {
    fn down_or_up_mask(&self, ids: &ArrayD<f32>, e: usize) -> ArrayD<f32> {
        ids.mapv(|v| if v == e as f32 { 1.0 } else { 0.0 })
    }
}

#[test]
fn merged_adapter_equals_unmerged_eval_forward_and_the_mean_of_experts() {
    let m = model(config(3));
    train(&m, 6);
    let x = input(5, D, 2);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let base = Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), base.as_slice()) > 1e-4, "training moved nothing");
    let t = mosa(&m);
    for (_, l) in t.layers() {
        let mw = l.merged_weights().unwrap();
        let experts: Vec<_> = (0..3).map(|i| l.expert(i).unwrap()).collect();
        let mean = |which: usize| {
            let pick = |e: &(ArrayD<f32>, ArrayD<f32>)| if which == 0 { e.0.clone() } else { e.1.clone() };
            experts.iter().map(pick).fold(ArrayD::zeros(pick(&experts[0]).raw_dim()), |a, e| a + e) / 3.0
        };
        let (md, mu) = (mean(0), mean(1));
        assert!(max_abs_diff(mw.down.as_slice().unwrap(), md.as_slice().unwrap()) <= 1e-6);
        assert!(max_abs_diff(mw.up.as_slice().unwrap(), mu.as_slice().unwrap()) <= 1e-6);
    }
    let merged = t.merge_experts().unwrap();
    assert_eq!(merged.len(), 2);
    assert!(t.layers().iter().all(|(_, l)| l.is_experts_merged()));
    let ym = m.forward(&x, &Ctx::eval()).unwrap();
    assert_eq!(ym.to_vec(), y.to_vec());
    // The merged adapter is one adapter: training-mode forwards no longer draw experts.
    assert_eq!(m.forward(&x, &Ctx::train(5)).unwrap().to_vec(), y.to_vec());
    t.unmerge_experts();
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
}

#[test]
fn experts_differ_only_inside_their_masks() {
    let m = model(config(3));
    train(&m, 6);
    for (_, l) in mosa(&m).layers() {
        let (dids, uids) = l.expert_ids();
        let (dids, uids) = (dids.unwrap(), uids.unwrap());
        let dinit = l.down.split.as_ref().unwrap().0.value().to_owned();
        let mut changed = 0;
        for i in 0..3 {
            let (d, u) = l.expert(i).unwrap();
            for (j, (&a, &b)) in d.iter().zip(dinit.iter()).enumerate() {
                if dids.as_slice().unwrap()[j] != i as f32 {
                    assert_eq!(a.to_bits(), b.to_bits());
                } else if a != b {
                    changed += 1;
                }
            }
            for (j, &a) in u.iter().enumerate() {
                if uids.as_slice().unwrap()[j] != i as f32 {
                    assert_eq!(a, 0.0);
                }
            }
        }
        assert!(changed > 0);
    }
}

#[test]
fn a_training_forward_sends_gradient_to_one_expert_per_projection() {
    let m = model(config(3));
    for (_, l) in mosa(&m).layers() {
        let shape = l.up.comb.shape();
        l.up.comb.set(ArrayD::from_shape_fn(IxDyn(&shape), |i| 0.1 + 0.01 * (i[0] * 7 + i[1]) as f32)).unwrap();
    }
    let x = input(5, D, 3);
    for seed in 0..4 {
        let g = m.forward(&x, &Ctx::train(seed)).unwrap().square().sum_all().backward().unwrap();
        for (_, l) in mosa(&m).layers() {
            let (dids, uids) = l.expert_ids();
            for (p, ids) in [(&l.down.comb, dids.unwrap()), (&l.up.comb, uids.unwrap())] {
                let g = g.get_id(p.id()).unwrap();
                let experts: std::collections::BTreeSet<u32> =
                    g.iter().zip(ids.iter()).filter(|(g, _)| **g != 0.0).map(|(_, &e)| e as u32).collect();
                assert_eq!(experts.len(), 1, "gradient reached experts {experts:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(24))]
    #[test]
    fn expert_bottleneck_grads_match_finite_differences(
        x in array_strategy(vec![3, 5], -1.0, 1.0),
        comb in array_strategy(vec![4, 5], -1.0, 1.0),
        init in array_strategy(vec![4, 5], -1.0, 1.0),
        mask in array_strategy(vec![4, 5], 0.0, 1.0),
        up in array_strategy(vec![6, 4], -1.0, 1.0),
        db in array_strategy(vec![4], -0.5, 0.5),
        ub in array_strategy(vec![6], -0.5, 0.5),
        act in 0usize..3,
    ) {
        let mask = mask.mapv(|v| v.round());
        let act = [Activation::Gelu, Activation::Relu, Activation::Tanh][act];
        // (A pre-activation within eps of ReLU's kink is vanishingly unlikely with these random inputs.)
        let mask_t = Tensor::new(mask);
        let init_t = Tensor::new(init);
        assert_grads(|t| {
            let w = expert_weight(&t[1], &init_t, &mask_t)?;
            bottleneck(&t[0], &w, &t[3], &t[2], &t[4], act, 0.7, None)
        }, &[x.clone(), comb.clone(), up.clone(), db.clone(), ub.clone()]);
        assert_grads(|t| {
            let w = merged_weight(&t[1], &init_t, 3, MergeMode::Mean)?;
            bottleneck(&t[0], &w, &t[3], &t[2], &t[4], Activation::Tanh, 0.7, None)
        }, &[x, comb, up, db, ub]);
    }
}

#[test]
fn save_load_save_is_byte_identical_and_reproduces_outputs() {
    for share in [Share::None, Share::Down] {
        let mut c = config(3);
        c.share = share;
        let m = model(c);
        train(&m, 3);
        let x = input(3, D, 8);
        let y = m.forward(&x, &Ctx::eval()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        m.save_pretrained(dir.path()).unwrap();
        let f = peft_core::io::SafeTensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
        let key = "base_model.model.encoder.layer.0.output.dense.mosa_down";
        assert_eq!(f.shape(&format!("{key}.expert")).is_ok(), share == Share::None);
        assert_eq!(f.len(), if share == Share::None { 16 } else { 12 });
        let (m2, report) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()).unwrap();
        assert!(report.unexpected.is_empty(), "{report:?}");
        assert_eq!(m2.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
        let dir2 = tempfile::tempdir().unwrap();
        m2.save_pretrained(dir2.path()).unwrap();
        crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
        // The masks travel with the file.
        for ((_, a), (_, b)) in mosa(&m).layers().iter().zip(mosa(&m2).layers()) {
            assert_eq!(a.expert_ids().0.map(|a| bits(&a)), b.expert_ids().0.map(|a| bits(&a)));
        }
    }
}

#[test]
fn corrupt_expert_ids_are_a_typed_error() {
    let m = model(config(3));
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join("adapter_model.safetensors");
    let key = "base_model.model.encoder.layer.1.output.dense.mosa_up.expert";
    for bad in [3.0f32, -1.0, 0.5, f32::NAN] {
        let mut tensors = peft_core::io::read_safetensors(&path).unwrap();
        tensors.get_mut(key).unwrap().as_slice_mut().unwrap()[5] = bad;
        let bad_dir = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("adapter_config.json"), bad_dir.path().join("adapter_config.json")).unwrap();
        peft_core::io::write_safetensors(bad_dir.path().join("adapter_model.safetensors"), tensors.iter(), None)
            .unwrap();
        let Err(e) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), bad_dir.path(), &registry()) else {
            panic!("loaded expert id {bad}")
        };
        assert!(
            matches!(SparseError::of_adapter(&e), Some(SparseError::BadExpertId { position: 5, experts: 3, .. })),
            "{e:?}"
        );
    }
}

#[test]
fn bad_configs_are_typed_errors_and_merging_into_the_base_is_refused() {
    let cases: Vec<(MosaConfig, &str)> = vec![
        (MosaConfig { num_experts: 0, ..config(3) }, "num_experts"),
        (MosaConfig { num_experts: 300, ..config(3) }, "num_experts"),
        (MosaConfig { bottleneck: 0, ..config(3) }, "bottleneck"),
        (MosaConfig { dropout: 1.0, ..config(3) }, "dropout"),
        (MosaConfig { scaling: f64::NAN, ..config(3) }, "scaling"),
        // 2 x 8 = 16 entries in the down projection: 17 experts cannot partition it.
        (MosaConfig { bottleneck: 2, num_experts: 17, ..config(3) }, "num_experts"),
    ];
    for (c, field) in cases {
        let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), c, "default", 0) else { panic!("accepted {field}") };
        assert!(matches!(&e, AdapterError::InvalidConfig { field: f, .. } if f.as_str() == field), "{field}: {e:?}");
    }
    let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), MosaConfig::new("nothing", 4, 2), "default", 0) else {
        panic!("accepted")
    };
    assert!(e.to_string().contains("no adapter site matched"), "{e}");
    let mut m = model(config(2));
    assert!(m.merge_adapter().is_err());
}

#[test]
fn joint_merge_is_the_combined_matrix_over_n() {
    let mut c = config(4);
    c.merge_mode = MergeMode::Joint;
    let m = model(c);
    train(&m, 3);
    for (_, l) in mosa(&m).layers() {
        let mw = l.merged_weights().unwrap();
        let want = l.down.comb.value().mapv(|v| v * 0.25);
        assert!(max_abs_diff(mw.down.as_slice().unwrap(), want.as_slice().unwrap()) <= 1e-7);
    }
}

#[test]
fn config_json_round_trips() {
    let mut c = config(3);
    c.share = Share::Up;
    c.activation = Activation::Relu;
    let v = c.to_json().unwrap();
    let (back, ignored) = MosaConfig::from_json(&v).unwrap();
    assert_eq!(back, c);
    assert!(ignored.is_empty());
}

#[test]
fn symmetric_kl_value_and_gradients() {
    let a0 = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.1f32, 0.5, -0.2, 1.0, 0.0, 0.3]).unwrap();
    let b0 = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.4f32, -0.5, 0.2, 0.0, 1.0, 0.3]).unwrap();
    assert!(symmetric_kl(&Tensor::new(a0.clone()), &Tensor::new(a0.clone())).unwrap().item().unwrap().abs() < 1e-7);
    let (a, b) = (Tensor::var(a0.clone()), Tensor::var(b0.clone()));
    let l = symmetric_kl(&a, &b).unwrap();
    let softmax = |x: &ArrayD<f32>| {
        let mut out = x.clone();
        for mut row in out.rows_mut() {
            let z: f32 = row.iter().map(|v| v.exp()).sum();
            row.mapv_inplace(|v| v.exp() / z);
        }
        out
    };
    let (p, q) = (softmax(&a0), softmax(&b0));
    // Value: ½ Σ (p − q)(log p − log q) / rows.
    let want: f32 = p.iter().zip(q.iter()).map(|(p, q)| (p - q) * (p.ln() - q.ln())).sum::<f32>() * 0.25;
    assert!((l.item().unwrap() - want).abs() < 1e-6);
    let g = l.backward().unwrap();
    let ga = (&p - &q) * 0.25;
    assert!(max_abs_diff(g.get(&a).unwrap().as_slice().unwrap(), ga.as_slice().unwrap()) < 1e-6);
    assert!(max_abs_diff(g.get(&b).unwrap().as_slice().unwrap(), (-ga).as_slice().unwrap()) < 1e-6);
    let bad = symmetric_kl(&a, &Tensor::new(ArrayD::zeros(IxDyn(&[3, 2])))).unwrap_err();
    assert!(matches!(bad, SparseError::ShapeMismatch { .. }));
}

#[test]
fn the_consistency_loss_compares_two_stochastic_forwards() {
    let m = model(config(3));
    train(&m, 3);
    let x = input(5, D, 7);
    let ctx = Ctx::train(11);
    let (y1, y2) = (m.forward(&x, &ctx).unwrap(), m.forward(&x, &ctx).unwrap());
    let reg = symmetric_kl(&y1, &y2).unwrap();
    assert!(reg.item().unwrap() > 0.0, "two forwards drew the same experts everywhere");
    let g = reg.backward().unwrap();
    let reached = mosa(&m).layers().iter().any(|(_, l)| g.get_id(l.up.comb.id()).is_some());
    assert!(reached);
}
