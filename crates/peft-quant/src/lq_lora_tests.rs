use super::*;
use peft_core::nn::{RandomInit, WeightSource};

fn randn(seed: u64, rows: usize, cols: usize, std: f32) -> Array2<f32> {
    RandomInit::new(seed, std).get("w", &[rows, cols]).unwrap().into_dimensionality().unwrap()
}

/// A weight with a strong low-rank part plus noise (what LQ-LoRA's decomposition is for).
fn low_rank_plus_noise(seed: u64, rows: usize, cols: usize, rank: usize) -> Array2<f32> {
    randn(seed, rows, rank, 1.0).dot(&randn(seed + 1, rank, cols, 1.0)) + randn(seed + 2, rows, cols, 0.3)
}

fn frob(a: &Array2<f32>) -> f64 {
    a.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

#[test]
fn nf4_table_is_rederived_and_storage_formula_holds() {
    let t = nf_table(4);
    for (a, b) in t.iter().zip(crate::codes::NF4.iter()) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    for bits in 2..=8u8 {
        let t = nf_table(bits);
        assert_eq!(t.len(), 1 << bits);
        assert_eq!((t[0], t[t.len() - 1]), (-1.0, 1.0));
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        assert!(t.contains(&0.0));
    }
    assert!((NfQuant::new(4).bits_per_param() - 4.126_953_125).abs() < 1e-12);
    let c = NfQuant { bits: 2, scale_bits: 4, block: 32, group: 64, group_dtype: FloatDtype::F16 };
    assert!((c.bits_per_param() - (2.0 + 4.0 / 32.0 + 16.0 / 2048.0)).abs() < 1e-12);
    assert_eq!(NfQuant::new(4).storage_bits(64 * 256), 4 * 64 * 256 + 8 * 256 + 32 + 32);
}

#[test]
fn quantizer_error_shrinks_with_bits_and_matches_nf4_without_scale_loss() {
    let w = randn(1, 32, 64, 1.0);
    let x = w.as_slice().unwrap();
    let errs: Vec<f64> = [2u8, 3, 4, 8]
        .iter()
        .map(|&b| {
            let q = NfQuant::new(b).quant_dequant(x).unwrap();
            x.iter().zip(&q).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>()
        })
        .collect();
    assert!(errs.windows(2).all(|e| e[1] < e[0]), "{errs:?}");
    // All-equal scales make the scale quantization exact: then this is plain NF4 (codes by nearest level).
    let sign: Vec<f32> = (0..128).map(|i| if i % 64 == 0 { 2.0 } else { ((i * 37 % 17) as f32 - 8.0) / 8.0 }).collect();
    let ours = NfQuant::new(4).quant_dequant(&sign).unwrap();
    let cfg = crate::Quant4Config { double_quant: false, ..Default::default() };
    let bnb = crate::Quant4::quantize(&sign, &[128], &cfg).unwrap().dequantize();
    assert!(ours.iter().zip(&bnb).all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn reconstruction_error_decreases_with_iterations_and_keeps_the_best() {
    let w = low_rank_plus_noise(3, 48, 64, 4);
    let quant = NfQuant::new(2);
    let d = decompose(&w, 4, &quant, 30, None).unwrap();
    assert!(d.errors.len() >= 2);
    // Non-increasing until the stop (only the last recorded error may be an increase).
    let n = d.errors.len();
    for t in 1..n.saturating_sub(1) {
        assert!(d.errors[t] <= d.errors[t - 1], "{:?}", d.errors);
    }
    assert!(d.error() < d.errors[0], "iterating helps: {:?}", d.errors);
    assert_eq!(d.error(), d.errors.iter().copied().fold(f64::INFINITY, f64::min));
    // The kept iterate reproduces its recorded error.
    let r = &w - &d.l1.dot(&d.l2) - &d.q;
    assert!((frob(&r) - d.error()).abs() < 1e-3 * d.error());
    // Low rank + 2 bits beats 2 bits alone by a wide margin on this matrix.
    let plain = NfQuant::new(2).quant_dequant(w.as_slice().unwrap()).unwrap();
    let plain_err = frob(&(&w - &Array2::from_shape_vec(w.dim(), plain).unwrap()));
    assert!(d.error() < 0.5 * plain_err, "{} vs {plain_err}", d.error());
}

#[test]
fn rank_zero_is_plain_quantization_and_lora_factors_reproduce_l1_l2() {
    let w = randn(4, 16, 64, 1.0);
    let d = decompose(&w, 0, &NfQuant::new(3), 5, None).unwrap();
    let q = NfQuant::new(3).quant_dequant(w.as_slice().unwrap()).unwrap();
    assert_eq!(d.q.as_slice().unwrap(), q.as_slice());
    let d = decompose(&w, 4, &NfQuant::new(3), 3, None).unwrap();
    let s = 16.0 / 4.0;
    let (a, b) = d.lora_factors(s);
    assert_eq!((a.dim(), b.dim()), ((4, 64), (16, 4)));
    let back = b.dot(&a).mapv(|v| v * s as f32);
    let l = d.l1.dot(&d.l2);
    assert!(back.iter().zip(l.iter()).all(|(x, y)| (x - y).abs() < 1e-4));
}

#[test]
fn fisher_weighting_changes_the_objective_as_stated() {
    let w = low_rank_plus_noise(5, 32, 48, 3);
    let q = NfQuant::new(2);
    // F = 1 everywhere: the same decomposition and error as unweighted.
    let ones = Array2::<f32>::ones(w.dim());
    let (d0, d1) = (decompose(&w, 3, &q, 10, None).unwrap(), decompose(&w, 3, &q, 10, Some(&ones)).unwrap());
    assert!((d0.error() - d1.error()).abs() < 1e-3 * d0.error(), "{} vs {}", d0.error(), d1.error());
    // F concentrated on a few rows and columns: the error is the F-weighted norm of the residual, and the
    // Fisher-aware factors fit the heavy entries better than the unweighted ones do.
    let f = Array2::from_shape_fn(w.dim(), |(i, j)| if i < 4 || j < 4 { 100.0 } else { 0.01 });
    let df = decompose(&w, 3, &q, 10, Some(&f)).unwrap();
    let weighted = |d: &Decomposition| {
        let r = &w - &d.l1.dot(&d.l2) - &d.q;
        r.iter().zip(f.iter()).map(|(&a, &c)| f64::from(c) * f64::from(a).powi(2)).sum::<f64>().sqrt()
    };
    assert!((weighted(&df) - df.error()).abs() < 1e-3 * df.error());
    assert!(weighted(&df) < weighted(&d0), "{} vs {}", weighted(&df), weighted(&d0));
    // Fisher from gradient samples: the mean of the squares.
    let g1 = Array2::from_elem((2, 2), 1.0f32);
    let g2 = Array2::from_elem((2, 2), 3.0f32);
    assert_eq!(fisher_diagonal(&[g1, g2]).unwrap(), Array2::from_elem((2, 2), 5.0f32));
    assert!(matches!(fisher_diagonal(&[]), Err(Error::Empty { .. })));
    assert!(matches!(decompose(&w, 3, &q, 10, Some(&ones.slice(s![..2, ..]).to_owned())), Err(Error::Shape { .. })));
}

fn brute_force(options: &[Vec<(f64, usize)>], budget: usize) -> Option<(f64, Vec<usize>)> {
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut idx = vec![0usize; options.len()];
    loop {
        let bits: usize = idx.iter().zip(options).map(|(&k, o)| o[k].1).sum();
        let cost: f64 = idx.iter().zip(options).map(|(&k, o)| o[k].0).sum();
        if bits <= budget && best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, idx.clone()));
        }
        let mut i = 0;
        loop {
            if i == options.len() {
                return best;
            }
            idx[i] += 1;
            if idx[i] < options[i].len() {
                break;
            }
            idx[i] = 0;
            i += 1;
        }
    }
}

