use super::*;
use peft_core::nn::{named_params, Ctx, RandomInit, Visitor, WeightSource};
use peft_core::Tensor;
use peft_lora::LoraModelExt;

/// Two BERT-named layers (`query`, `value`, `output.dense`) and a `classifier` output layer.
struct Toy {
    layers: Vec<[Linear; 3]>,
    classifier: Linear,
}

impl Toy {
    fn new(d: usize, seed: u64) -> Self {
        let init = RandomInit::new(seed, 0.3);
        let l = |p: String| Linear::load(&p, d, d, true, &init).unwrap();
        let layers = (0..2)
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

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
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

fn input(seed: u64) -> Tensor {
    Tensor::new(RandomInit::new(seed, 1.0).get("x", &[5, D]).unwrap())
}

fn cfg() -> LoraConfig {
    LoraConfig::new(4, 8.0, ["query", "value"])
}

type Model = PeftModel<Toy>;

/// Gives every LoRA B a non-zero value (B starts at zero), the same in any model of the same shape.
fn randomize_b(lm: &Model) {
    for (i, (_, l)) in lm.lora_layers("default").unwrap().iter().enumerate() {
        let b = l.lora_b();
        b.set(RandomInit::new(100 + i as u64, 0.2).get("b", &b.shape()).unwrap()).unwrap();
    }
}

fn qcfg() -> QloraConfig {
    QloraConfig { lora: cfg(), ..QloraConfig::new(["query"]) }
}

/// A QLoRA toy and its dense twin: same bias params, dense bases holding exactly the dequantised weights,
/// the same LoRA adapter values.
fn qlora_and_twin() -> (Model, Model) {
    let q = PeftModel::new(Toy::new(D, 1), qcfg(), "default", 7).unwrap();
    randomize_b(&q);
    let twin = Toy::new(D, 1);
    let qs = q.quantized_sites();
    for site in linear_sites(&twin) {
        let Some(qsite) = qs.iter().find(|s| s.path() == site.path()) else { continue };
        let w = Param::new(format!("{}.weight", site.path()), qsite.base().dense_weight().unwrap(), false);
        site.replace_base(Arc::new(Dense { weight: w, bias: site.base().bias() })).unwrap();
    }
    let lm = PeftModel::new(twin, cfg(), "default", 7).unwrap();
    randomize_b(&lm);
    (q, lm)
}

fn paths(q: &Model) -> Vec<String> {
    q.quantized_sites().iter().map(|s| s.path().to_string()).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    peft_core::testing::max_abs_diff(a.as_slice(), b.as_slice())
}

#[test]
fn default_spec_quantizes_every_linear_but_the_head() {
    let (q, _) = qlora_and_twin();
    assert_eq!(paths(&q).len(), 6);
    assert!(!paths(&q).contains(&"classifier".to_string()));
    assert_eq!(q.classifier.base().weight_bytes(), 3 * D * 4, "the head stays dense");
    // 64·64/2 packed + 64 u8 scales + 1 nested f32 + offset.
    assert_eq!(q.layers[0][2].base().weight_bytes(), D * D / 2 + D + 8);
}

#[test]
fn qlora_forward_equals_dequantized_dense_plus_lora_forward() {
    let (toy, twin) = qlora_and_twin();
    let x = input(3);
    let ctx = Ctx::eval();
    let (y, yd) = (toy.forward(&x, &ctx).unwrap(), twin.forward(&x, &ctx).unwrap());
    assert!(max_diff(&y, &yd) < 1e-5, "{}", max_diff(&y, &yd));
    // The adapters are not trivially zero.
    let plain = Toy::new(D, 1);
    assert!(max_diff(&y, &plain.forward(&x, &ctx).unwrap()) > 1e-3);
}

#[test]
fn gradients_flow_to_lora_only_and_equal_the_dense_twin() {
    let (toy, lm) = qlora_and_twin();
    let x = input(4);
    let targets = [0i64, 1, 2, 0, 1];
    let loss = |m: &Toy| m.forward(&x, &Ctx::train(0)).unwrap().cross_entropy(&targets, None, 0.0).unwrap();
    let g = loss(&toy).backward().unwrap();
    let gd = loss(&lm).backward().unwrap();
    let lora = toy.trainable_params();
    assert_eq!(lora.len(), 8, "A and B on 4 sites");
    for p in named_params(toy.model()) {
        let is_lora = lora.iter().any(|l| l.id() == p.id());
        assert_eq!(g.get_id(p.id()).is_some(), is_lora, "{}", p.name());
    }
    for (p, pd) in lora.iter().zip(lm.trainable_params()) {
        assert_eq!(p.name(), pd.name());
        let (a, b) = (g.get_id(p.id()).unwrap(), gd.get_id(pd.id()).unwrap());
        let d = a.iter().zip(b.iter()).map(|(u, v)| (u - v).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{}: {d}", p.name());
    }
    assert_eq!(g.len(), lora.len(), "no gradient for anything else");
}

#[test]
fn merge_option_a_equals_the_unmerged_forward() {
    let (q, _) = qlora_and_twin();
    let x = input(5);
    let y0 = q.forward(&x, &Ctx::eval()).unwrap();
    let (toy, merged) = q.merge_and_unload_dense(FloatDtype::F32).unwrap();
    assert_eq!(merged.len(), 6);
    let y1 = toy.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_diff(&y0, &y1) < 1e-4, "{}", max_diff(&y0, &y1));
    let site = &toy.layers[0][0];
    assert!(site.adapters().is_empty());
    assert_eq!(site.base().weight_bytes(), D * D * 4, "dense again");
    // f16 export rounds each element by at most 2^-11 relative.
    let (q2, _) = qlora_and_twin();
    let w32 = q2.merged_dense_weights(FloatDtype::F32).unwrap();
    let w16 = q2.merged_dense_weights(FloatDtype::F16).unwrap();
    for ((_, a), (_, b)) in w32.iter().zip(&w16) {
        assert!(a.iter().zip(b.iter()).all(|(u, v)| (u - v).abs() <= u.abs() * 4.9e-4 + 1e-7));
    }
}

#[test]
fn merge_option_b_requantizes_and_reports_the_rounding_error() {
    let (mut q, _) = qlora_and_twin();
    let x = input(6);
    let y0 = q.forward(&x, &Ctx::eval()).unwrap();
    let exact = q.merged_dense_weights(FloatDtype::F32).unwrap();
    let bytes = q.quant_memory();
    let report = q.merge_requantized().unwrap();
    assert_eq!(report.len(), 4, "only the adapted sites");
    let half_gap = 0.5 * crate::codes::max_gap(&crate::codes::NF4);
    for r in &report {
        let (_, w) = exact.iter().find(|(p, _)| *p == r.path).unwrap();
        let absmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(r.max_abs > 0.0 && r.max_abs <= half_gap * absmax * 1.05, "{r:?}");
        assert!(r.mean_abs <= r.max_abs && r.relative > 0.0 && r.relative < 0.15, "{r:?}");
    }
    assert_eq!(q.quant_memory(), bytes, "still 4-bit");
    assert!(q.layers[0][0].is_merged("default").unwrap());
    let y1 = q.forward(&x, &Ctx::eval()).unwrap();
    let norm = y0.as_slice().iter().map(|v| v * v).sum::<f32>().sqrt();
    let diff: f32 = y0.as_slice().iter().zip(y1.as_slice()).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
    assert!(diff / norm < 0.15, "relative output change {}", diff / norm);
}

#[test]
fn save_and_load_round_trip_in_peft_layout() {
    let (q, _) = qlora_and_twin();
    let x = input(8);
    let y0 = q.forward(&x, &Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert!(q.save_pretrained(dir.path()).unwrap() > 0);
    let f = peft_core::io::safetensors::SafeTensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(f.contains("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"));
    assert!(f.contains("base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"));
    assert_eq!(f.len(), 8);
    // Loading: quantize the fresh model the same way, then load the plain LoRA adapter.
    let fresh = Toy::new(D, 1);
    quantize_sites(&fresh, &default_quant_spec().unwrap(), &QuantFormat::default()).unwrap();
    let (q2, report) = PeftModel::from_pretrained(fresh, dir.path(), &peft_lora::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(paths(&q2), paths(&q));
    let y1 = q2.forward(&x, &Ctx::eval()).unwrap();
    assert_eq!(y0.as_slice(), y1.as_slice());
}

#[test]
fn registry_entry_quantizes_the_encoder_and_trains_lora_and_head() {
    let all = methods();
    assert_eq!(all.len(), 7, "qlora, qlora-paper, lora-1bit and four LQ-LoRA entries");
    assert!(peft_core::adapter::duplicate_name(&all).is_none());
    let m = &all[0];
    assert_eq!(m.name, QLORA);
    assert!((m.lr - 2.5e-3).abs() < 1e-12);
    assert!(m.describe().contains("r=8") && m.describe().contains("nf4-DQ"), "{}", m.describe());
    let mut cfg = m.config();
    cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
    let mut toy = PeftModel::wrap(Toy::new(D, 2), 0);
    toy.add_adapter_boxed("default", cfg).unwrap();
    toy.set_adapter("default").unwrap();
    let n: usize = toy.trainable_params().iter().map(Param::numel).sum();
    assert_eq!(n, 4 * 8 * 2 * D + 3 * D + 3);
    assert_eq!(toy.layers[1][2].base().weight_bytes(), D * D / 2 + D + 8);
    assert_eq!(toy.classifier.base().weight_bytes(), 3 * D * 4);
    let dir = tempfile::tempdir().unwrap();
    assert!(toy.save_pretrained(dir.path()).unwrap() > 0);
    // A few AdamW steps reduce the loss.
    let x = input(9);
    let targets = [0i64, 1, 2, 0, 1];
    let mut opt = peft_core::AdamW::with_lr(toy.trainable_params(), 1e-2, 0.0).unwrap();
    let mut losses = vec![];
    for step in 0..30 {
        let loss = toy.forward(&x, &Ctx::train(step)).unwrap().cross_entropy(&targets, None, 0.0).unwrap();
        let g = loss.backward().unwrap();
        losses.push(loss.item().unwrap());
        drop(loss);
        peft_core::Optimizer::step(&mut opt, &g).unwrap();
    }
    assert!(losses[29] < 0.5 * losses[0], "{losses:?}");
}

/// Audit items: the QLoRA dense export ignored the `lora_bias` term, and re-quantized merging skipped
/// non-mergeable adapters silently.
#[test]
fn dense_export_keeps_the_lora_bias_and_unmergeable_adapters_are_errors() {
    let mut c = qcfg();
    c.lora.lora_bias = true;
    let q = PeftModel::new(Toy::new(D, 3), c, "default", 7).unwrap();
    randomize_b(&q);
    for (_, l) in q.lora_layers("default").unwrap() {
        l.lora_b_bias().unwrap().update(|b| b.fill(0.25));
    }
    let x = input(10);
    let y0 = q.forward(&x, &Ctx::eval()).unwrap();
    let (toy, _) = q.merge_and_unload_dense(FloatDtype::F32).unwrap();
    let y1 = toy.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_diff(&y0, &y1) < 1e-4, "{}", max_diff(&y0, &y1));
    // An adapter that cannot merge (a test adapter with no delta weight) is refused by name, nothing merged.
    struct NoMerge;
    impl peft_core::nn::LinearAdapter for NoMerge {
        fn name(&self) -> &str {
            "nomerge"
        }
        fn kind(&self) -> &str {
            "test"
        }
        fn delta(&self, _: &Tensor, _: &Tensor, _: &dyn LinearBase, _: &Ctx) -> Result<Option<Tensor>> {
            Ok(None)
        }
        fn params(&self) -> Vec<Param> {
            Vec::new()
        }
        fn delta_weight(&self, _: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
            Ok(None)
        }
    }
    let (mut q, _) = qlora_and_twin();
    q.layers[0][0].attach(Arc::new(NoMerge)).unwrap();
    let e = q.merge_requantized().unwrap_err();
    assert!(e.to_string().contains("nomerge"), "{e}");
    assert!(!q.layers[0][1].is_merged("default").unwrap(), "nothing merged");
}

#[test]
fn minilm_shaped_layer_holds_at_most_0_52_bytes_per_param() {
    // One MiniLM-L6 encoder layer: q, k, v, attention output [384, 384], intermediate [1536, 384], output
    // [384, 1536].
    let shapes = [[384, 384], [384, 384], [384, 384], [384, 384], [1536, 384], [384, 1536]];
    let mut total = QuantMemory::default();
    for (i, [o, n]) in shapes.into_iter().enumerate() {
        let w = RandomInit::new(i as u64, 0.05).get("w", &[o, n]).unwrap();
        let q = QuantLinear::quantize(w.as_slice().unwrap(), o, n, None, &QuantFormat::default()).unwrap();
        let m = QuantMemory::of(&q.weight());
        // Measured from the buffers: packed codes, u8 scales, nested f32 scales + offset, 16 + 256 f32 maps.
        let (params, blocks) = (o * n, o * n / 64);
        assert_eq!(m.params, params);
        assert_eq!(m.codes, params / 2);
        assert_eq!(m.absmax, blocks);
        assert_eq!(m.nested_absmax, 4 * blocks.div_ceil(256) + 4);
        assert_eq!(m.maps, 64 + 1024);
        assert_eq!(m.bytes_without_maps(), q.weight_bytes());
        total = total + m;
    }
    let bpp = total.bytes_per_param();
    assert!(bpp <= 0.52, "{bpp} bytes/param");
    assert!(total.bytes_per_param_without_maps() <= 0.516, "{}", total.bytes_per_param_without_maps());
    // Without double quantisation: 4.5 bits + maps.
    let plain = crate::Quant4Config { double_quant: false, ..Default::default() };
    let w = RandomInit::new(0, 0.05).get("w", &[384, 384]).unwrap();
    let q = QuantLinear::quantize(w.as_slice().unwrap(), 384, 384, None, &QuantFormat::Block4(plain)).unwrap();
    let m = QuantMemory::of(&q.weight());
    assert!((m.bytes_per_param_without_maps() - 0.5625).abs() < 1e-9);
}

/// Audit item: the QLoRA bench method did not forward the run's seed, so every seed got the same LoRA init. The
/// seed is the `PeftModel`'s: equal seeds give equal `lora_A`, different seeds different ones.
#[test]
fn the_run_seed_reaches_the_qlora_init() {
    let a = |seed: u64| {
        let mut toy = PeftModel::wrap(Toy::new(D, 2), seed);
        toy.add_adapter_boxed("default", methods()[0].config()).unwrap();
        toy.lora_layers("default").unwrap()[0].1.lora_a().value().to_owned()
    };
    assert_eq!(a(3), a(3));
    assert_ne!(a(3), a(4));
}

#[test]
fn qlora_paper_entry_is_the_papers_recipe() {
    let all = methods_for(&["query", "value"]);
    let m = all.iter().find(|m| m.name == QLORA_PAPER).expect("qlora-paper is registered");
    assert_eq!(m.name.0, "qlora-paper");
    assert!((m.lr - 2e-4).abs() < 1e-15);
    let cfg = m.config.as_any().downcast_ref::<QloraConfig>().expect("a QloraConfig");
    assert_eq!(cfg.lora.r, 64);
    assert!((cfg.lora.alpha() - 16.0).abs() < 1e-12);
    assert!((cfg.lora.lora_dropout - 0.1).abs() < 1e-12);
    assert_eq!(cfg.lora.target_modules, Some(ModulePattern::Regex("all-linear".into())));
    assert_eq!(cfg.format, QuantFormat::Block4(crate::Quant4Config::default()));
    assert!(
        matches!(cfg.format, QuantFormat::Block4(c) if c.quant_type == crate::QuantType::Nf4 && c.double_quant && c.blocksize == 64)
    );
    assert!(cfg.quant.is_none(), "the base: every linear but the output layer");
    // On the toy: LoRA on all six encoder linears (not the classifier output layer), every one of them NF4-DQ.
    let mut toy = PeftModel::wrap(Toy::new(D, 2), 0);
    toy.add_adapter_boxed("default", m.config()).unwrap();
    toy.set_adapter("default").unwrap();
    let n: usize = toy.trainable_params().iter().map(Param::numel).sum();
    assert_eq!(n, 6 * 64 * 2 * D);
    assert_eq!(toy.quantized_sites().len(), 6);
    assert_eq!(toy.classifier.base().weight_bytes(), 3 * D * 4);
    // The small entry is still r=8 on query,value.
    let small = all.iter().find(|m| m.name == QLORA).unwrap();
    assert!(small.describe().contains("r=8") && small.describe().contains("query,value"), "{}", small.describe());
}
