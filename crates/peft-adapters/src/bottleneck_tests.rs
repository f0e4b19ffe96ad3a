use ndarray::ArrayD;
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::{array_strategy, assert_grads, max_abs_diff};
use peft_models::bert::BertModel;
use proptest::prelude::*;

use super::*;
use crate::common::m2;
use crate::testutil::{batch, fd_check, out, perturb, tiny, weighted_sum, D};

type Model = PeftModel<BertModel>;

fn tuner(m: &Model) -> &BottleneckTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<BottleneckTuner>().unwrap()
}

fn perturb_all(m: &Model, seed: u64) {
    for (i, p) in tuner(m).params().iter().enumerate() {
        perturb(p, seed + i as u64, 0.5);
    }
}

fn presets() -> Vec<(&'static str, BottleneckConfig)> {
    vec![
        ("houlsby", BottleneckConfig::houlsby()),
        ("seqbn", BottleneckConfig::seq_bn()),
        ("parallel", BottleneckConfig::parallel()),
        ("adaptformer", BottleneckConfig::adaptformer()),
    ]
}

#[test]
fn every_preset_is_the_base_model_at_init_and_changes_it_once_trained() {
    let y0 = out(&tiny(0));
    for (name, cfg) in presets() {
        let m = PeftModel::new(tiny(0), cfg.clone(), "default", 3).unwrap();
        assert_eq!(out(&m), y0, "{name}: the up projection starts at zero, so nothing changes");
        let sites = if cfg.mh_adapter { 4 } else { 2 };
        assert_eq!(tuner(&m).layers().len(), sites, "{name}");
        let r = cfg.bottleneck(D);
        assert_eq!(m.param_counts().0, sites * (2 * D * r + r + D), "{name}: down + up + biases per site");
        perturb_all(&m, 7);
        let y1 = out(&m);
        assert!(max_abs_diff(&y0, &y1) > 1e-3, "{name}: a trained adapter must change the output");
    }
}

#[test]
fn houlsby_places_adapters_after_attention_and_ffn_and_seqbn_after_ffn_only() {
    let paths = |cfg: BottleneckConfig| -> Vec<String> {
        let m = PeftModel::new(tiny(0), cfg, "default", 0).unwrap();
        tuner(&m).layers().iter().map(|(s, _)| s.path().to_string()).collect()
    };
    assert_eq!(
        paths(BottleneckConfig::houlsby()),
        [
            "encoder.layer.0.attention.output",
            "encoder.layer.0.output",
            "encoder.layer.1.attention.output",
            "encoder.layer.1.output"
        ]
    );
    assert_eq!(paths(BottleneckConfig::seq_bn()), ["encoder.layer.0.output", "encoder.layer.1.output"]);
    assert!(is_attention_site("model.layers.3.self_attn") && !is_attention_site("model.layers.3.mlp"));
}

/// The layer's output against the formulas of the module docs, on explicit `h` and `x`.
#[test]
fn series_parallel_and_ln_before_compute_the_documented_maps() {
    let (h, x) = (
        Tensor::new(RandomInit::new(1, 1.0).get("h", &[2, 3, D]).unwrap()),
        Tensor::new(RandomInit::new(2, 1.0).get("x", &[2, 3, D]).unwrap()),
    );
    let ln_w = Param::new("ln.weight", RandomInit::new(3, 1.0).get("w", &[D]).unwrap(), false);
    let ln_b = Param::new("ln.bias", RandomInit::new(4, 1.0).get("b", &[D]).unwrap(), false);
    for (series_in, cfg) in
        [("h", BottleneckConfig::houlsby()), ("x", BottleneckConfig::parallel()), ("ln", BottleneckConfig::seq_bn())]
    {
        let ln = cfg.original_ln_before.then(|| (ln_w.clone(), ln_b.clone()));
        let l = BottleneckLayer::new("s", "a", D, &cfg, ln, &mut site_rng(0, "a", "s")).unwrap();
        for (i, p) in l.layer_params().iter().enumerate() {
            perturb(p, 20 + i as u64, 0.5);
        }
        let u = match series_in {
            "h" => h.clone(),
            "x" => x.clone(),
            _ => h.add(&x).unwrap().layer_norm(Some(&ln_w.tensor()), Some(&ln_b.tensor()), 1e-12).unwrap(),
        };
        let (dw, uw) = (m2(&l.down).unwrap(), m2(&l.up).unwrap());
        let (db, ub) = (l.down_b.as_ref().unwrap().value().to_owned(), l.up_b.as_ref().unwrap().value().to_owned());
        let act = |v: f32| match cfg.non_linearity {
            Activation::Relu => v.max(0.0),
            Activation::Swish => v / (1.0 + (-v).exp()),
            _ => unreachable!(),
        };
        let u2 = u.data().to_owned().into_shape_with_order((6, D)).unwrap();
        let z = (u2.dot(&dw.t()) + db.view().into_dimensionality::<ndarray::Ix1>().unwrap()).mapv(act);
        let a = (z.dot(&uw.t()) + ub.view().into_dimensionality::<ndarray::Ix1>().unwrap())
            .mapv(|v| v * cfg.scaling as f32);
        let want = h.data().to_owned().into_shape_with_order((6, D)).unwrap() + a;
        let got = l.forward(&h, &x, &Ctx::eval()).unwrap();
        assert!(max_abs_diff(got.as_slice(), want.as_slice().unwrap()) < 1e-5, "{series_in}");
    }
}

