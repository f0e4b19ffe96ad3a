use peft_core::adapter::{AdapterError, ModulePattern, PeftModel};
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;

use super::*;
use crate::config::InitLoraWeights;
use crate::testutil::{input, Tiny};

type Model = PeftModel<Tiny>;

fn out(m: &Tiny, x: &peft_core::Tensor) -> Vec<f32> {
    m.forward(x, &Ctx::eval()).unwrap().to_vec()
}

fn new(m: Tiny, cfg: LoraConfig, name: &str) -> Model {
    PeftModel::new(m, cfg, name, 0).unwrap()
}

/// Sets every B (and magnitude) of adapter `name` to random values.
fn train_ish(lm: &Model, name: &str, seed: u64) {
    for (i, (_, l)) in lm.lora_layers(name).unwrap().iter().enumerate() {
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
    let lm = new(Tiny::new(6, 2, 0), LoraConfig::new(2, 4.0, ["query", "value"]), "default");
    assert_eq!(lm.lora_layers("default").unwrap().len(), 4);
    let names: Vec<String> = lm.adapter_params("default").unwrap().iter().map(|p| p.name().to_string()).collect();
    assert_eq!(names[0], "encoder.layer.0.attention.self.query.lora_A.default.weight");
    assert_eq!(names[1], "encoder.layer.0.attention.self.query.lora_B.default.weight");
    // Only adapter parameters train: 4 sites × (2·6 + 6·2).
    let (train, total) = lm.param_counts();
    assert_eq!(train, 4 * 24);
    assert_eq!(total, 6 * (36 + 6) + 3 * 6 + 3 + 4 * 24);
    assert!(lm.base_params().iter().all(|p| !p.trainable()));
    assert!(lm.trainable_summary().starts_with("trainable params: 96 || all params: "));
}

#[test]
fn all_linear_skips_the_output_layer_and_patterns_set_rank() {
    let mut cfg = LoraConfig::new(2, 4.0, ["x"]);
    cfg.target_modules = Some(ModulePattern::Regex("all-linear".into()));
    cfg.rank_pattern.insert("output.dense".into(), 4.into());
    cfg.alpha_pattern.insert("layer.1.attention.self.query".into(), 1.into());
    let lm = new(Tiny::new(6, 2, 0), cfg, "default");
    let layers = lm.lora_layers("default").unwrap();
    assert_eq!(layers.len(), 6);
    assert!(layers.iter().all(|(s, _)| s.path() != "classifier"));
    for (s, l) in &layers {
        let want_r = if s.path().ends_with("output.dense") { 4 } else { 2 };
        assert_eq!(l.spec().r, want_r, "{}", s.path());
        let want_a = if s.path() == "encoder.layer.1.attention.self.query" { 1.0 } else { 4.0 };
        assert_eq!(l.spec().alpha, want_a);
    }
}

#[test]
fn target_matching_errors_are_typed() {
    let r = PeftModel::new(Tiny::new(4, 1, 0), LoraConfig::new(2, 4.0, ["key"]), "default", 0);
    assert!(matches!(r, Err(AdapterError::Core(peft_core::Error::NoTargetMatched { .. }))));
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.target_modules = Some(ModulePattern::Regex("(?<=x)query".into()));
    let r = PeftModel::new(Tiny::new(4, 1, 0), cfg, "default", 0);
    assert!(matches!(r, Err(AdapterError::Core(peft_core::Error::Pattern { .. }))));
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.layers_to_transform = Some(crate::config::IntOrList::One(3));
    let r = PeftModel::new(Tiny::new(4, 1, 0), cfg, "default", 0);
    assert!(matches!(r, Err(AdapterError::Core(peft_core::Error::NoTargetMatched { .. }))));
    let r = PeftModel::new(Tiny::new(4, 1, 0), LoraConfig::new(0, 4.0, ["query"]), "default", 0);
    assert!(matches!(r, Err(AdapterError::InvalidConfig { .. })));
    let mut lm = new(Tiny::new(4, 1, 0), LoraConfig::new(2, 4.0, ["query"]), "default");
    assert!(matches!(lm.set_adapter("nope"), Err(AdapterError::UnknownAdapter { .. })));
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
        let mut lm = new(m, cfg, "default");
        assert!(max_abs_diff(&y0, &out(&lm, &x)) < 1e-5);
        train_ish(&lm, "default", 10);
        let y1 = out(&lm, &x);
        assert!(max_abs_diff(&y0, &y1) > 1e-3);
        let w0: Vec<_> = lm.base_params().iter().map(|p| p.value().to_owned()).collect();
        lm.merge_adapter().unwrap();
        assert!(max_abs_diff(&y1, &out(&lm, &x)) < 1e-5, "dora={dora}");
        lm.unmerge_adapter().unwrap();
        for (p, w) in lm.base_params().iter().zip(&w0) {
            assert!(max_abs_diff(p.value().as_slice().unwrap(), w.as_slice().unwrap()) < 1e-5);
        }
        let m = lm.merge_and_unload().unwrap();
        assert!(max_abs_diff(&y1, &out(&m, &x)) < 1e-5);
        assert!(m.layers[0][0].adapters().is_empty());
    }
}

