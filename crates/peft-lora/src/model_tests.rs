use peft_core::adapter::ModulePattern;
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;
use peft_core::Error;

use super::*;
use crate::config::InitLoraWeights;
use crate::testutil::{input, Tiny};

fn out(m: &Tiny, x: &peft_core::Tensor) -> Vec<f32> {
    m.forward(x, &Ctx::eval()).unwrap().to_vec()
}

/// Sets every B (and magnitude) of adapter `name` to random values.
fn train_ish(lm: &LoraModel, name: &str, seed: u64) {
    for (i, (_, l)) in lm.adapter(name).unwrap().layers.iter().enumerate() {
        let b = peft_core::nn::WeightSource::get(
            &peft_core::nn::RandomInit::new(seed + i as u64, 0.2),
            "b",
            &l.lora_b().shape(),
        )
        .unwrap();
        l.lora_b().set(b).unwrap();
        if let Some(m) = l.magnitude() {
            m.update(|v| v.mapv_inplace(|x| x * 0.9));
        }
    }
}

#[test]
fn injects_into_matching_sites_with_peft_param_names() {
    let m = Tiny::new(6, 2, 0);
    let lm = LoraModel::new(&m, LoraConfig::new(2, 4.0, ["query", "value"]), "default", 0).unwrap();
    let a = lm.adapter("default").unwrap();
    assert_eq!(a.layers.len(), 4);
    let names: Vec<String> = lm.adapter_params("default").unwrap().iter().map(|p| p.name().to_string()).collect();
    assert_eq!(names[0], "encoder.layer.0.attention.self.query.lora_A.default.weight");
    assert_eq!(names[1], "encoder.layer.0.attention.self.query.lora_B.default.weight");
    // Only adapter parameters train: 4 sites × (2·6 + 6·2).
    let (train, total) = lm.param_counts();
    assert_eq!(train, 4 * 24);
    assert_eq!(total, 6 * (36 + 6) + 3 * 6 + 3 + 4 * 24);
    assert!(lm.base_params().iter().all(|p| !p.trainable()));
}

#[test]
fn all_linear_skips_the_output_layer_and_patterns_set_rank() {
    let m = Tiny::new(6, 2, 0);
    let mut cfg = LoraConfig::new(2, 4.0, ["x"]);
    cfg.target_modules = Some(ModulePattern::Regex("all-linear".into()));
    cfg.rank_pattern.insert("output.dense".into(), 4.into());
    cfg.alpha_pattern.insert("layer.1.attention.self.query".into(), 1.into());
    let lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
    let a = lm.adapter("default").unwrap();
    assert_eq!(a.layers.len(), 6);
    assert!(a.layers.iter().all(|(s, _)| s.path() != "classifier"));
    for (s, l) in &a.layers {
        let want_r = if s.path().ends_with("output.dense") { 4 } else { 2 };
        assert_eq!(l.spec().r, want_r, "{}", s.path());
        let want_a = if s.path() == "encoder.layer.1.attention.self.query" { 1.0 } else { 4.0 };
        assert_eq!(l.spec().alpha, want_a);
    }
}

#[test]
fn target_matching_errors_are_typed() {
    let m = Tiny::new(4, 1, 0);
    let r = LoraModel::new(&m, LoraConfig::new(2, 4.0, ["key"]), "default", 0);
    assert!(matches!(r, Err(Error::NoTargetMatched { .. })));
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.target_modules = Some(ModulePattern::Regex("(?<=x)query".into()));
    assert!(matches!(LoraModel::new(&m, cfg, "default", 0), Err(Error::Invalid { .. })));
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.layers_to_transform = Some(crate::config::IntOrList::One(3));
    assert!(matches!(LoraModel::new(&m, cfg, "default", 0), Err(Error::NoTargetMatched { .. })));
    let lm = LoraModel::new(&m, LoraConfig::new(2, 4.0, ["query"]), "default", 0);
    let mut lm = lm.unwrap();
    assert!(matches!(lm.set_adapter("nope"), Err(Error::UnknownName { .. })));
    assert!(lm.add_adapter("default", LoraConfig::new(2, 4.0, ["query"])).is_err());
}

#[test]
fn identity_at_init_then_merge_unmerge_and_merge_and_unload() {
    for dora in [false, true] {
        let m = Tiny::new(6, 2, 1);
        let x = input(4, 6, 2);
        let y0 = out(&m, &x);
        let mut cfg = LoraConfig::new(3, 6.0, ["query", "value", "dense"]);
        cfg.use_dora = dora;
        let lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
        assert!(max_abs_diff(&y0, &out(&m, &x)) < 1e-5);
        train_ish(&lm, "default", 10);
        let y1 = out(&m, &x);
        assert!(max_abs_diff(&y0, &y1) > 1e-3);
        let w0: Vec<_> = lm.base_params().iter().map(|p| p.value().to_owned()).collect();
        lm.merge().unwrap();
        assert!(max_abs_diff(&y1, &out(&m, &x)) < 1e-5, "dora={dora}");
        lm.unmerge().unwrap();
        for (p, w) in lm.base_params().iter().zip(&w0) {
            assert!(max_abs_diff(p.value().as_slice().unwrap(), w.as_slice().unwrap()) < 1e-5);
        }
        lm.merge_and_unload().unwrap();
        assert!(max_abs_diff(&y1, &out(&m, &x)) < 1e-5);
        assert!(m.layers[0][0].adapters().is_empty());
    }
}

