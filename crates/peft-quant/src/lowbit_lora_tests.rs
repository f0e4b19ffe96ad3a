use super::*;
use peft_core::nn::{Ctx, RandomInit, Visitor, WeightSource};
use peft_core::train::TrainHooks;

/// `layers` BERT-named layers (`query`, `value`, `output.dense`) and a `classifier` output layer.
struct Toy {
    layers: Vec<[Linear; 3]>,
    classifier: Linear,
}

impl Toy {
    fn new(d: usize, n_layers: usize, seed: u64) -> Self {
        let init = RandomInit::new(seed, 0.3);
        let l = |p: String| Linear::load(&p, d, d, true, &init).unwrap();
        let layers = (0..n_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                [
                    l(format!("{p}.attention.self.query")),
                    l(format!("{p}.attention.self.value")),
                    l(format!("{p}.output.dense")),
                ]
            })
            .collect();
        let classifier = Linear::load("classifier", d, 3, true, &init).unwrap().as_output();
        Toy { layers, classifier }
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let mut h = x.clone();
        for [q, v, o] in &self.layers {
            h = o.forward(&q.forward(&h, ctx)?.tanh().add(&v.forward(&h, ctx)?)?, ctx)?;
        }
        self.classifier.forward(&h, ctx)
    }
}

impl Module for Toy {
    fn visit(&self, v: &mut dyn Visitor) {
        for l in &self.layers {
            for s in l {
                s.visit(v);
            }
        }
        self.classifier.visit(v);
    }
}

const D: usize = 64;

fn input(seed: u64, d: usize) -> Tensor {
    Tensor::new(RandomInit::new(seed, 1.0).get("x", &[5, d]).unwrap())
}

fn cfg(bits: u8) -> LowBitLoraConfig {
    LowBitLoraConfig::new(4, 8.0, ["query", "value"], bits)
}

fn model(bits: u8) -> PeftModel<Toy> {
    PeftModel::new(Toy::new(D, 2, 1), cfg(bits), "default", 0).unwrap()
}

/// Gives every `B` random values (as after training).
fn randomize_b(m: &PeftModel<Toy>) {
    for p in m.trainable_params().iter().filter(|p| p.name().contains("lora_B")) {
        p.set(RandomInit::new(3, 0.2).get(p.name(), &p.shape()).unwrap()).unwrap();
    }
}

fn layers(m: &PeftModel<Toy>) -> Vec<std::sync::Arc<LowBitLoraLinear>> {
    let t = m.tuner("default").unwrap();
    t.as_any().downcast_ref::<LowBitTuner>().unwrap().layers().iter().map(|(_, l)| l.clone()).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn identity_at_init_for_every_bit_width() {
    let x = input(1, D);
    let y0 = Toy::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    for bits in 1..=4u8 {
        let m = model(bits);
        // B = 0: σ = 0 and Ŵ_B = level·0 + 0 = 0 exactly.
        for l in layers(&m) {
            assert!(l.lora().lora_b().value().iter().all(|&v| v == 0.0));
            let [_, b] = l.packed().unwrap();
            assert_eq!(b.stats(), (0.0, 0.0));
            assert!(b.unpack().iter().all(|&v| v == 0.0));
        }
        assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().as_slice(), y0.as_slice(), "{bits} bits");
        assert_eq!(m.forward(&x, &Ctx::train(0)).unwrap().as_slice(), y0.as_slice(), "{bits} bits, train");
    }
}

#[test]
fn forward_uses_the_fake_quantized_matrices() {
    let m = model(1);
    randomize_b(&m);
    let x = input(2, D);
    let l = &layers(&m)[0];
    let a = l.lora().lora_a().value().to_owned();
    let b = l.lora().lora_b().value().to_owned();
    // 1 bit: each matrix takes exactly two values.
    for w in [&a, &b] {
        let mut v = fake_quant(&w.iter().copied().collect::<Vec<_>>(), 1).unwrap();
        v.sort_by(f32::total_cmp);
        v.dedup();
        assert_eq!(v.len(), 2);
    }
    let base = Linear::load("q", D, D, true, &RandomInit::new(0, 0.0)).unwrap();
    let d = l.delta(&x, &x, base.base().as_ref(), &Ctx::eval()).unwrap().unwrap();
    let qa = Tensor::new(ArrayD::from_shape_vec(a.raw_dim(), fake_quant(a.as_slice().unwrap(), 1).unwrap()).unwrap());
    let qb = Tensor::new(ArrayD::from_shape_vec(b.raw_dim(), fake_quant(b.as_slice().unwrap(), 1).unwrap()).unwrap());
    let want = x.linear(&qa, None).unwrap().linear(&qb, None).unwrap().mul_scalar(2.0);
    assert_eq!(d.as_slice(), want.as_slice());
}