#[test]
fn seqbn_on_a_model_without_the_layernorm_is_a_typed_error() {
    let cfg = BottleneckConfig { mh_adapter: true, ..BottleneckConfig::seq_bn() };
    // BERT has `attention.output.LayerNorm` too, so that works; a renamed path does not.
    assert!(PeftModel::new(tiny(0), cfg, "default", 0).is_ok());
    let base: Vec<Param> = Vec::new();
    let e = find_ln(&base, "model.layers.0.mlp").unwrap_err();
    assert!(matches!(e, AdaptersError::MissingBaseParam { .. }), "{e}");
}

#[test]
fn invalid_configs_are_refused_with_the_field_named() {
    let bad = [
        BottleneckConfig { reduction_factor: 0.0, ..BottleneckConfig::houlsby() },
        BottleneckConfig { scaling: f64::NAN, ..BottleneckConfig::houlsby() },
        BottleneckConfig { dropout: 1.0, ..BottleneckConfig::houlsby() },
        BottleneckConfig { mh_adapter: false, output_adapter: false, ..BottleneckConfig::houlsby() },
        BottleneckConfig { original_ln_before: true, ..BottleneckConfig::parallel() },
    ];
    for (cfg, field) in
        bad.into_iter().zip(["reduction_factor", "scaling", "dropout", "output_adapter", "original_ln_before"])
    {
        match cfg.validate() {
            Err(AdaptersError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
        assert!(PeftModel::new(tiny(0), cfg, "default", 0).is_err());
    }
}

#[test]
fn gradients_through_the_model_match_finite_differences() {
    for (_, cfg) in presets() {
        let m = PeftModel::new(tiny(0), cfg, "default", 0).unwrap();
        perturb_all(&m, 11);
        let params = tuner(&m).params();
        fd_check(&|| weighted_sum(&m, &Ctx::eval()), &params, 1e-2, 2e-2);
    }
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(12))]
    /// f64 gradients of the bottleneck map w.r.t. its input and all four tensors, random small shapes.
    #[test]
    fn bottleneck_map_gradients_are_exact_in_f64(
        (rows, d, m, seed) in (1usize..4, 1usize..5, 1usize..4, 0u64..1000),
        act in prop_oneof![Just(Activation::Swish), Just(Activation::Tanh), Just(Activation::Gelu)],
    ) {
        let r = |s: u64, shape: &[usize]| -> ArrayD<f64> {
            RandomInit::new(seed + s, 0.7).get("t", shape).unwrap().mapv(f64::from)
        };
        let inputs = [r(1, &[rows, d]), r(2, &[m, d]), r(3, &[m]), r(4, &[d, m]), r(5, &[d])];
        assert_grads(
            |t| bottleneck_map(&t[0], (&t[1], Some(&t[2])), (&t[3], Some(&t[4])), act, 0.7),
            &inputs,
        );
    }

    #[test]
    fn relu_bottleneck_gradients_hold_away_from_the_kink(
        x in array_strategy(vec![2, 3], 0.2, 1.0),
        dw in array_strategy(vec![2, 3], 0.1, 1.0),
        uw in array_strategy(vec![3, 2], -1.0, 1.0),
    ) {
        // Positive input and weights keep every pre-activation > 0.06, away from ReLU's kink.
        assert_grads(|t| bottleneck_map(&t[0], (&t[1], None), (&t[2], None), Activation::Relu, 4.0), &[x, dw, uw]);
    }
}