#[test]
fn knapsack_equals_brute_force_on_small_problems() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..50 {
        let m = rng.gen_range(1..=6);
        let options: Vec<Vec<(f64, usize)>> =
            (0..m).map(|_| (0..4).map(|_| (rng.gen_range(0.0..10.0), 8 * rng.gen_range(1..20))).collect()).collect();
        let budget = rng.gen_range(8..(8 * 20 * m));
        let dp = allocate(&options, budget, 1 << 20);
        let bf = brute_force(&options, budget);
        match (dp, bf) {
            (None, None) => {}
            (Some(a), Some((c, _))) => {
                assert!(a.exact);
                assert!((a.cost - c).abs() < 1e-9, "{} vs {c}", a.cost);
                assert!(a.bits <= budget);
            }
            (a, b) => panic!("dp {a:?} vs brute force {b:?}"),
        }
    }
    // A coarse DP stays feasible.
    let options = vec![vec![(1.0, 1001), (0.5, 2003)], vec![(2.0, 997), (0.1, 3001)]];
    let a = allocate(&options, 4100, 10).unwrap();
    assert!(!a.exact && a.bits <= 4100);
}

#[test]
fn allocation_respects_the_budget_and_beats_uniform() {
    // One matrix with large, hard-to-quantize values and one small one: at 3 bits/param on average the DP should
    // give the large one more bits.
    let big = low_rank_plus_noise(11, 32, 64, 2).mapv(|v| v * 4.0);
    let small = randn(12, 32, 64, 0.05);
    let weights = vec![big, small];
    let configs = [NfQuant::new(2), NfQuant::new(3), NfQuant::new(4)];
    let options = allocation_options(&weights, None, &configs, 2, 5).unwrap();
    let budget = budget_bits(&weights, 3.2);
    let a = allocate(&options, budget, 1 << 20).unwrap();
    assert!(a.bits <= budget);
    let uniform: f64 = options.iter().map(|o| o[1].0).sum();
    let uniform_bits: usize = options.iter().map(|o| o[1].1).sum();
    assert!(uniform_bits <= budget, "uniform 3-bit fits too");
    assert!(a.cost < uniform, "{} vs uniform {uniform}", a.cost);
    assert_eq!(a.choice, vec![2, 0], "4 bits to the big matrix, 2 to the small one");
    // Bits per parameter of the choice.
    let bpp = a.bits as f64 / weights.iter().map(Array2::len).sum::<usize>() as f64;
    assert!(bpp <= 3.2, "{bpp}");
}