#[test]
fn merge_equals_the_unmerged_forward() {
    for bits in 1..=4u8 {
        let mut m = model(bits);
        randomize_b(&m);
        let x = input(3, D);
        let y0 = m.forward(&x, &Ctx::eval()).unwrap();
        m.merge_adapter().unwrap();
        let y1 = m.forward(&x, &Ctx::eval()).unwrap();
        let scale = y0.as_slice().iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(max_diff(&y0, &y1) <= 1e-4 * scale.max(1.0), "{bits} bits: {}", max_diff(&y0, &y1));
        m.unmerge_adapter().unwrap();
        assert!(max_diff(&y0, &m.forward(&x, &Ctx::eval()).unwrap()) <= 1e-4 * scale.max(1.0));
    }
}

/// The gradient reaching `A` through a site equals [`crate::onebit::ste_backward`] of the gradient with respect
/// to the quantized `Â` (the through-stats rule), and `B` leaves zero on the first step (identity at σ = 0).
#[test]
fn layer_gradients_follow_the_ste_rule() {
    let m = model(2);
    let x = input(4, D);
    let targets = [0i64, 1, 2, 0, 1];
    let loss = m.forward(&x, &Ctx::train(0)).unwrap().cross_entropy(&targets, None, 0.0).unwrap();
    let g = loss.backward().unwrap();
    let tr = m.trainable_params();
    let b0 = tr.iter().find(|p| p.name().contains("lora_B")).unwrap();
    let gb = g.get_id(b0.id()).unwrap();
    assert!(gb.iter().any(|&v| v != 0.0), "B gets a gradient at its zero init");
    let mut distinct = gb.iter().copied().collect::<Vec<_>>();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    assert!(distinct.len() > 2, "not a constant (the through-stats rule at σ = 0 would give only the mean)");
    // A: compare with the rule applied to dL/dÂ, which an identity-STE twin with the same forward exposes.
    let twin =
        PeftModel::new(Toy::new(D, 2, 1), LowBitLoraConfig { ste: SteGradient::Identity, ..cfg(2) }, "default", 0)
            .unwrap();
    let loss2 = twin.forward(&x, &Ctx::train(0)).unwrap().cross_entropy(&targets, None, 0.0).unwrap();
    assert_eq!(loss.item().unwrap(), loss2.item().unwrap());
    let g2 = loss2.backward().unwrap();
    let a = tr.iter().find(|p| p.name().contains("lora_A")).unwrap();
    let a2 = twin.trainable_params().into_iter().find(|p| p.name() == a.name()).unwrap();
    let g_hat: Vec<f32> = g2.get_id(a2.id()).unwrap().iter().copied().collect();
    let w: Vec<f32> = a.value().iter().copied().collect();
    let want = crate::onebit::ste_backward(&w, &g_hat, 2, SteGradient::ThroughStats).unwrap();
    let got: Vec<f32> = g.get_id(a.id()).unwrap().iter().copied().collect();
    for (x, y) in got.iter().zip(&want) {
        assert!((x - y).abs() <= 1e-6 + 1e-4 * y.abs(), "{x} vs {y}");
    }
}

#[test]
fn trains_loss_falls_on_a_tiny_model() {
    for bits in [1u8, 4] {
        let mut c = cfg(bits);
        c.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let m = PeftModel::new(Toy::new(D, 2, 2), c, "default", 0).unwrap();
        let x = input(9, D);
        let targets = [0i64, 1, 2, 0, 1];
        let mut opt = peft_core::AdamW::with_lr(m.trainable_params(), 1e-2, 0.0).unwrap();
        let mut losses = vec![];
        for step in 0..30 {
            let loss = m.forward(&x, &Ctx::train(step)).unwrap().cross_entropy(&targets, None, 0.0).unwrap();
            let g = m.transform_grads(loss.backward().unwrap()).unwrap();
            losses.push(loss.item().unwrap());
            drop(loss);
            peft_core::Optimizer::step(&mut opt, &g).unwrap();
        }
        assert!(losses[29] < 0.5 * losses[0], "{bits} bits: {losses:?}");
        // B moved off zero and is quantized to 2^bits values.
        let l = &layers(&m)[0];
        let [_, b] = l.packed().unwrap();
        assert!(b.stats().1 > 0.0);
    }
}

