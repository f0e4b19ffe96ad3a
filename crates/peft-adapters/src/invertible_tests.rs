use ndarray::ArrayD;
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, Linear, RandomInit, Visitor, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};
use proptest::prelude::*;

use super::*;
use crate::bottleneck::BottleneckConfig;
use crate::testutil::{fd_check, out, perturb, tiny, weighted_sum, D};

fn tuner(m: &PeftModel<peft_models::bert::BertModel>, name: &str) -> Vec<Param> {
    m.adapter_params(name).unwrap()
}

#[test]
fn the_inverse_undoes_the_forward_map_on_the_site() {
    let m = PeftModel::new(tiny(0), InvertibleConfig::nice(), "inv", 3).unwrap();
    let site = &embedding_sites(m.model())[0];
    assert_eq!(site.path(), "embeddings");
    let x = Tensor::new(RandomInit::new(5, 1.0).get("x", &[2, 3, D]).unwrap());
    let ctx = Ctx::eval();
    let y = site.forward(x.clone(), &ctx).unwrap();
    assert!(max_abs_diff(&y.to_vec(), &x.to_vec()) > 1e-2, "the default init is not the identity");
    let back = site.inverse(y, &ctx).unwrap();
    assert!(max_abs_diff(&back.to_vec(), &x.to_vec()) < 1e-6);
}

#[test]
fn identity_init_is_the_base_model_and_default_init_is_not() {
    let y0 = out(&tiny(0));
    let m = PeftModel::new(tiny(0), InvertibleConfig::nice_identity(), "inv", 3).unwrap();
    assert_eq!(out(&m), y0);
    let m = PeftModel::new(tiny(0), InvertibleConfig::nice(), "inv", 3).unwrap();
    assert!(max_abs_diff(&out(&m), &y0) > 1e-3);
}

#[test]
fn parameter_count_is_the_spec_formula() {
    // Spec §1.2-6: 2 subnets of (d/2·d/4 + d/4 + d/4·d/2 + d/2) on an even width d.
    let m = PeftModel::new(tiny(0), InvertibleConfig::nice(), "inv", 0).unwrap();
    let d = D;
    assert_eq!(m.param_counts().0, 2 * (d / 2 * d / 4 + d / 4 + d / 4 * d / 2 + d / 2));
    assert_eq!(InvertibleConfig::nice().widths(7), (3, 4, 2, 1), "odd widths: x1 gets ⌊d/2⌋");
}

#[test]
fn gradients_through_the_model_match_finite_differences() {
    let m = PeftModel::new(tiny(0), InvertibleConfig::nice(), "inv", 0).unwrap();
    let params = tuner(&m, "inv");
    for (i, p) in params.iter().enumerate() {
        perturb(p, 30 + i as u64, 0.4);
    }
    fd_check(&|| weighted_sum(&m, &Ctx::eval()), &params, 1e-2, 2e-2);
}

#[test]
fn it_stacks_with_a_seqbn_adapter_as_adapterhub_seq_bn_inv() {
    let mut m = PeftModel::new(tiny(0), BottleneckConfig::seq_bn(), "lang", 0).unwrap();
    m.add_adapter("lang_inv", InvertibleConfig::nice()).unwrap();
    m.set_adapters(&["lang", "lang_inv"]).unwrap();
    let both = out(&m);
    m.set_adapter("lang").unwrap();
    assert!(max_abs_diff(&out(&m), &both) > 1e-3, "the invertible adapter acts");
    m.set_adapters(&["lang", "lang_inv"]).unwrap();
    let n: usize = m.trainable_params().iter().map(|p| p.numel()).sum();
    assert_eq!(n, 2 * (2 * D + 1 + D) + 2 * (D / 2 * D / 4 + D / 4 + D / 4 * D / 2 + D / 2));
}

#[test]
fn save_load_save_is_byte_identical() {
    let m = PeftModel::new(tiny(0), InvertibleConfig::nice(), "default", 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    m.save_pretrained(&a).unwrap();
    let (loaded, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(out(&loaded), out(&m));
    loaded.save_pretrained(&b).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    let keys: Vec<String> = m.state_dict("default").unwrap().into_keys().collect();
    assert!(keys.contains(&"base_model.model.embeddings.G.2.bias".to_string()), "{keys:?}");
}

#[test]
fn glow_and_models_without_the_site_are_typed_errors() {
    let glow = InvertibleConfig { inv_adapter: "glow".into(), ..InvertibleConfig::nice() };
    assert!(matches!(glow.validate(), Err(AdaptersError::Unsupported { .. })));
    let bad = InvertibleConfig { inv_adapter_reduction_factor: 0.0, ..InvertibleConfig::nice() };
    assert!(matches!(bad.validate(), Err(AdaptersError::InvalidConfig { field: "inv_adapter_reduction_factor", .. })));
    struct Net(Linear);
    impl Module for Net {
        fn visit(&self, v: &mut dyn Visitor) {
            self.0.visit(v);
        }
    }
    let net = Net(Linear::load("proj", 4, 4, true, &RandomInit::new(0, 0.5)).unwrap());
    let e = PeftModel::new(net, InvertibleConfig::nice(), "inv", 0).err().unwrap();
    assert!(e.to_string().contains("embedding-output site"), "{e}");
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(12))]
    /// f64: the inverse undoes the forward map, and both maps' gradients w.r.t. the input and all eight tensors
    /// are exact, on random widths (odd ones too) and hidden sizes.
    #[test]
    fn nice_map_inverts_and_its_gradients_are_exact_in_f64(
        (rows, d, hf, hg, seed) in (1usize..4, 2usize..7, 1usize..4, 1usize..4, 0u64..1000),
        inverse in any::<bool>(),
    ) {
        let (d1, d2) = (d / 2, d - d / 2);
        let r = |s: u64, shape: &[usize]| -> ArrayD<f64> {
            RandomInit::new(seed + s, 0.7).get("t", shape).unwrap().mapv(f64::from)
        };
        let inputs = [
            r(1, &[rows, d]),
            r(2, &[hf, d2]), r(3, &[hf]), r(4, &[d1, hf]), r(5, &[d1]),
            r(6, &[hg, d1]), r(7, &[hg]), r(8, &[d2, hg]), r(9, &[d2]),
        ];
        let t: Vec<Tensor<f64>> = inputs.iter().map(|a| Tensor::new(a.clone())).collect();
        let f = [&t[1], &t[2], &t[3], &t[4]];
        let g = [&t[5], &t[6], &t[7], &t[8]];
        let y = nice_map(&t[0], f, g, Activation::Tanh, false).unwrap();
        let back = nice_map(&y, f, g, Activation::Tanh, true).unwrap();
        let err = back.as_slice().iter().zip(t[0].as_slice()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        prop_assert!(err < 1e-12, "{err}");
        assert_grads(
            |x| nice_map(&x[0], [&x[1], &x[2], &x[3], &x[4]], [&x[5], &x[6], &x[7], &x[8]], Activation::Tanh, inverse),
            &inputs,
        );
    }
}
