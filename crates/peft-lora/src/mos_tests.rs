use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::max_abs_diff;

use super::*;
use crate::structured::fdcheck;
use crate::testutil::{input, Tiny};

type Model = PeftModel<Tiny>;

fn mos(m: &Model) -> &MosTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<MosTuner>().unwrap()
}

fn new(model: Tiny, cfg: MosConfig, seed: u64) -> Model {
    PeftModel::new(model, cfg, "default", seed).unwrap()
}

fn perturb(m: &Model, seed: u64) {
    for (i, p) in m.trainable_params().iter().enumerate() {
        p.set(RandomInit::new(seed + i as u64, 0.3).get("p", &p.shape()).unwrap()).unwrap();
    }
}

fn out(model: &Tiny, x: &Tensor) -> Vec<f32> {
    model.forward(x, &Ctx::eval()).unwrap().to_vec()
}

#[test]
fn mos_is_identity_at_init_and_budget_is_pool_plus_private() {
    let model = Tiny::new(8, 2, 0);
    let x = input(3, 8, 1);
    let y0 = out(&model, &x);
    // r = 4 per module, budget 2 equivalent ranks (1 private), l = 2 shards per vector.
    let mm = new(model, MosConfig::new(4, 8.0, 2, 1, 2, ["query", "value", "dense"]), 0);
    assert_eq!(out(&mm, &x), y0);
    let n = mos(&mm).layers().len();
    assert_eq!(n, 6);
    // Pool: n·(valid − private)·l shards per side of length 4; private: private·l shards per side per module.
    let (pa, pb) = mos(&mm).pools();
    assert_eq!((pa.len(), pb.len()), (1, 1));
    assert_eq!(pa[0].shape(), vec![n * 2, 4]);
    let total: usize = mm.trainable_params().iter().map(Param::numel).sum();
    assert_eq!(total, n * 2 * (8 + 8), "a LoRA of rank valid_param_lora_r on every module");
    // Each parameter once, though every site holds the pools.
    assert_eq!(mm.trainable_params().len(), 2 + 2 * n);
    for (_, m) in mos(&mm).layers() {
        let (a, b) = m.assemble().unwrap();
        assert_eq!((a.shape(), b.shape()), (&[4, 8][..], &[4, 8][..]));
        assert_eq!(m.indices().0.len(), 3 * 2);
    }
}

#[test]
fn mos_forward_is_lora_with_assembled_factors_and_merges_exactly() {
    let mut cfg = MosConfig::new(3, 6.0, 2, 1, 4, ["query", "dense"]);
    cfg.init_lora_a_vec_std = 0.5;
    let mut mm = new(Tiny::new(8, 2, 0), cfg, 0);
    perturb(&mm, 3);
    let (site, m) = mos(&mm).layers()[0].clone();
    let x = input(5, 8, 2);
    let (a, b) = m.assemble().unwrap();
    let want =
        x.linear(&a, None).unwrap().matmul(&b).unwrap().mul_scalar(2.0).add(&site.base().forward(&x).unwrap()).unwrap();
    assert!(max_abs_diff(site.forward(&x, &Ctx::eval()).unwrap().as_slice(), want.as_slice()) < 1e-5);
    let y0 = out(&mm, &x);
    let w0 = site.base().dense_weight().unwrap();
    mm.merge_adapter().unwrap();
    assert!(max_abs_diff(&out(&mm, &x), &y0) < 1e-5);
    mm.unmerge_adapter().unwrap();
    assert!(max_abs_diff(site.base().dense_weight().unwrap().as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-6);
}

#[test]
fn mos_gradients_match_finite_differences_with_shared_shards() {
    let mut cfg = MosConfig::new(3, 3.0, 2, 1, 2, ["query", "value", "dense"]);
    cfg.sample_with_replacement = true;
    let mm = new(Tiny::new(4, 1, 0), cfg, 0);
    perturb(&mm, 5);
    // Some pool shard is placed more than once across the modules, so its gradient sums several placements.
    let mut uses = std::collections::HashMap::new();
    for (_, m) in mos(&mm).layers() {
        for &i in m.indices().0 {
            *uses.entry(i).or_insert(0) += 1;
        }
    }
    assert!(uses.values().any(|&c| c > 1));
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let f = || mm.forward(&x, &Ctx::eval()).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &mm.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn mos_save_load_save_is_byte_identical() {
    let mut cfg = MosConfig::new(4, 8.0, 2, 1, 2, ["query", "dense"]);
    cfg.index_seed = 17;
    cfg.init_lora_a_vec_std = 0.1;
    let mm = new(Tiny::new(8, 2, 0), cfg, 3);
    perturb(&mm, 4);
    let d1 = tempfile::tempdir().unwrap();
    mm.save_pretrained(d1.path()).unwrap();
    let (mm2, report) = PeftModel::from_pretrained(Tiny::new(8, 2, 0), d1.path(), &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    let x = input(3, 8, 1);
    assert_eq!(out(&mm, &x), out(&mm2, &x));
    let d2 = tempfile::tempdir().unwrap();
    mm2.save_pretrained(d2.path()).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
    let f = peft_core::io::safetensors::SafeTensorsFile::open(d1.path().join(WEIGHTS_NAME)).unwrap();
    assert!(f.contains("base_model.model.mos_pool_A.len4"));
    assert!(f.contains("base_model.model.encoder.layer.1.output.dense.mos_private_B.weight"));
    // A model of another width has other shard counts: a typed error before anything is attached.
    let mut wide = PeftModel::wrap(Tiny::new(12, 2, 0), 0);
    let err = wide.load_adapter(d1.path(), "default", &crate::registry()).unwrap_err();
    assert!(matches!(err, AdapterError::MissingTensor { .. } | AdapterError::TensorShape { .. }), "{err}");
    assert!(wide.layers[0][0].adapters().is_empty());
}

#[test]
fn mos_bad_configs_are_typed_errors() {
    let bad = |c: MosConfig| PeftModel::new(Tiny::new(6, 1, 0), c, "a", 0).err().unwrap();
    let invalid = |e: AdapterError| matches!(e, AdapterError::InvalidConfig { .. });
    assert!(invalid(bad(MosConfig::new(4, 8.0, 2, 1, 4, ["query"]))), "4 does not divide 6");
    assert!(invalid(bad(MosConfig::new(2, 8.0, 4, 3, 2, ["query"]))), "private > r");
    assert!(invalid(bad(MosConfig::new(8, 8.0, 2, 0, 2, ["query"]))), "pool too small");
    assert!(invalid(bad(MosConfig::new(0, 8.0, 2, 0, 2, ["query"]))));
    assert!(matches!(
        bad(MosConfig::new(2, 8.0, 2, 0, 2, ["nope"])),
        AdapterError::Core(peft_core::Error::NoTargetMatched { .. })
    ));
}