/// Audit item: `merge_and_unload` dropped the `lora_bias` term (the merged model lost `s·c`), so `xtask merge` wrote
/// biases without it. The merged model now equals the adapted one.
#[test]
fn merge_and_unload_keeps_the_lora_bias_term() {
    let m = Tiny::new(6, 1, 3);
    let x = input(3, 6, 4);
    let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
    cfg.lora_bias = true;
    let lm = new(m, cfg, "default");
    train_ish(&lm, "default", 5);
    for (_, l) in lm.lora_layers("default").unwrap() {
        l.lora_b_bias().unwrap().update(|b| b.fill(0.3));
    }
    let y1 = out(&lm, &x);
    let merged = lm.merge_and_unload().unwrap();
    assert!(max_abs_diff(&y1, &out(&merged, &x)) < 1e-5);
}

#[test]
fn pissa_model_output_is_unchanged_at_init() {
    let m = Tiny::new(6, 2, 1);
    let x = input(4, 6, 2);
    let y0 = out(&m, &x);
    let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
    cfg.init_lora_weights = InitLoraWeights::Named("pissa".into());
    let lm = new(m, cfg, "default");
    assert!(max_abs_diff(&y0, &out(&lm, &x)) < 1e-5);
}

#[test]
fn several_adapters_switch_disable_delete_and_mix() {
    let m = Tiny::new(6, 1, 1);
    let x = input(3, 6, 2);
    let y0 = out(&m, &x);
    let mut lm = new(m, LoraConfig::new(2, 4.0, ["query"]), "a");
    lm.add_adapter("b", LoraConfig::new(3, 3.0, ["value"])).unwrap();
    assert_eq!(lm.active_adapters(), ["a"]);
    train_ish(&lm, "a", 1);
    train_ish(&lm, "b", 2);
    // Only the active adapter trains.
    assert!(lm.adapter_params("b").unwrap().iter().all(|p| !p.trainable()));
    let ya = out(&lm, &x);
    lm.set_adapter("b").unwrap();
    assert!(lm.adapter_params("a").unwrap().iter().all(|p| !p.trainable()));
    let yb = out(&lm, &x);
    lm.set_adapters(&["a", "b"]).unwrap();
    let yab = out(&lm, &x);
    assert!(max_abs_diff(&ya, &yb) > 1e-3 && max_abs_diff(&yab, &ya) > 1e-3);
    let ctx = lm.mixed_batch(Ctx::eval(), vec!["b".into(), "__base__".into(), "a".into()]).unwrap();
    let ym = lm.forward(&x, &ctx).unwrap().to_vec();
    assert!(max_abs_diff(&ym[0..3], &yb[0..3]) < 1e-6);
    assert!(max_abs_diff(&ym[3..6], &y0[3..6]) < 1e-6);
    assert!(max_abs_diff(&ym[6..9], &ya[6..9]) < 1e-6);
    lm.disable_adapters().unwrap();
    assert!(max_abs_diff(&y0, &out(&lm, &x)) < 1e-6);
    lm.enable_adapters().unwrap();
    lm.delete_adapter("a").unwrap();
    assert_eq!(lm.active_adapters(), ["b"]);
    assert!(max_abs_diff(&yb, &out(&lm, &x)) < 1e-6);
}

/// Audit item: a mixed batch naming an adapter that does not exist silently ran the base model, and a merged
/// adapter that no row names was applied to every row. Both are errors now, as in PEFT.
#[test]
fn mixed_batches_with_unknown_or_merged_adapters_are_errors() {
    let mut lm = new(Tiny::new(6, 1, 1), LoraConfig::new(2, 4.0, ["query"]), "a");
    lm.add_adapter("b", LoraConfig::new(2, 4.0, ["value"])).unwrap();
    train_ish(&lm, "a", 1);
    let x = input(2, 6, 2);
    let e = lm.mixed_batch(Ctx::eval(), vec!["a".into(), "typo".into()]).unwrap_err();
    assert!(matches!(e, AdapterError::UnknownAdapter { .. }), "{e}");
    lm.merge_adapter().unwrap();
    assert!(lm.mixed_batch(Ctx::eval(), vec!["b".into(), "__base__".into()]).is_err());
    // Also at the site level, for contexts built by hand: "a" is merged into the query weight.
    let raw = Ctx::eval().with_adapter_names(vec!["b".into(), "__base__".into()]);
    assert!(lm.forward(&x, &raw).is_err());
}

#[test]
fn bias_and_modules_to_save_control_trainable_base_params() {
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.bias = Bias::LoraOnly;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    let lm = new(Tiny::new(4, 1, 1), cfg, "default");
    let names: Vec<String> = lm.base_params().iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
    assert_eq!(names, ["encoder.layer.0.attention.self.query.bias", "classifier.weight", "classifier.bias"]);
    let mut cfg = LoraConfig::new(2, 4.0, ["query"]);
    cfg.bias = Bias::All;
    let lm2 = new(Tiny::new(4, 1, 1), cfg, "default");
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
    let lm = new(Tiny::new(6, 1, 0), cfg, "t");
    let stored = lm.config("t").unwrap().as_any().downcast_ref::<LoraConfig>().unwrap().clone();
    assert!(!stored.fan_in_fan_out);
    let lp = new(Tiny::new(6, 1, 0), LoraConfig::new(2, 4.0, ["query"]), "t");
    train_ish(&lm, "t", 3);
    train_ish(&lp, "t", 3);
    let x = input(2, 6, 5);
    assert_eq!(out(&lm, &x), out(&lp, &x));
}
