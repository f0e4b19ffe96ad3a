use std::sync::Arc;

use peft_core::adapter::{AdapterError, PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::max_abs_diff;
use peft_models::llama::{Llama, LlamaSpec};

use super::*;
use crate::testutil::{fd_check, perturb};

type Model = PeftModel<Llama>;

fn spec() -> LlamaSpec {
    LlamaSpec {
        vocab: 16,
        hidden: 8,
        intermediate: 12,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        eps: 1e-5,
        rope_theta: 1e4,
        max_positions: 16,
        tie_embeddings: true,
        bos: None,
        eos: vec![],
    }
}

fn tiny(seed: u64) -> Llama {
    Llama::random(&spec(), seed, 0.3).expect("tiny llama")
}

const IDS: [usize; 8] = [1, 5, 6, 2, 3, 7, 9, 0];

fn logits(m: &Llama, ctx: &Ctx) -> Tensor {
    m.forward(&IDS, [2, 4], None, ctx).expect("forward")
}

fn out(m: &Llama) -> Vec<f32> {
    logits(m, &Ctx::eval()).to_vec()
}

fn tuner(m: &Model) -> &LlmAdapterTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<LlmAdapterTuner>().unwrap()
}

fn mam(c: LlmAdapterConfig) -> LlmAdapterConfig {
    LlmAdapterConfig { init_weights: AdapterInit::MamAdapter, ..c }
}

/// Every adapter weight random (so the up projections are not zero).
fn perturb_all(m: &Model, seed: u64) {
    for (i, (_, a)) in tuner(m).layers().iter().enumerate() {
        let (d, u) = a.weights();
        perturb(d, seed + 2 * i as u64, 0.4);
        perturb(u, seed + 2 * i as u64 + 1, 0.4);
    }
}

fn configs() -> Vec<LlmAdapterConfig> {
    vec![
        LlmAdapterConfig::llama_series(3),
        LlmAdapterConfig {
            output_modules: Some(ModulePattern::list(["down_proj"])),
            ..LlmAdapterConfig::series(["up_proj", "down_proj"], 3)
        },
        LlmAdapterConfig::llama_parallel(3),
    ]
}

#[test]
fn mam_init_is_identity_and_bert_init_is_not() {
    let y0 = out(&tiny(0));
    for c in configs() {
        let m = PeftModel::new(tiny(0), mam(c.clone()), "default", 0).unwrap();
        assert_eq!(out(&m), y0, "{}", c.describe());
        // The fork's default: both projections N(0, 0.02): close to the base model, not equal to it.
        let m = PeftModel::new(tiny(0), c.clone(), "default", 0).unwrap();
        let d = max_abs_diff(&out(&m), &y0);
        let scale = y0.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(d > 0.0 && d < 0.05 * scale, "{}: {d} vs {scale}", c.describe());
    }
}

#[test]
fn placements_shapes_and_parameter_counts_follow_the_fork() {
    // Series on gate/up: inputs 8 wide; output series on down_proj: output 8 wide; parallel up (8 -> 12) and
    // down (12 -> 8).
    let m = PeftModel::new(tiny(0), configs()[1].clone(), "default", 0).unwrap();
    let got: Vec<(String, Placement, Vec<usize>, Vec<usize>)> = tuner(&m)
        .layers()
        .iter()
        .filter(|(s, _)| s.path().starts_with("model.layers.0."))
        .map(|(s, a)| (s.path().to_string(), a.placement(), a.weights().0.shape(), a.weights().1.shape()))
        .collect();
    assert_eq!(
        got,
        [
            ("model.layers.0.mlp.up_proj".into(), Placement::InputSeries, vec![3, 8], vec![8, 3]),
            ("model.layers.0.mlp.down_proj".into(), Placement::OutputSeries, vec![3, 8], vec![8, 3]),
        ]
    );
    let m = PeftModel::new(tiny(0), LlmAdapterConfig::llama_parallel(3), "default", 0).unwrap();
    let shapes: Vec<(Vec<usize>, Vec<usize>)> =
        tuner(&m).layers().iter().take(2).map(|(_, a)| (a.weights().0.shape(), a.weights().1.shape())).collect();
    assert_eq!(shapes, [(vec![3, 8], vec![12, 3]), (vec![3, 12], vec![8, 3])]);
    assert_eq!(m.param_counts().0, 2 * (3 * 8 + 12 * 3 + 3 * 12 + 8 * 3));
    // Series on gate + up (both 8 wide on the input), 2 layers: 2·d·m each, no biases (the spec's formula).
    let m = PeftModel::new(tiny(0), LlmAdapterConfig::llama_series(3), "default", 0).unwrap();
    assert_eq!(m.param_counts().0, 2 * 2 * (2 * 8 * 3));
    let learned =
        LlmAdapterConfig { scaling: LlmScaling::Learned(Learned::Learned), ..LlmAdapterConfig::llama_series(3) };
    let m = PeftModel::new(tiny(0), learned, "default", 0).unwrap();
    assert_eq!(m.param_counts().0, 2 * 2 * (2 * 8 * 3 + 1));
}

#[test]
fn merging_is_refused_with_a_typed_error() {
    let m = PeftModel::new(tiny(0), LlmAdapterConfig::llama_parallel(2), "default", 0).unwrap();
    let before = out(&m);
    let e = m.tuner("default").unwrap().merge().unwrap_err();
    assert!(e.to_string().contains("llm-adapter"), "{e}");
    assert!(!m.tuner("default").unwrap().is_merged());
    assert_eq!(out(&m), before);
}