#[test]
fn packed_save_load_round_trip_is_bit_identical_and_smaller() {
    for bits in 1..=4u8 {
        let mut c = cfg(bits);
        c.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let m = PeftModel::new(Toy::new(D, 2, 1), c, "default", 0).unwrap();
        randomize_b(&m);
        let x = input(5, D);
        let y0 = m.forward(&x, &Ctx::eval()).unwrap();
        let packed = tempfile::tempdir().unwrap();
        let fp32 = tempfile::tempdir().unwrap();
        m.save_lowbit(packed.path(), "default").unwrap();
        m.save_pretrained(fp32.path()).unwrap();
        let f = Checkpoint::read(packed.path().join("adapter_model.safetensors")).unwrap();
        let key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.codes";
        assert_eq!(f.require(key).unwrap().data().len(), (4 * D * usize::from(bits)).div_ceil(8));
        assert_eq!(f.require(key).unwrap().dtype(), safetensors::Dtype::U8);
        assert!(f.get("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight").is_none());
        assert!(f.get("base_model.model.classifier.weight").is_some());
        // Packed → load: bit-identical forward.
        for dir in [packed.path(), fp32.path()] {
            let (m2, report) = PeftModel::from_pretrained(Toy::new(D, 2, 1), dir, &crate::registry()).unwrap();
            assert!(report.applied.iter().any(|k| k.ends_with("lora_A.stats") || k.ends_with("lora_A.weight")));
            // Every tensor of the file is applied, the packed codes included.
            assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
            if dir == packed.path() {
                assert!(report.applied.iter().any(|k| k.ends_with("lora_B.codes")), "{:?}", report.applied);
            }
            let y1 = m2.forward(&x, &Ctx::eval()).unwrap();
            assert_eq!(y0.as_slice(), y1.as_slice(), "{bits} bits from {}", dir.display());
            assert_eq!(m2.config("default").unwrap().peft_type(), PEFT_TYPE);
            // Saving the loaded adapter again writes the same bytes.
            let again = tempfile::tempdir().unwrap();
            if dir == packed.path() {
                assert!(layers(&m2).iter().all(|l| l.is_stored()));
                m2.save_lowbit(again.path(), "default").unwrap();
                let a = std::fs::read(again.path().join("adapter_model.safetensors")).unwrap();
                let b = std::fs::read(packed.path().join("adapter_model.safetensors")).unwrap();
                assert_eq!(a, b);
            }
        }
        let size = |d: &Path| std::fs::metadata(d.join("adapter_model.safetensors")).unwrap().len();
        assert!(size(packed.path()) < size(fp32.path()));
    }
}

/// Adapter file bytes at MiniLM-L6's shapes (hidden 384, 6 layers, r = 8 on query and value, no head saved):
/// the fp32 adapter vs the packed one at 1-4 bits. Prints the table (run with `--nocapture`).
#[test]
fn minilm_shaped_adapter_file_bytes() {
    let d = 384;
    let mut fp32_bytes = 0;
    for bits in 1..=4u8 {
        let m =
            PeftModel::new(Toy::new(d, 6, 1), LowBitLoraConfig::new(8, 16.0, ["query", "value"], bits), "default", 0)
                .unwrap();
        let (p, f) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        m.save_lowbit(p.path(), "default").unwrap();
        m.save_pretrained(f.path()).unwrap();
        let size = |d: &Path| std::fs::metadata(d.join("adapter_model.safetensors")).unwrap().len();
        fp32_bytes = size(f.path());
        let payload: usize = 12 * 2 * ((8 * d * usize::from(bits)).div_ceil(8) + 8);
        println!(
            "lowbit adapter file, MiniLM-L6 shapes, r=8 q,v: {bits}-bit {} B (payload {payload} B), fp32 {fp32_bytes} B",
            size(p.path())
        );
        assert!(size(p.path()) as usize >= payload);
        assert!((size(p.path()) as usize) < payload + 8192, "header overhead");
    }
    // 24 matrices of 3072 f32 values plus the header.
    assert!(fp32_bytes as usize >= 24 * 3072 * 4);
}