struct One(peft_core::nn::Linear);
impl peft_core::nn::Module for One {
    fn visit(&self, v: &mut dyn peft_core::nn::Visitor) {
        self.0.visit(v);
    }
}

#[test]
fn init_adapter_makes_q_plus_lora_the_decomposition_and_keeps_the_output_close() {
    use peft_core::nn::{Ctx, Linear, MapWeights};
    use peft_core::Tensor;
    let w = low_rank_plus_noise(21, 24, 64, 4);
    let bias = randn(22, 1, 24, 0.1).into_shape_with_order(24).unwrap();
    let src = MapWeights(
        [("q.weight".to_string(), w.clone().into_dyn()), ("q.bias".to_string(), bias.into_dyn())].into_iter().collect(),
    );
    let m = One(Linear::load("q", 64, 24, true, &src).unwrap());
    let x = Tensor::new(randn(23, 5, 64, 1.0).into_dyn());
    let y0 = m.0.forward(&x, &Ctx::eval()).unwrap();
    let lora = peft_core::adapter::PeftModel::new(m, peft_lora::LoraConfig::new(4, 8.0, ["q"]), "default", 0).unwrap();
    let ds = init_adapter(&lora, "default", &NfQuant::new(2), 10, &|_| None).unwrap();
    let m = &*lora;
    assert_eq!(ds.len(), 1);
    let d = &ds[0].1;
    // Q + s·B·A == Q + L1·L2.
    let base = m.0.base().dense_weight().unwrap().into_dimensionality::<ndarray::Ix2>().unwrap();
    assert_eq!(base, d.q);
    let delta = m.0.adapter("default").unwrap().delta_weight(m.0.base().as_ref()).unwrap().unwrap();
    let eff = &base + &delta.into_dimensionality::<ndarray::Ix2>().unwrap();
    let target = &d.q + &d.l1.dot(&d.l2);
    assert!(eff.iter().zip(target.iter()).all(|(a, b)| (a - b).abs() < 1e-4));
    assert!((frob(&(&w - &eff)) - d.error()).abs() < 1e-3 * d.error());
    // The adapted layer's output stays within the decomposition error of the original.
    let y1 = m.0.forward(&x, &Ctx::eval()).unwrap();
    let diff: f64 = y0.as_slice().iter().zip(y1.as_slice()).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
    let norm: f64 = y0.as_slice().iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
    assert!((diff / norm).sqrt() < 0.1, "{}", (diff / norm).sqrt());
    assert_eq!(lora.trainable_params().len(), 2);
}

