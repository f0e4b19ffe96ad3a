use super::*;
use crate::encoder::tests::{feats, tiny_encoder};
use crate::encoder::AudioClassifier;
use ndarray::ArrayD;
use peft_core::adapter::{ConfigRegistry, PeftModel};
use peft_core::testing::assert_grads;
use rand::{Rng, SeedableRng};

fn rand_array(shape: &[usize], seed: u64, scale: f64) -> ArrayD<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.gen_range(-scale..scale))
}

/// Explicit values: k = 3, one channel, "same" padding zeroes the edges.
#[test]
fn depthwise_conv_matches_hand_computed_values() -> peft_core::Result<()> {
    let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 10.0, 20.0, 30.0], &[1, 3, 2])?;
    let w = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 0.0, 1.0, 0.0], &[2, 1, 3])?;
    let b = Tensor::<f64>::from_vec(vec![0.5, -1.0], &[2])?;
    let y = depthwise_conv1d(&x, &w, Some(&b))?;
    // channel 0 (x = 1, 3, 20): y[t] = 1·x[t-1] + 2·x[t] + 3·x[t+1] + 0.5; channel 1: identity - 1
    assert_eq!(y.to_vec(), vec![2.0 + 9.0 + 0.5, 1.0, 1.0 + 6.0 + 60.0 + 0.5, 9.0, 3.0 + 40.0 + 0.5, 29.0]);
    assert!(depthwise_conv1d(&x, &Tensor::<f64>::from_vec(vec![1.0; 4], &[2, 1, 2])?, None).is_err(), "even kernel");
    assert!(depthwise_conv1d(&x, &Tensor::<f64>::from_vec(vec![1.0; 3], &[1, 1, 3])?, None).is_err(), "channels");
    assert!(depthwise_conv1d(&x, &w, Some(&Tensor::<f64>::from_vec(vec![1.0; 3], &[3])?)).is_err(), "bias");
    Ok(())
}

/// Finite differences: input, kernel and bias, with a kernel longer than the sequence (every padding case).
#[test]
fn depthwise_conv_gradients_match_finite_differences() {
    for (l, k) in [(5, 3), (3, 7), (6, 1)] {
        let inputs = [rand_array(&[2, l, 3], 1, 1.0), rand_array(&[3, 1, k], 2, 1.0), rand_array(&[3], 3, 1.0)];
        assert_grads(|t| Ok(depthwise_conv1d(&t[0], &t[1], Some(&t[2]))?.exp()), &inputs);
        assert_grads(|t| Ok(depthwise_conv1d(&t[0], &t[1], None)?.tanh()), &inputs[..2]);
    }
}

/// The whole branch (LN, PW1, GLU, DW, batch-statistics BN, SiLU, PW2) in training mode, every input.
#[test]
fn conformer_branch_gradients_match_finite_differences() {
    let (d, b, k) = (4, 2, 3);
    let shapes: [&[usize]; 11] =
        [&[2, 5, d], &[d], &[d], &[2 * b, d], &[2 * b], &[b, 1, k], &[b], &[b], &[b], &[d, b], &[d]];
    let inputs: Vec<ArrayD<f64>> = shapes.iter().enumerate().map(|(i, s)| rand_array(s, 10 + i as u64, 1.0)).collect();
    assert_grads(
        |t| {
            let w: BranchWeights<'_, f64> = std::array::from_fn(|i| &t[i + 1]);
            Ok(conformer_branch(&t[0], w, BnStats::Batch, (1e-5, 1e-5))?.0)
        },
        &inputs,
    );
}

fn model(seed: u64) -> AudioClassifier {
    AudioClassifier::new(tiny_encoder(seed), 3, 12, 7).expect("tiny classifier")
}

fn logits(m: &AudioClassifier, ctx: &Ctx) -> Vec<f32> {
    m.logits(&feats(2, 12), ctx).expect("forward").to_vec()
}

#[test]
fn identity_at_init_in_every_placement() -> AdapterResult<()> {
    for (mh, par) in [(false, true), (true, true), (false, false), (true, false)] {
        let base = logits(&model(1), &Ctx::eval());
        let cfg = ConformerConfig { mh_adapter: mh, is_parallel: par, kernel_size: 3, ..ConformerConfig::new(4.0) };
        let pm = PeftModel::new(model(1), cfg, "default", 0)?;
        assert_eq!(logits(&pm, &Ctx::eval()), base, "eval, mh {mh} parallel {par}");
        // training mode uses batch statistics: still identity (PW2 is zero)
        assert_eq!(logits(&pm, &Ctx::train(0)), logits(&model(1), &Ctx::train(0)), "train, mh {mh} parallel {par}");
    }
    Ok(())
}