#[test]
fn config_json_round_trips_and_bad_values_are_errors() {
    let c = LowBitLoraConfig { ste: SteGradient::Identity, ..cfg(3) };
    let v = TunerConfig::to_json(&c).unwrap();
    let (back, warnings) = LowBitLoraConfig::from_json(&v).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!((back.bits, back.ste, back.lora.r), (3, SteGradient::Identity, 4));
    let mut bad = v.clone();
    bad["bits"] = 5.into();
    assert!(matches!(LowBitLoraConfig::from_json(&bad), Err(AdapterError::InvalidConfig { .. })));
    let mut bad = v.clone();
    bad["ste_gradient"] = "sideways".into();
    assert!(matches!(LowBitLoraConfig::from_json(&bad), Err(AdapterError::InvalidConfig { .. })));
    let mut missing = v;
    missing.as_object_mut().unwrap().remove("bits");
    assert!(LowBitLoraConfig::from_json(&missing).is_err());
    let dora = LowBitLoraConfig { lora: LoraConfig { use_dora: true, ..cfg(1).lora }, ..cfg(1) };
    assert!(PeftModel::new(Toy::new(D, 1, 0), dora, "default", 0).is_err());
    assert!(PeftModel::new(Toy::new(D, 1, 0), cfg(0), "default", 0).is_err());
    assert!(crate::registry().peft_types().contains(&PEFT_TYPE));
}

#[test]
fn registry_entry_is_lora_recipe_at_one_bit() {
    let m = crate::methods().into_iter().find(|m| m.name == LORA_1BIT).unwrap();
    let c = m.config.as_any().downcast_ref::<LowBitLoraConfig>().unwrap();
    assert_eq!((c.bits, c.lora.r, c.lora.alpha(), c.ste), (1, 8, 16.0, SteGradient::ThroughStats));
    assert!(m.describe().starts_with("1-bit"), "{}", m.describe());
}

#[test]
fn packed_file_with_wrong_sizes_is_refused() {
    let m = model(1);
    let dir = tempfile::tempdir().unwrap();
    m.save_lowbit(dir.path(), "default").unwrap();
    // Claim 2 bits: the codes are half the expected length.
    let cpath = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cpath).unwrap().replace("\"bits\": 1", "\"bits\": 2");
    std::fs::write(&cpath, text).unwrap();
    let err = PeftModel::from_pretrained(Toy::new(D, 2, 1), dir.path(), &crate::registry()).err().unwrap();
    assert!(matches!(err, AdapterError::TensorShape { .. }), "{err}");
    // Saving a non-low-bit adapter packed is an error.
    let lora = PeftModel::new(Toy::new(D, 1, 0), LoraConfig::new(4, 8.0, ["query"]), "default", 0).unwrap();
    assert!(matches!(lora.save_lowbit(dir.path(), "default"), Err(AdapterError::NotSupportedBy { .. })));
}

#[test]
fn reference_init_of_b_is_a_truncated_normal_and_nearly_the_identity() {
    let c = LowBitLoraConfig { init_b_std: Some(0.001), ..cfg(1) };
    let m = PeftModel::new(Toy::new(D, 2, 1), c.clone(), "default", 0).unwrap();
    for l in layers(&m) {
        let b = l.lora().lora_b().value().to_owned();
        assert!(b.iter().all(|v| v.abs() <= 0.002) && b.iter().any(|&v| v != 0.0));
        let [_, q] = l.packed().unwrap();
        assert!(q.stats().1 > 0.0);
    }
    let x = input(6, D);
    let y0 = Toy::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let y1 = m.forward(&x, &Ctx::eval()).unwrap();
    let d = max_diff(&y0, &y1);
    let scale = y0.as_slice().iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(d > 0.0 && d < 0.02 * scale, "{d} vs output scale {scale}");
    let v = TunerConfig::to_json(&c).unwrap();
    assert_eq!(LowBitLoraConfig::from_json(&v).unwrap().0.init_b_std, Some(0.001));
    let bad = LowBitLoraConfig { init_b_std: Some(-1.0), ..cfg(1) };
    assert!(PeftModel::new(Toy::new(D, 1, 0), bad, "default", 0).is_err());
}