mod tuner {
    use super::super::*;
    use super::frob;
    use crate::linear::QuantWeight;
    use crate::QuantLinear;
    use peft_core::adapter::PeftModel;
    use peft_core::nn::{linear_sites, Ctx};
    use peft_lora::LoraModelExt;
    use peft_models::llama::{Llama, LlamaSpec};

    fn spec() -> LlamaSpec {
        LlamaSpec {
            vocab: 40,
            hidden: 64,
            intermediate: 128,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            eps: 1e-5,
            rope_theta: 10_000.0,
            max_positions: 32,
            tie_embeddings: true,
            bos: None,
            eos: vec![],
        }
    }

    /// A small-rank LQ-LoRA config at `budget` (the registry's r=64 is the paper's; r=4 keeps the test fast).
    fn config(budget: f64) -> LqLoraConfig {
        let mut c = LqLoraConfig::new(budget);
        c.lora.r = 4;
        c.iters = 5;
        c
    }

    fn calib(m: &Llama, i: usize) -> Result<Option<peft_core::Tensor>> {
        if i >= 3 {
            return Ok(None);
        }
        let ids: Vec<usize> = (0..12).map(|k| (k * 7 + i * 5) % 40).collect();
        m.lm_loss(&ids, [2, 6], &peft_core::train::calibration_ctx(None)).map(Some)
    }

    /// The dense weights of every linear site before adaptation, by path.
    fn dense(m: &Llama) -> Vec<(String, Array2<f32>)> {
        linear_sites(m)
            .iter()
            .filter(|s| !s.is_output())
            .map(|s| (s.path().to_string(), s.base().dense_weight().unwrap().into_dimensionality().unwrap()))
            .collect()
    }