#[test]
fn trainable_count_follows_the_spec_formula() -> AdapterResult<()> {
    for (mh, rr) in [(false, 4.0), (true, 2.0), (false, 96.0)] {
        let cfg = ConformerConfig { mh_adapter: mh, ..ConformerConfig::new(rr) };
        let sites = if mh { 4 } else { 2 };
        let per = cfg.params_per_site(8);
        let pm = PeftModel::new(model(2), cfg, "default", 0)?;
        assert_eq!(pm.param_counts().0, sites * per, "mh {mh} rr {rr}");
    }
    // d 384, RR 96 (b 4), k 31: 3072 + 8 + 124 + 4 + 8 + 1536 + 384 + 768
    assert_eq!(ConformerConfig::new(96.0).params_per_site(384), 5904);
    Ok(())
}

#[test]
fn batch_norm_tracks_running_statistics_in_training_only() -> AdapterResult<()> {
    let cfg = ConformerConfig { kernel_size: 3, ..ConformerConfig::new(4.0) };
    let pm = PeftModel::new(model(3), cfg, "default", 0)?;
    let tuner = pm.model().inner.encoder.layers[0].res_ffn.adapters();
    let layer = tuner.first().expect("adapter on layers.0.mlp");
    let _ = logits(&pm, &Ctx::eval());
    let before: Vec<f32> = running(&pm);
    assert!(before.iter().all(|&v| v == 0.0), "eval forward leaves the running mean");
    let _ = logits(&pm, &Ctx::train(0));
    let after = running(&pm);
    assert!(after.iter().any(|&v| v != 0.0), "train forward moves the running mean: {after:?}");
    assert_eq!(layer.name(), "default");
    Ok(())
}

fn running(pm: &PeftModel<AudioClassifier>) -> Vec<f32> {
    let sd = pm.state_dict("default").expect("state dict");
    assert!(sd.keys().any(|k| k.ends_with("conformer.bn.running_var")));
    sd.iter()
        .filter(|(k, _)| k.ends_with("running_mean"))
        .flat_map(|(_, v)| v.iter().copied().collect::<Vec<_>>())
        .collect()
}

#[test]
fn save_load_round_trip_keeps_weights_and_running_statistics() -> AdapterResult<()> {
    let cfg = ConformerConfig { mh_adapter: true, kernel_size: 5, ..ConformerConfig::new(2.0) };
    let pm = PeftModel::new(model(4), cfg, "default", 3)?;
    // move every tensor off its init (PW2 off zero) and the running statistics off theirs
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for p in pm.trainable_params() {
        p.update(|w| w.iter_mut().for_each(|v| *v += rng.gen_range(-0.3..0.3)));
    }
    let _ = logits(&pm, &Ctx::train(1));
    let want = logits(&pm, &Ctx::eval());
    assert_ne!(want, logits(&model(4), &Ctx::eval()));
    let dir =
        tempfile::tempdir().map_err(|e| peft_core::adapter::AdapterError::config("test", "tempdir", e.to_string()))?;
    pm.save_pretrained(&dir.path().join("a"))?;
    let reg = ConfigRegistry::new().with::<ConformerConfig>();
    let (back, report) = PeftModel::from_pretrained(model(4), &dir.path().join("a"), &reg)?;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(logits(&back, &Ctx::eval()), want);
    back.save_pretrained(&dir.path().join("b"))?;
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (a, b) = (std::fs::read(dir.path().join("a").join(f)), std::fs::read(dir.path().join("b").join(f)));
        assert_eq!(a.ok(), b.ok(), "{f} differs after a round trip");
    }
    Ok(())
}

#[test]
fn bad_configs_are_typed_errors() {
    for cfg in [
        ConformerConfig { kernel_size: 4, ..ConformerConfig::default() },
        ConformerConfig { reduction_factor: 0.0, ..ConformerConfig::default() },
        ConformerConfig { output_adapter: false, ..ConformerConfig::default() },
        ConformerConfig { bn_momentum: 2.0, ..ConformerConfig::default() },
    ] {
        assert!(matches!(cfg.validate(), Err(AudioDataError::InvalidConfig { method: CONFORMER_TYPE, .. })), "{cfg:?}");
        let e = PeftModel::new(model(5), cfg, "default", 0).err();
        assert!(matches!(e, Some(peft_core::adapter::AdapterError::InvalidConfig { .. })), "{e:?}");
    }
    let v = serde_json::json!({"peft_type": CONFORMER_TYPE, "kernel_size": 31, "colour": "red"});
    let (c, ignored) = ConformerConfig::from_json(&v).expect("parses");
    assert_eq!((c.kernel_size, ignored.len()), (31, 1));
}