#[test]
fn gradients_through_the_model_match_finite_differences() {
    for c in configs() {
        let c = LlmAdapterConfig { scaling: LlmScaling::Learned(Learned::Learned), ..c };
        let m = PeftModel::new(tiny(1), c.clone(), "default", 0).unwrap();
        perturb_all(&m, 11);
        let r = Tensor::new(RandomInit::new(99, 1.0).get("r", &[2, 4, 16]).unwrap());
        let f = || logits(&m, &Ctx::train(0)).mul(&r).expect("weight").sum_all();
        // One site's parameters of each placement in the config (the first two sites).
        let params: Vec<Param> = tuner(&m).layers().iter().take(2).flat_map(|(_, a)| a.params()).collect();
        fd_check(&f, &params, 1e-2, 2e-2);
    }
}

#[test]
fn save_load_save_is_byte_identical_and_wrong_sizes_are_refused() {
    let c = LlmAdapterConfig { scaling: LlmScaling::Learned(Learned::Learned), ..LlmAdapterConfig::llama_series(3) };
    let m = PeftModel::new(tiny(0), c, "default", 0).unwrap();
    perturb_all(&m, 5);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    m.save_pretrained(&a).unwrap();
    let keys: Vec<String> = m.state_dict("default").unwrap().into_keys().collect();
    for k in ["adapter_down.weight", "adapter_up.weight", "adapter_scale"] {
        assert!(keys.contains(&format!("base_model.model.model.layers.1.mlp.gate_proj.{k}")), "{k}: {keys:?}");
    }
    let (loaded, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{report:?}");
    assert_eq!(out(&loaded), out(&m));
    loaded.save_pretrained(&b).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    // The same folder with another bottleneck width in its config: refused before anything is attached.
    let cfg_path = a.join(CONFIG_NAME);
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"bottleneck_size\": 3", "\"bottleneck_size\": 4");
    std::fs::write(&cfg_path, text).unwrap();
    match PeftModel::from_pretrained(tiny(0), &a, &crate::registry()) {
        Err(e) => assert!(matches!(e, AdapterError::TensorShape { .. }), "{e}"),
        Ok(_) => panic!("a 4-wide config over 3-wide tensors loaded"),
    }
}

#[test]
fn config_parses_the_forks_fields_and_refuses_bad_values() {
    let v = serde_json::json!({
        "peft_type": "LLM_ADAPTER", "target_modules": ["up_proj"], "bottleneck_size": 8, "scaling": "learned",
        "non_linearity": "relu", "use_parallel_adapter": true, "init_weights": "mam_adapter", "foo": 1
    });
    let (c, ignored) = LlmAdapterConfig::from_json(&v).unwrap();
    assert_eq!(c.scaling, LlmScaling::Learned(Learned::Learned));
    assert_eq!((c.bottleneck_size, c.non_linearity, c.use_parallel_adapter), (8, Activation::Relu, true));
    assert_eq!(c.init_weights, AdapterInit::MamAdapter);
    assert_eq!(ignored.len(), 1, "{ignored:?}");
    let (d, _) = LlmAdapterConfig::from_json(&serde_json::json!({"target_modules": ["q"]})).unwrap();
    assert_eq!(
        (d.bottleneck_size, d.non_linearity, d.scaling, d.init_weights),
        (256, Activation::Tanh, LlmScaling::Fixed(1.0), AdapterInit::Bert)
    );
    for bad in [
        serde_json::json!({"target_modules": ["q"], "scaling": "sometimes"}),
        serde_json::json!({"target_modules": ["q"], "bottleneck_size": 0}),
        serde_json::json!({"target_modules": ["q"], "adapter_dropout": 1.0}),
    ] {
        assert!(LlmAdapterConfig::from_json(&bad).is_err(), "{bad}");
    }
    assert!(PeftModel::new(tiny(0), LlmAdapterConfig::series(["nope"], 2), "default", 0).is_err());
}

mod random_shapes {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(24))]
        /// On random layer sizes, each placement computes its formula on one site.
        #[test]
        fn site_forward_is_the_placements_formula(
            (i, o, m, rows, seed) in (1usize..6, 1usize..6, 1usize..4, 1usize..4, 0u64..1000),
            which in 0usize..3,
            bias in any::<bool>(),
        ) {
            let placement = [Placement::InputSeries, Placement::OutputSeries, Placement::Parallel][which];
            let site = Linear::load("blk.proj", i, o, bias, &RandomInit::new(seed, 0.5)).unwrap();
            let cfg = LlmAdapterConfig { scaling: LlmScaling::Fixed(0.7), ..LlmAdapterConfig::series(["proj"], m) };
            let a = Arc::new(LlmAdapterLinear::new("blk.proj", "t", site.base().as_ref(), placement, &cfg, &mut rand::thread_rng()));
            perturb(a.weights().0, seed + 1, 0.5);
            perturb(a.weights().1, seed + 2, 0.5);
            site.attach(a.clone()).unwrap();
            let x = Tensor::new(RandomInit::new(seed + 3, 1.0).get("x", &[rows, i]).unwrap());
            let (d, u) = (a.weights().0.tensor(), a.weights().1.tensor());
            let ad = |v: &Tensor| v.linear(&d, None).unwrap().tanh().linear(&u, None).unwrap().mul_scalar(0.7);
            let base = site.base();
            let want = match placement {
                Placement::InputSeries => base.forward(&x.add(&ad(&x)).unwrap()).unwrap(),
                Placement::OutputSeries => { let h = base.forward(&x).unwrap(); h.add(&ad(&h)).unwrap() }
                Placement::Parallel => base.forward(&x).unwrap().add(&ad(&x)).unwrap(),
            };
            let y = site.forward(&x, &Ctx::eval()).unwrap();
            prop_assert!(max_abs_diff(y.as_slice(), want.as_slice()) < 1e-5);
        }
    }
}
