use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::max_abs_diff;

use super::*;
use crate::structured::fdcheck;
use crate::testutil::{input, Tiny};

fn perturb(m: &HydraModel, seed: u64) {
    for (i, (_, a)) in m.adapter.layers.iter().enumerate() {
        for (j, p) in a.factors().into_iter().enumerate() {
            p.set(RandomInit::new(seed + (10 * i + j) as u64, 0.3).get("p", &p.shape()).unwrap()).unwrap();
        }
    }
}

fn out(model: &Tiny, x: &Tensor) -> Vec<f32> {
    model.forward(x, &Ctx::eval()).unwrap().to_vec()
}

#[test]
fn hydra_is_identity_at_init() {
    let model = Tiny::new(6, 2, 0);
    let x = input(4, 6, 1);
    let y0 = out(&model, &x);
    let hm = HydraModel::new(&model, HydraConfig::new(2, 3, ["query", "dense"]), "default", 0).unwrap();
    assert_eq!(hm.adapter.layers.len(), 4);
    assert_eq!(out(&model, &x), y0);
    // r_p·(in+out) + r_s·(out+out) per site.
    assert_eq!(hm.trainable_params().iter().map(Param::numel).sum::<usize>(), 4 * (2 * 12 + 3 * 12));
}

#[test]
fn hydra_forward_is_parallel_plus_sequential_branch() {
    let model = Tiny::new(4, 1, 0);
    let mut cfg = HydraConfig::new(2, 3, ["query"]);
    cfg.scale = 0.7;
    let hm = HydraModel::new(&model, cfg, "default", 0).unwrap();
    perturb(&hm, 5);
    let (site, a) = &hm.adapter.layers[0];
    let x = input(3, 4, 2);
    let y = site.forward(&x, &Ctx::eval()).unwrap();
    let h = site.base().forward(&x).unwrap();
    let [ap, bp, a_s, b_s] = a.factors().map(|p| m2(p).unwrap());
    let x2 = x.data().to_owned().into_dimensionality::<Ix2>().unwrap();
    let h2 = h.data().to_owned().into_dimensionality::<Ix2>().unwrap();
    let want = &h2 + &(x2.dot(&ap.t()).dot(&bp.t()) + h2.dot(&a_s.t()).dot(&b_s.t())).mapv(|v| v * 0.7);
    assert!(max_abs_diff(y.as_slice(), want.as_slice().unwrap()) < 1e-5);
}

#[test]
fn hydra_merge_equals_unmerged_forward_and_unmerge_restores_weight_and_bias() {
    let model = Tiny::new(6, 2, 0);
    let hm = HydraModel::new(&model, HydraConfig::new(2, 3, ["query", "value", "dense"]), "default", 0).unwrap();
    perturb(&hm, 9);
    let x = input(5, 6, 3);
    let site = &hm.adapter.layers[0].0;
    for (s, _) in &hm.adapter.layers {
        let b = s.base().bias().unwrap();
        b.set(RandomInit::new(21, 0.5).get("b", &b.shape()).unwrap()).unwrap();
    }
    let y0 = out(&model, &x);
    let (w0, b0) = (site.base().dense_weight().unwrap(), site.base().bias().unwrap().value().to_owned());
    hm.adapter.merge().unwrap();
    assert!(max_abs_diff(&out(&model, &x), &y0) < 1e-5);
    assert!(max_abs_diff(site.base().bias().unwrap().value().as_slice().unwrap(), b0.as_slice().unwrap()) > 1e-4);
    hm.adapter.unmerge().unwrap();
    assert!(max_abs_diff(&out(&model, &x), &y0) < 1e-5);
    assert!(max_abs_diff(site.base().dense_weight().unwrap().as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-5);
    assert_eq!(site.base().bias().unwrap().value().to_owned(), b0);
    assert!(hm.adapter.unmerge().is_err());
}

#[test]
fn hydra_gradients_match_finite_differences() {
    let model = Tiny::new(4, 1, 0);
    let hm = HydraModel::new(&model, HydraConfig::new(2, 2, ["query", "dense"]), "default", 0).unwrap();
    perturb(&hm, 3);
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let f = || model.forward(&x, &Ctx::eval()).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &hm.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn hydra_save_load_save_is_byte_identical() {
    let model = Tiny::new(6, 2, 0);
    let hm = HydraModel::new(&model, HydraConfig::new(2, 3, ["dense"]), "default", 0).unwrap();
    perturb(&hm, 4);
    let d1 = tempfile::tempdir().unwrap();
    hm.save_pretrained(d1.path()).unwrap();
    let model2 = Tiny::new(6, 2, 0);
    let hm2 = HydraModel::load(&model2, d1.path(), "default").unwrap();
    let x = input(3, 6, 1);
    assert_eq!(out(&model, &x), out(&model2, &x));
    let d2 = tempfile::tempdir().unwrap();
    hm2.save_pretrained(d2.path()).unwrap();
    for f in [crate::io::CONFIG_NAME, crate::io::WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
    let cfg = std::fs::read_to_string(d1.path().join(crate::io::CONFIG_NAME)).unwrap();
    assert!(cfg.contains("\"peft_type\": \"HYDRA\""), "{cfg}");
}

#[test]
fn hydra_bad_configs_are_typed_errors() {
    let model = Tiny::new(4, 1, 0);
    assert!(matches!(HydraModel::new(&model, HydraConfig::new(0, 2, ["query"]), "a", 0), Err(Error::Invalid { .. })));
    assert!(matches!(
        HydraModel::new(&model, HydraConfig::new(2, 2, ["nope"]), "a", 0),
        Err(Error::NoTargetMatched { .. })
    ));
}