    #[test]
    fn the_base_becomes_bit_packed_storage_within_the_budget_and_init_keeps_w() {
        for budget in BUDGETS {
            let m = Llama::random(&spec(), 3, 0.05).unwrap();
            let before = dense(&m);
            let params: usize = before.iter().map(|(_, w)| w.len()).sum();
            let pm = PeftModel::new(m, config(budget), "default", 1).unwrap();
            let layers = pm.lora_layers("default").unwrap();
            assert_eq!(layers.len(), 7, "every linear but the tied output layer");
            let (mut bytes, mut bits) = (0usize, Vec::new());
            for ((site, l), (path, w)) in layers.iter().zip(&before) {
                assert_eq!(site.path(), path);
                let base = site.base();
                let q = base.as_any().downcast_ref::<QuantLinear>().expect("the base is a QuantLinear");
                let QuantWeight::Nf(packed) = q.weight().as_ref().clone() else { panic!("NF-b storage") };
                // The base holds the packed codes, not a dense f32 copy of dequant(Q).
                assert_eq!(base.weight_bytes(), packed.storage_bytes());
                assert!(base.weight_bytes() < w.len() * 4 / 3, "{} bytes for {} params", base.weight_bytes(), w.len());
                bytes += packed.storage_bytes();
                bits.push(packed.config().bits);
                // Q + s·B·A reproduces W up to the decomposition's error (init keeps the function close).
                let a = l.lora_a().value().to_owned().into_dimensionality::<ndarray::Ix2>().unwrap();
                let b = l.lora_b().value().to_owned().into_dimensionality::<ndarray::Ix2>().unwrap();
                let qd: Array2<f32> = base.dense_weight().unwrap().into_dimensionality().unwrap();
                let approx = &qd + &(b.dot(&a) * l.scaling() as f32);
                let rel = frob(&(&approx - w)) / frob(w);
                // No worse than quantizing W alone with the same quantizer (the low-rank part takes the largest
                // directions out of what is quantized).
                let plain = packed.config().quant_dequant(w.as_slice().unwrap()).unwrap();
                let plain = Array2::from_shape_vec(w.dim(), plain).unwrap();
                let rel_plain = frob(&(&plain - w)) / frob(w);
                assert!(rel <= rel_plain, "{path}: relative error {rel} > plain {rel_plain} at {budget} bits");
            }
            // Measured bits per parameter: at most the budget (whole bytes per stream add < 16 bits per matrix).
            let measured = 8.0 * bytes as f64 / params as f64;
            assert!(measured <= budget + 7.0 * 16.0 / params as f64, "{measured} > {budget}");
            assert!(measured > 2.12, "{measured}");
            let nominal: f64 = layers
                .iter()
                .zip(&before)
                .zip(&bits)
                .map(|((_, (_, w)), &b)| NfQuant::new(b).storage_bits(w.len()) as f64)
                .sum::<f64>();
            assert!(nominal <= (budget * params as f64).floor(), "allocated {nominal} bits over budget");
            // 2.5 bits cannot afford NF3 everywhere; 3.25 affords some NF3 or better.
            if budget == 2.5 {
                assert!(bits.iter().filter(|&&b| b >= 3).count() < 7, "{bits:?}");
            }
            if budget == 3.25 {
                assert!(bits.iter().any(|&b| b >= 3), "{bits:?}");
            }
            // The model runs and trains LoRA only.
            let y = pm.model().forward(&[1, 2, 3, 4], [1, 4], None, &Ctx::eval()).unwrap();
            assert!(y.as_slice().iter().all(|v| v.is_finite()));
            assert_eq!(pm.trainable_params().len(), 14);
        }
    }

    #[test]
    fn report_counts_bits_and_higher_budgets_lower_the_error() {
        let mut errs = Vec::new();
        for budget in [2.2, 3.25, 4.2] {
            let m = Llama::random(&spec(), 3, 0.05).unwrap();
            let mut pm = PeftModel::wrap(m, 1);
            let cfg = config(budget);
            pm.add_adapter("default", cfg.lora.clone()).unwrap();
            let before = dense(pm.model());
            let r = init_with_config(&pm, "default", &cfg, None).unwrap();
            assert!(r.allocated_bits <= r.budget_bits);
            assert_eq!(r.params, before.iter().map(|(_, w)| w.len()).sum::<usize>());
            assert!(8 * r.storage_bytes() >= r.allocated_bits);
            assert!(8 * r.storage_bytes() < r.allocated_bits + 7 * 16);
            assert!(r.bits_per_param() <= budget + 0.01, "{}", r.bits_per_param());
            let err: f64 = pm
                .lora_layers("default")
                .unwrap()
                .iter()
                .zip(&before)
                .map(|((s, l), (_, w))| {
                    let a = l.lora_a().value().to_owned().into_dimensionality::<ndarray::Ix2>().unwrap();
                    let b = l.lora_b().value().to_owned().into_dimensionality::<ndarray::Ix2>().unwrap();
                    let qd: Array2<f32> = s.base().dense_weight().unwrap().into_dimensionality().unwrap();
                    frob(&(&qd + &(b.dot(&a) * l.scaling() as f32) - w)).powi(2)
                })
                .sum();
            errs.push(err);
        }
        assert!(errs[0] > errs[1] && errs[1] > errs[2], "{errs:?}");
    }