#[test]
fn pissa_model_output_is_unchanged_at_init() {
    let m = Tiny::new(6, 2, 1);
    let x = input(4, 6, 2);
    let y0 = out(&m, &x);
    let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
    cfg.init_lora_weights = InitLoraWeights::Named("pissa".into());
    let _lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
    assert!(max_abs_diff(&y0, &out(&m, &x)) < 1e-5);
}

#[test]
fn several_adapters_switch_disable_delete_and_mix() {
    let m = Tiny::new(6, 1, 1);
    let x = input(3, 6, 2);
    let y0 = out(&m, &x);
    let mut lm = LoraModel::new(&m, LoraConfig::new(2, 4.0, ["query"]), "a", 0).unwrap();
    lm.add_adapter("b", LoraConfig::new(3, 3.0, ["value"])).unwrap();
    assert_eq!(lm.active_adapters(), ["a"]);
    train_ish(&lm, "a", 1);
    train_ish(&lm, "b", 2);
    // Only the active adapter trains.
    assert!(lm.adapter_params("b").unwrap().iter().all(|p| !p.trainable()));
    let ya = out(&m, &x);
    lm.set_adapter("b").unwrap();
    assert!(lm.adapter_params("a").unwrap().iter().all(|p| !p.trainable()));
    let yb = out(&m, &x);
    lm.set_adapters(&["a", "b"]).unwrap();
    let yab = out(&m, &x);
    assert!(max_abs_diff(&ya, &yb) > 1e-3 && max_abs_diff(&yab, &ya) > 1e-3);
    let ctx = Ctx::eval().with_adapter_names(vec!["b".into(), "__base__".into(), "a".into()]);
    let ym = m.forward(&x, &ctx).unwrap().to_vec();
    assert!(max_abs_diff(&ym[0..3], &yb[0..3]) < 1e-6);
    assert!(max_abs_diff(&ym[3..6], &y0[3..6]) < 1e-6);
    assert!(max_abs_diff(&ym[6..9], &ya[6..9]) < 1e-6);
    lm.disable_adapters();
    assert!(max_abs_diff(&y0, &out(&m, &x)) < 1e-6);
    lm.enable_adapters();
    lm.delete_adapter("a").unwrap();
    assert_eq!(lm.active_adapters(), ["b"]);
    assert!(max_abs_diff(&yb, &out(&m, &x)) < 1e-6);
}

#[test]
fn bias_and_modules_to_save_control_trainable_base_params() {
    let m = Tiny::new(4, 1, 1);
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.bias = Bias::LoraOnly;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    let lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
    let names: Vec<String> = lm.base_params().iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
    assert_eq!(names, ["encoder.layer.0.attention.self.query.bias", "classifier.weight", "classifier.bias"]);
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.bias = Bias::All;
    let m2 = Tiny::new(4, 1, 1);
    let lm2 = LoraModel::new(&m2, cfg, "default", 0).unwrap();
    assert_eq!(lm2.base_params().iter().filter(|p| p.trainable()).count(), 4);
}

/// PEFT resets `fan_in_fan_out` for `torch.nn.Linear` targets (with a warning); every peft-rs site is such a
/// layer, so a `true` from a file or from code becomes `false`, and the adapter behaves as with `false`.
#[test]
fn fan_in_fan_out_is_reset_on_linear_sites_as_in_peft() {
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.fan_in_fan_out = true;
    let json = serde_json::to_string(&cfg).unwrap();
    let (parsed, warnings) = LoraConfig::from_json(&json).unwrap();
    assert!(!parsed.fan_in_fan_out);
    assert!(warnings.iter().any(|w| w.contains("fan_in_fan_out")), "{warnings:?}");
    let m = Tiny::new(6, 1, 0);
    let lm = LoraModel::new(&m, cfg, "t", 0).unwrap();
    assert!(!lm.adapter("t").unwrap().config.fan_in_fan_out);
    let plain = Tiny::new(6, 1, 0);
    let lp = LoraModel::new(&plain, LoraConfig::new(2, 4.0, ["query"]), "t", 0).unwrap();
    train_ish(&lm, "t", 3);
    train_ish(&lp, "t", 3);
    let x = input(2, 6, 5);
    assert_eq!(out(&m, &x), out(&plain, &x));
}
