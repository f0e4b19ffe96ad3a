use ndarray::{Array2, Ix2};
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;
use peft_models::bert::BertModel;
use peft_models::tokenizer::Batch;

use super::*;
use crate::testutil::{fd_check, out, tiny, weighted_sum, D};

type Model = PeftModel<BertModel>;

fn tuner(m: &Model) -> &PrefixTuningTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<PrefixTuningTuner>().unwrap()
}

fn model(cfg: PrefixTuningConfig) -> Model {
    PeftModel::new(tiny(0), cfg, "default", 0).unwrap()
}

fn mat(p: &Param) -> Array2<f32> {
    p.value().to_owned().into_dimensionality::<Ix2>().unwrap()
}

#[test]
fn each_layer_reads_its_keys_and_values_in_peft_layout() {
    let m = model(PrefixTuningConfig::p_tuning_v2(3));
    let PrefixEncoder::Table(t) = tuner(&m).encoder() else { panic!("P-tuning v2 learns the table") };
    let t = mat(t);
    assert_eq!(t.dim(), (3, 2 * 2 * D), "[P, L·2·D]");
    let (h, hd) = (2, D / 2);
    for (l, site) in tuner(&m).sites().iter().enumerate() {
        let (k, v) = site.key_values(2, &Ctx::eval()).unwrap().unwrap();
        assert_eq!(k.shape(), &[2, h, 3, hd]);
        let (k, v) = (k.data().to_owned(), v.data().to_owned());
        for b in 0..2 {
            for hh in 0..h {
                for p in 0..3 {
                    for j in 0..hd {
                        assert_eq!(k[[b, hh, p, j]], t[[p, 2 * l * D + hh * hd + j]]);
                        assert_eq!(v[[b, hh, p, j]], t[[p, (2 * l + 1) * D + hh * hd + j]]);
                    }
                }
            }
        }
    }
}

#[test]
fn the_mlp_computes_the_table() {
    let m = model(PrefixTuningConfig { encoder_hidden_size: Some(5), ..PrefixTuningConfig::prefix(3) });
    let PrefixEncoder::Mlp { embedding, w1, b1, w2, b2 } = tuner(&m).encoder() else { panic!("MLP") };
    let b = |p: &Param| p.value().to_owned().into_dimensionality::<ndarray::Ix1>().unwrap();
    let z = (mat(embedding).dot(&mat(w1).t()) + b(b1)).mapv(f32::tanh);
    let want = z.dot(&mat(w2).t()) + b(b2);
    let got = tuner(&m).encoder().table().unwrap().data().to_owned();
    assert!(max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap()) < 1e-5);
    // PEFT's count: P·D + (D·E + E) + (E·L·2·D + L·2·D).
    assert_eq!(m.param_counts().0, 3 * D + (D * 5 + 5) + (5 * 4 * D + 4 * D));
}

#[test]
fn prefixes_change_attention_disabled_they_do_not_and_padding_does_not_leak() {
    for cfg in [PrefixTuningConfig::prefix(2), PrefixTuningConfig::p_tuning_v2(2)] {
        let mut m = model(cfg);
        let full = out(&m);
        assert!(max_abs_diff(&full, &out(&tiny(0))) > 1e-3, "the attention sees the prefix rows");
        let one = Batch::from_rows(&[vec![1, 7, 2]]).unwrap();
        let single = m.forward(&one, &Ctx::eval()).unwrap().to_vec();
        assert!(max_abs_diff(&single, &full[4 * D..7 * D]) < 1e-5, "prefix rows are never masked, padding always");
        m.disable_adapters().unwrap();
        assert_eq!(out(&m), out(&tiny(0)));
    }
}

#[test]
fn gradients_match_finite_differences() {
    for cfg in [
        PrefixTuningConfig { encoder_hidden_size: Some(4), ..PrefixTuningConfig::prefix(2) },
        PrefixTuningConfig::p_tuning_v2(2),
    ] {
        let m = model(cfg);
        let params = tuner(&m).params();
        fd_check(&|| weighted_sum(&m, &Ctx::eval()), &params, 1e-2, 2e-2);
    }
}

#[test]
fn p_tuning_v2_round_trips_byte_identical() {
    let m = model(PrefixTuningConfig::p_tuning_v2(3));
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    m.save_pretrained(&a).unwrap();
    let (loaded, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{report:?}");
    assert_eq!(out(&loaded), out(&m));
    loaded.save_pretrained(&b).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn prefix_tuning_saves_the_computed_table_and_loads_it_as_a_table() {
    let m = model(PrefixTuningConfig::prefix(3));
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    m.save_pretrained(&a).unwrap();
    let cfg: Value = serde_json::from_slice(&std::fs::read(a.join(CONFIG_NAME)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "PREFIX_TUNING");
    assert_eq!(cfg["prefix_projection"], true);
    assert_eq!(cfg["inference_mode"], true);
    for (k, v) in [
        ("num_virtual_tokens", 3),
        ("token_dim", D),
        ("encoder_hidden_size", D),
        ("num_layers", 2),
        ("num_attention_heads", 2),
    ] {
        assert_eq!(cfg[k], v, "{k}");
    }
    let sd = m.state_dict("default").unwrap();
    assert_eq!(sd.keys().collect::<Vec<_>>(), ["prompt_embeddings"]);
    assert_eq!(sd["prompt_embeddings"].shape(), &[3, 2 * 2 * D]);
    let (loaded, _) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(matches!(tuner(&loaded).encoder(), PrefixEncoder::Table(_)), "loaded as PEFT does: the table");
    assert!(max_abs_diff(&out(&loaded), &out(&m)) < 1e-6);
    loaded.save_pretrained(&b).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    // The table cannot be loaded back into an MLP.
    let src = peft_core::adapter::AdapterTensors::open(&a.join(WEIGHTS_NAME), "").unwrap();
    assert!(matches!(tuner(&m).load_state_dict(&src), Err(AdapterError::Unsupported { .. })));
}

#[test]
fn configs_that_contradict_the_model_are_refused() {
    for cfg in [
        PrefixTuningConfig { num_layers: Some(3), ..PrefixTuningConfig::prefix(2) },
        PrefixTuningConfig { token_dim: Some(4), ..PrefixTuningConfig::prefix(2) },
        PrefixTuningConfig { num_virtual_tokens: 0, ..PrefixTuningConfig::prefix(2) },
        PrefixTuningConfig { num_transformer_submodules: Some(2), ..PrefixTuningConfig::prefix(2) },
    ] {
        assert!(PeftModel::new(tiny(0), cfg, "default", 0).is_err());
    }
}