    #[test]
    fn fisher_variant_reads_calibration_and_refuses_without_it() {
        let cfg = config(2.75).with_fisher(2);
        assert!(TunerConfig::needs_calibration(&cfg));
        let m = Llama::random(&spec(), 3, 0.05).unwrap();
        let r = PeftModel::new(m, cfg.clone(), "default", 1);
        assert!(matches!(r, Err(AdapterError::Unsupported { .. })), "{:?}", r.err().map(|e| e.to_string()));
        let m = Llama::random(&spec(), 3, 0.05).unwrap();
        let mut pm = PeftModel::wrap(m, 1);
        let mut calls = 0;
        pm.add_adapter_calibrated("default", Box::new(cfg), &mut |m: &Llama, i| {
            calls += 1;
            calib(m, i)
        })
        .unwrap();
        pm.set_adapter("default").unwrap();
        assert_eq!(calls, 2, "fisher_batches bounds the batches read");
        let layers = pm.lora_layers("default").unwrap();
        assert!(layers.iter().all(|(s, _)| matches!(
            s.base().as_any().downcast_ref::<QuantLinear>().map(|q| q.weight().format()),
            Some(crate::QuantFormat::Nf(_))
        )));
        // Base weights are frozen again after the Fisher pass.
        assert_eq!(pm.trainable_params().len(), 14);
        // Fisher from calibration: mean of squared gradients, positive somewhere, one matrix per site.
        let m = Llama::random(&spec(), 3, 0.05).unwrap();
        let sites: Vec<Linear> = linear_sites(&m).into_iter().filter(|s| !s.is_output()).collect();
        let f = fisher_from_calibration(&sites, &mut |i| calib(&m, i), 10).unwrap();
        assert_eq!(f.len(), 7);
        assert!(f.iter().all(|f| f.iter().all(|&v| v >= 0.0) && f.iter().any(|&v| v > 0.0)));
        assert!(sites.iter().all(|s| s.base().params().iter().all(|p| !p.trainable())));
    }

    #[test]
    fn bad_configs_are_typed_errors_and_registry_entries_are_the_budgets() {
        let m = Llama::random(&spec(), 3, 0.05).unwrap();
        let r = PeftModel::new(m, config(2.0), "default", 1);
        assert!(matches!(r, Err(AdapterError::InvalidConfig { ref field, .. }) if field == "budget"));
        let mut c = config(3.0);
        c.candidates = vec![NfQuant { bits: 9, ..NfQuant::new(4) }];
        assert!(matches!(c.validate(), Err(AdapterError::InvalidConfig { ref field, .. }) if field == "candidates"));
        let mut c = config(3.0);
        c.iters = 0;
        assert!(matches!(c.validate(), Err(AdapterError::InvalidConfig { ref field, .. }) if field == "iters"));
        assert!(config(3.0).for_loading().is_ok(), "loading builds LoRA layers over the stored Q");
        let all = methods();
        let names: Vec<&str> = all.iter().map(|m| m.name.0).collect();
        assert_eq!(names, ["lq-lora-2.5", "lq-lora-2.75", "lq-lora-3.25", "lq-lora-fisher-2.75"]);
        for (m, budget) in all.iter().zip([2.5, 2.75, 3.25, 2.75]) {
            let c = m.config.as_any().downcast_ref::<LqLoraConfig>().unwrap();
            assert_eq!(c.budget, budget);
            assert_eq!((c.lora.r, c.lora.alpha(), c.lora.lora_dropout), (64, 16.0, 0.0));
            assert_eq!(c.candidates, default_candidates());
        }
        assert_eq!(all[3].config.as_any().downcast_ref::<LqLoraConfig>().unwrap().fisher_batches, Some(8));
        assert!(all[3].config.needs_calibration());
    }