#[test]
fn save_load_save_is_byte_identical() {
    for (name, cfg) in presets() {
        let m = PeftModel::new(tiny(0), cfg, "default", 5).unwrap();
        perturb_all(&m, 13);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        m.save_pretrained(&a).unwrap();
        let (loaded, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
        assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{name}: {report:?}");
        assert_eq!(out(&loaded), out(&m), "{name}: the loaded adapter computes what the saved one did");
        loaded.save_pretrained(&b).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{name}: {f}");
        }
        let keys: Vec<String> = m.state_dict("default").unwrap().into_keys().collect();
        assert!(keys.contains(&"base_model.model.encoder.layer.0.output.adapter_up.weight".to_string()), "{keys:?}");
    }
}

#[test]
fn a_file_of_another_width_is_refused_before_anything_is_attached() {
    let m = PeftModel::new(tiny(0), BottleneckConfig::seq_bn(), "default", 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let cfg_path = dir.path().join(CONFIG_NAME);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    v["reduction_factor"] = 2.0.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = PeftModel::from_pretrained(tiny(0), dir.path(), &crate::registry()).err().unwrap();
    assert!(e.to_string().contains("adapter_down.0.weight"), "{e}");
}

#[test]
fn dropout_acts_in_training_only_and_disabling_restores_the_base() {
    let cfg = BottleneckConfig { dropout: 0.5, ..BottleneckConfig::houlsby() };
    let mut m = PeftModel::new(tiny(0), cfg, "default", 0).unwrap();
    perturb_all(&m, 17);
    let ev = out(&m);
    assert_eq!(ev, out(&m), "evaluation is deterministic");
    let tr = m.forward(&batch(), &Ctx::train(1)).unwrap().to_vec();
    assert!(max_abs_diff(&ev, &tr) > 1e-4);
    m.disable_adapters().unwrap();
    assert_eq!(out(&m), out(&tiny(0)));
}

/// AdapterHub's `Stack(lang, task)`: with both adapters active, each residual site applies them in attach order,
/// feeding the first one's output to the second.
#[test]
fn two_active_adapters_stack_in_attach_order() {
    let mut m = PeftModel::new(tiny(0), BottleneckConfig::seq_bn(), "lang", 0).unwrap();
    m.add_adapter("task", BottleneckConfig::houlsby()).unwrap();
    for (i, name) in ["lang", "task"].into_iter().enumerate() {
        for (j, p) in m.adapter_params(name).unwrap().iter().enumerate() {
            perturb(p, 100 * i as u64 + j as u64, 0.5);
        }
    }
    m.set_adapters(&["lang", "task"]).unwrap();
    let stacked = out(&m);
    let lang = m.tuner("lang").unwrap().as_any().downcast_ref::<BottleneckTuner>().unwrap();
    let task = m.tuner("task").unwrap().as_any().downcast_ref::<BottleneckTuner>().unwrap();
    let (h, x) = (
        Tensor::new(RandomInit::new(1, 1.0).get("h", &[2, 3, D]).unwrap()),
        Tensor::new(RandomInit::new(2, 1.0).get("x", &[2, 3, D]).unwrap()),
    );
    let (site, l) = &lang.layers()[0];
    let t = &task.layers().iter().find(|(s, _)| s.path() == site.path()).unwrap().1;
    let ctx = Ctx::eval();
    let want = t.forward(&l.forward(&h, &x, &ctx).unwrap(), &x, &ctx).unwrap();
    assert_eq!(site.forward(h, &x, &ctx).unwrap().to_vec(), want.to_vec());
    m.set_adapter("task").unwrap();
    assert!(max_abs_diff(&out(&m), &stacked) > 1e-4, "dropping the language adapter changes the output");
}