    fn logits(m: &PeftModel<Llama>) -> Vec<f32> {
        m.model().forward(&[1, 5, 9, 2, 37, 0], [2, 3], None, &Ctx::eval()).unwrap().as_slice().to_vec()
    }

    #[test]
    fn saved_adapter_and_base_reload_bit_for_bit() {
        let pm = PeftModel::new(Llama::random(&spec(), 3, 0.05).unwrap(), config(2.75), "default", 1).unwrap();
        let tc = peft_core::train::TrainerConfig { lr: 1e-2, total_steps: 3, ..Default::default() };
        let mut t = peft_core::train::Trainer::new(pm.trainable_params(), &pm, tc).unwrap();
        for i in 0..3 {
            let ids: Vec<usize> = (0..12).map(|k| (k * 7 + i * 5) % 40).collect();
            t.step(|ctx| Ok(peft_core::train::Loss::Single(pm.model().lm_loss(&ids, [2, 6], ctx)?))).unwrap();
        }
        drop(t);
        let before = PeftModel::new(Llama::random(&spec(), 3, 0.05).unwrap(), config(2.75), "default", 1).unwrap();
        let want = logits(&pm);
        assert_ne!(want, logits(&before), "training moved the factors");
        let dir = tempfile::tempdir().unwrap();
        let bytes = save_pretrained(&pm, dir.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(v["peft_type"], LQ_LORA_PEFT_TYPE);
        assert_eq!(v["lq_budget"], 2.75);
        // The base file holds Q in its packed storage and no adapter tensor.
        let ckpt = crate::Checkpoint::read(dir.path().join(BASE_FILE)).unwrap();
        assert!(ckpt.names().iter().all(|n| !n.contains("lora_")), "{:?}", ckpt.names());
        let layers = pm.lora_layers("default").unwrap();
        for (site, _) in &layers {
            assert!(ckpt.has_nf(site.path()), "{}", site.path());
        }
        let on_disk = std::fs::metadata(dir.path().join(BASE_FILE)).unwrap().len()
            + std::fs::metadata(dir.path().join("adapter_model.safetensors")).unwrap().len()
            + std::fs::metadata(dir.path().join("adapter_config.json")).unwrap().len();
        assert_eq!(bytes, on_disk);

        // Rebuilt from the base file, the adapter loads and the outputs agree bit for bit.
        let base = Llama::load(&spec(), &crate::load::BnbWeights::new(&ckpt, "lq_base")).unwrap();
        let (back, report) = PeftModel::from_pretrained(base, dir.path(), &crate::registry()).unwrap();
        assert!(report.ignored_config.is_empty(), "{:?}", report.ignored_config);
        assert_eq!(logits(&back), want);
        let c = back.config("default").unwrap().as_any().downcast_ref::<LqLoraConfig>().unwrap();
        assert_eq!((c.budget, c.lora.r, &c.candidates), (2.75, 4, &default_candidates()));

        // The dense original: refused, nothing attached; a LoRA-only registry does not know the type.
        let dense = Llama::random(&spec(), 3, 0.05).unwrap();
        let e = PeftModel::from_pretrained(dense, dir.path(), &crate::registry()).err().unwrap();
        assert!(matches!(e, AdapterError::Unsupported { .. }) && e.to_string().contains(BASE_FILE), "{e}");
        let dense = Llama::random(&spec(), 3, 0.05).unwrap();
        assert!(PeftModel::from_pretrained(dense, dir.path(), &peft_lora::registry()).is_err());
    }
}
