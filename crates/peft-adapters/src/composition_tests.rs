use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};
use peft_core::train::TrainHooks;
use peft_models::bert::BertModel;
use proptest::prelude::*;

use super::*;
use crate::bottleneck::BottleneckConfig;
use crate::testutil::{batch, fd_check, out, perturb, tiny, weighted_sum, D};

type Model = PeftModel<BertModel>;

/// A tiny BERT with trained-looking SeqBn sources `a` and `b` (2 FFN sites) and a Houlsby source `c`.
fn with_sources() -> Model {
    let mut m = PeftModel::wrap(tiny(0), 1);
    for (i, (name, cfg)) in
        [("a", BottleneckConfig::seq_bn()), ("b", BottleneckConfig::seq_bn()), ("c", BottleneckConfig::houlsby())]
            .into_iter()
            .enumerate()
    {
        m.add_adapter(name, cfg).unwrap();
        for (j, p) in m.adapter_params(name).unwrap().iter().enumerate() {
            perturb(p, 100 * i as u64 + j as u64, 0.5);
        }
    }
    m
}

fn comp<'a>(m: &'a Model, name: &str) -> &'a CompositionTuner {
    m.tuner(name).unwrap().as_any().downcast_ref::<CompositionTuner>().unwrap()
}

fn only(m: &mut Model, name: &str) -> Vec<f32> {
    m.set_adapter(name).unwrap();
    out(m)
}

fn set(p: &Param, shape: &[usize], v: Vec<f32>) {
    p.set(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()).unwrap();
}

#[test]
fn scalearn_with_one_hot_omega_is_that_source_and_zero_omega_is_the_base() {
    let mut m = with_sources();
    let (ya, yb) = (only(&mut m, "a"), only(&mut m, "b"));
    m.add_adapter("s", CompositionConfig::scalearn_uniform(&["a", "b"])).unwrap();
    m.set_adapter("s").unwrap();
    assert_eq!(comp(&m, "s").layers().len(), 2, "one block per FFN site");
    assert_eq!(m.param_counts().0, 2 * 2, "ScaLearnUniform: N scalars per site");
    for (w, want) in [(vec![1.0, 0.0], &ya), (vec![0.0, 1.0], &yb)] {
        for (_, l) in comp(&m, "s").layers() {
            set(l.omega().unwrap(), &[2, 1], w.clone());
        }
        assert!(max_abs_diff(&out(&m), want) < 1e-5, "ω = {w:?}");
    }
    for (_, l) in comp(&m, "s").layers() {
        set(l.omega().unwrap(), &[2, 1], vec![0.0, 0.0]);
    }
    assert!(max_abs_diff(&out(&m), &out(&tiny(0))) < 1e-6, "ω = 0 is the base model");
}

#[test]
fn scalearn_starts_around_scale_over_n_and_its_variants_count_parameters() {
    let mut m = with_sources();
    let cases = [
        ("vec", CompositionConfig::scalearn(&["a", "b"]), 2 * 2 * D),
        ("uni", CompositionConfig::scalearn_uniform(&["a", "b"]), 2 * 2),
        ("vecpp", CompositionConfig::scalearn_pp(&["a", "b"]), 2 * D),
        ("unipp", CompositionConfig::scalearn_uniform_pp(&["a", "b"]), 2),
    ];
    for (name, cfg, n) in cases {
        m.add_adapter(name, cfg).unwrap();
        m.set_adapter(name).unwrap();
        assert_eq!(m.param_counts().0, n, "{name}");
        for p in m.adapter_params(name).unwrap() {
            assert!(p.value().iter().all(|&v| (v - 1.0).abs() < 0.01), "{name}: ω ≈ 2/N = 1: {:?}", p.value());
        }
    }
    // The "++" blocks share one ω: changing it changes every site.
    let t = comp(&m, "unipp");
    let shared = t.shared_omega().unwrap();
    set(shared, &[2, 1], vec![0.25, 4.0]);
    for (_, l) in t.layers() {
        assert_eq!(l.omega().unwrap().value().iter().copied().collect::<Vec<_>>(), [0.25, 4.0]);
    }
    assert_eq!(m.state_dict("unipp").unwrap().len(), 1, "one shared tensor in the file");
}

#[test]
fn average_with_one_hot_weights_is_that_source_and_uniform_weights_average_the_outputs() {
    let mut m = with_sources();
    let (ya, yb) = (only(&mut m, "a"), only(&mut m, "b"));
    m.add_adapter("onehot", CompositionConfig::average(&["a", "b"], Some(vec![0.0, 3.0]))).unwrap();
    assert!(max_abs_diff(&only(&mut m, "onehot"), &yb) < 1e-6, "weights are normalised: [0, 3] → [0, 1]");
    m.add_adapter("avg", CompositionConfig::average(&["a", "b"], None)).unwrap();
    let y = only(&mut m, "avg");
    assert_eq!(m.param_counts().0, 0, "nothing trains");
    assert!(max_abs_diff(&y, &ya) > 1e-3 && max_abs_diff(&y, &yb) > 1e-3);
    // On one site, against the sources' own branches.
    let (site, l) = &comp(&m, "avg").layers()[0];
    let (h, x) = (
        Tensor::new(RandomInit::new(1, 1.0).get("h", &[2, 3, D]).unwrap()),
        Tensor::new(RandomInit::new(2, 1.0).get("x", &[2, 3, D]).unwrap()),
    );
    let ctx = Ctx::eval();
    let ua = l.sources()[0].forward(&h, &x, &ctx).unwrap();
    let ub = l.sources()[1].forward(&h, &x, &ctx).unwrap();
    let want = ua.add(&ub).unwrap().mul_scalar(0.5);
    let got = site.forward(h, &x, &ctx).unwrap();
    assert!(max_abs_diff(&got.to_vec(), &want.to_vec()) < 1e-6);
}

/// The fusion block on one site against its formula computed with ndarray.
#[test]
fn fusion_computes_attention_over_the_source_outputs() {
    let mut m = with_sources();
    m.add_adapter("f", CompositionConfig::fuse(&["a", "b"])).unwrap();
    m.set_adapter("f").unwrap();
    for (i, p) in m.adapter_params("f").unwrap().iter().enumerate() {
        perturb(p, 40 + i as u64, 0.4);
    }
    let (site, l) = &comp(&m, "f").layers()[0];
    let (h, x) = (
        Tensor::new(RandomInit::new(1, 1.0).get("h", &[2, 3, D]).unwrap()),
        Tensor::new(RandomInit::new(2, 1.0).get("x", &[2, 3, D]).unwrap()),
    );
    let ctx = Ctx::eval();
    let br: Vec<ResidualBranch> = l.sources().iter().map(|s| s.branch(&h, &x, &ctx).unwrap()).collect();
    let mat = |t: &Tensor| -> Array2<f32> { t.data().to_owned().into_shape_with_order((6, D)).unwrap() };
    let st = m.state_dict("f").unwrap();
    let get = |k: &str| st[&format!("base_model.model.{}.adapter_fusion_layer.{k}", site.path())].clone();
    let w2 = |k: &str| get(k).into_shape_with_order((D, D)).unwrap();
    let b1 = |k: &str| get(k).into_shape_with_order(D).unwrap();
    let q = mat(&br[1].input).dot(&w2("query.weight").t()) + b1("query.bias");
    let hm = mat(&h);
    let mut want = hm.clone();
    let us: Vec<Array2<f32>> = br.iter().map(|b| mat(&b.delta)).collect();
    let ks: Vec<Array2<f32>> = us.iter().map(|u| u.dot(&w2("key.weight").t()) + b1("key.bias")).collect();
    let vs: Vec<Array2<f32>> = us.iter().map(|u| u.dot(&w2("value.weight").t())).collect();
    for r in 0..6 {
        let s: Vec<f32> = ks.iter().map(|k| k.row(r).dot(&q.row(r))).collect();
        let mx = s.iter().fold(f32::MIN, |a, &b| a.max(b));
        let e: Vec<f32> = s.iter().map(|v| (v - mx).exp()).collect();
        let z: f32 = e.iter().sum();
        for (i, v) in vs.iter().enumerate() {
            let add = &v.row(r) * (e[i] / z);
            let mut row = want.row_mut(r);
            row += &add;
        }
    }
    let got = site.forward(h, &x, &ctx).unwrap();
    assert!(max_abs_diff(&got.to_vec(), want.as_slice().unwrap()) < 1e-5);
}

#[test]
fn fusion_of_one_source_with_an_identity_value_is_that_source_and_residual_before_agrees() {
    let mut m = with_sources();
    let ya = only(&mut m, "a");
    for (name, rb) in [("f", false), ("g", true)] {
        let cfg = CompositionConfig { residual_before: rb, ..CompositionConfig::fuse(&["a"]) };
        m.add_adapter(name, cfg).unwrap();
        for (_, l) in comp(&m, name).layers() {
            let v = l.value().unwrap();
            v.set(ArrayD::from_shape_fn(IxDyn(&[D, D]), |i| if i[0] == i[1] { 1.0 } else { 0.0 })).unwrap();
        }
        // A softmax over one source is 1: the block returns h + V u = h + u.
        assert!(max_abs_diff(&only(&mut m, name), &ya) < 1e-5, "{name}");
        assert!(comp(&m, name).regularization_loss().unwrap().unwrap().item().unwrap().abs() < 1e-12);
    }
}

#[test]
fn only_the_block_trains_and_the_sources_stay_frozen() {
    let mut m = with_sources();
    m.add_adapter("f", CompositionConfig::fuse(&["a", "b"])).unwrap();
    m.set_adapter("f").unwrap();
    let train: Vec<String> = m.trainable_params().iter().map(|p| p.name().to_string()).collect();
    assert_eq!(train.len(), 2 * 5, "{train:?}");
    assert!(train.iter().all(|n| n.contains(".adapters.f.")), "{train:?}");
    assert!(m.adapter_params("a").unwrap().iter().all(|p| !p.trainable()));
    // Gradients reach the block's parameters through the frozen sources' outputs. The key bias adds the same
    // score `⟨q, b_k⟩` to every source, which the softmax cancels: its gradient is exactly zero (the f64 check of
    // `fuse_map` covers it), so the f32 finite differences, all rounding noise, are not compared for it.
    let params = m.adapter_params("f").unwrap();
    for (i, p) in params.iter().enumerate() {
        perturb(p, 60 + i as u64, 0.4);
    }
    let checked: Vec<Param> = params.iter().filter(|p| !p.name().ends_with("key.bias")).cloned().collect();
    assert_eq!(checked.len(), params.len() - 2);
    fd_check(&|| weighted_sum(&m, &Ctx::eval()), &checked, 1e-2, 2e-2);
    let g = weighted_sum(&m, &Ctx::eval()).backward().unwrap();
    for p in params.iter().filter(|p| p.name().ends_with("key.bias")) {
        let gk = g.get_id(p.id()).map(|a| a.iter().fold(0.0f32, |m, v| m.max(v.abs()))).unwrap_or(0.0);
        assert!(gk < 1e-5, "{}: {gk}", p.name());
    }
}

#[test]
fn scalearn_gradients_through_the_model_match_finite_differences() {
    let mut m = with_sources();
    m.add_adapter("s", CompositionConfig::scalearn(&["a", "b"])).unwrap();
    m.set_adapter("s").unwrap();
    let params = m.adapter_params("s").unwrap();
    fd_check(&|| weighted_sum(&m, &Ctx::eval()), &params, 1e-2, 2e-2);
}

#[test]
fn the_fusion_penalty_is_the_value_maps_distance_to_the_identity_and_reaches_the_trainer() {
    let mut m = with_sources();
    m.add_adapter("f", CompositionConfig::fuse(&["a", "b"])).unwrap();
    m.set_adapter("f").unwrap();
    let t = comp(&m, "f");
    // At init V = I + 1e-6 off the diagonal: 2 sites × (D² − D) × 1e-12, times 0.01.
    let init = t.regularization_loss().unwrap().unwrap().item().unwrap();
    assert!((f64::from(init) - 0.01 * 2.0 * (D * D - D) as f64 * 1e-12).abs() < 1e-15, "{init}");
    let mut want = 0.0f64;
    for (i, (_, l)) in t.layers().iter().enumerate() {
        let v = l.value().unwrap();
        perturb(v, 80 + i as u64, 0.3);
        want += v
            .value()
            .indexed_iter()
            .map(|(ix, &w)| (if ix[0] == ix[1] { 1.0 } else { 0.0 } - f64::from(w)).powi(2))
            .sum::<f64>();
    }
    let aux = m.aux_loss().unwrap().expect("PeftModel hands the penalty to the trainer");
    assert!((f64::from(aux.item().unwrap()) - 0.01 * want).abs() < 1e-4 * want.max(1.0));
    // The static config has no value map and no penalty.
    m.add_adapter("st", CompositionConfig::fuse_static(&["a", "b"])).unwrap();
    m.set_adapter("st").unwrap();
    assert!(m.aux_loss().unwrap().is_none());
    assert_eq!(m.param_counts().0, 2 * 2 * (D * D + D), "query and key (weights, biases) on 2 sites");
}

#[test]
fn temperature_anneals_from_fifty_to_one_per_step() {
    let mut m = with_sources();
    let cfg = CompositionConfig { temperature: true, ..CompositionConfig::fuse(&["a", "b"]) };
    m.add_adapter("f", cfg).unwrap();
    m.add_adapter("g", CompositionConfig::fuse(&["a", "b"])).unwrap();
    for (p, q) in m.adapter_params("f").unwrap().iter().zip(m.adapter_params("g").unwrap()) {
        perturb(p, 7, 1.0);
        q.set(p.value().to_owned()).unwrap();
    }
    m.set_adapter("f").unwrap();
    assert_eq!(comp(&m, "f").temperature(), Some(50.0));
    assert_eq!(comp(&m, "g").temperature(), Some(1.0));
    assert!(max_abs_diff(&only(&mut m, "f"), &only(&mut m, "g")) > 1e-4, "T = 50 flattens the softmax");
    m.set_adapter("f").unwrap();
    m.after_step(0).unwrap();
    assert!((comp(&m, "f").temperature().unwrap() - 49.95).abs() < 1e-9);
    for s in 1..2000 {
        m.after_step(s).unwrap();
    }
    assert_eq!(comp(&m, "f").temperature(), Some(1.0));
    assert!(max_abs_diff(&only(&mut m, "f"), &only(&mut m, "g")) < 1e-6, "both at T = 1 now");
}

#[test]
fn omega_and_score_dropout_act_in_training_only() {
    let mut m = with_sources();
    for (name, cfg) in [("s", CompositionConfig::scalearn(&["a", "b"])), ("f", CompositionConfig::fuse(&["a", "b"]))] {
        m.add_adapter(name, cfg).unwrap();
        for (i, p) in m.adapter_params(name).unwrap().iter().enumerate() {
            perturb(p, 90 + i as u64, 0.5);
        }
        let ev = only(&mut m, name);
        assert_eq!(ev, out(&m), "{name}: evaluation is deterministic");
        let tr = m.forward(&batch(), &Ctx::train(3)).unwrap().to_vec();
        assert!(max_abs_diff(&ev, &tr) > 1e-4, "{name}");
    }
}

#[test]
fn save_then_load_sources_and_block_reproduces_the_outputs_byte_for_byte() {
    let names = ["avg", "f", "s", "spp"];
    let cfgs = [
        CompositionConfig::average(&["a", "b"], Some(vec![0.3, 0.7])),
        CompositionConfig::fuse(&["a", "b"]),
        CompositionConfig::scalearn(&["b", "a"]),
        CompositionConfig::scalearn_uniform_pp(&["a", "b"]),
    ];
    for (name, cfg) in names.into_iter().zip(cfgs) {
        let mut m = with_sources();
        m.add_adapter(name, cfg).unwrap();
        for (i, p) in m.adapter_params(name).unwrap().iter().enumerate() {
            perturb(p, 70 + i as u64, 0.5);
        }
        let y = only(&mut m, name);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        m.save_pretrained(&a).unwrap();
        let mut back = PeftModel::wrap(tiny(0), 0);
        // The block before its sources: a typed error, nothing attached.
        let e = back.load_adapter(&a.join(name), name, &crate::registry()).unwrap_err();
        assert!(e.to_string().contains("source adapters"), "{name}: {e}");
        assert!(back.adapter_names().is_empty());
        for n in ["a", "b", "c", name] {
            let report = back.load_adapter(&a.join(n), n, &crate::registry()).unwrap();
            assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{name}/{n}: {report:?}");
        }
        assert_eq!(only(&mut back, name), y, "{name}");
        back.save_pretrained(&b).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            assert_eq!(std::fs::read(a.join(name).join(f)).unwrap(), std::fs::read(b.join(name).join(f)).unwrap());
        }
    }
}

#[test]
fn bad_compositions_are_typed_errors_and_leave_nothing_attached() {
    let mut m = with_sources();
    let bad: Vec<(CompositionConfig, &str)> = vec![
        (CompositionConfig::fuse(&[]), "sources"),
        (CompositionConfig::fuse(&["a", "a"]), "sources"),
        (CompositionConfig::average(&["a", "b"], Some(vec![1.0])), "weights"),
        (CompositionConfig::average(&["a", "b"], Some(vec![1.0, -1.0])), "weights"),
        (CompositionConfig { dropout_prob: 1.0, ..CompositionConfig::fuse(&["a"]) }, "dropout_prob"),
        (CompositionConfig { omega_dropout: -0.1, ..CompositionConfig::scalearn(&["a"]) }, "omega_dropout"),
        (CompositionConfig { regularization: true, ..CompositionConfig::fuse_static(&["a"]) }, "regularization"),
    ];
    for (cfg, field) in bad {
        match cfg.validate() {
            Err(AdaptersError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    // Unknown source; a source on other sites (Houlsby `c` adapts attention sites too); itself as a source.
    for (cfg, needle) in [
        (CompositionConfig::fuse(&["a", "zzz"]), "source adapters"),
        (CompositionConfig::fuse(&["a", "c"]), "must adapt the same sites"),
        (CompositionConfig::fuse(&["a", "x"]), "its own sources"),
    ] {
        let e = m.add_adapter("x", cfg).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    assert_eq!(m.adapter_names(), ["a", "b", "c"]);
    let site =
        peft_core::nn::residual_sites(m.model()).into_iter().find(|s| s.path() == "encoder.layer.0.output").unwrap();
    assert_eq!(site.adapters().len(), 3, "no block stayed attached: only a, b, c");
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(12))]
    /// f64 gradients of the fusion map w.r.t. the sub-layer output, query input, source outputs and all five
    /// tensors, random small shapes and temperatures, both residual placements.
    #[test]
    fn fusion_map_gradients_are_exact_in_f64(
        (rows, n, d, seed) in (1usize..4, 1usize..4, 1usize..4, 0u64..1000),
        t in 0.5f64..3.0,
        rb in any::<bool>(),
    ) {
        let r = |s: u64, shape: &[usize]| -> ArrayD<f64> {
            RandomInit::new(seed + s, 0.7).get("t", shape).unwrap().mapv(f64::from)
        };
        let inputs = [
            r(1, &[rows, d]), r(2, &[rows, d]), r(3, &[rows, n, d]),
            r(4, &[d, d]), r(5, &[d]), r(6, &[d, d]), r(7, &[d]), r(8, &[d, d]),
        ];
        assert_grads(
            |x| fuse_map(&x[0], &x[1], &x[2], Some((&x[3], &x[4])), Some((&x[5], &x[6])), Some(&x[7]), t, rb),
            &inputs,
        );
    }

    /// f64 gradients of `Σ ω_i ⊙ u_i` for vector and scalar `ω`.
    #[test]
    fn scale_map_gradients_are_exact_in_f64(
        (b, t, n, d, seed) in (1usize..3, 1usize..3, 1usize..4, 1usize..4, 0u64..1000),
        scalar in any::<bool>(),
    ) {
        let r = |s: u64, shape: &[usize]| -> ArrayD<f64> {
            RandomInit::new(seed + s, 0.7).get("t", shape).unwrap().mapv(f64::from)
        };
        let inputs = [r(1, &[b, t, n, d]), r(2, &[n, if scalar { 1 } else { d }])];
        assert_grads(|x| scale_map(&x[0], &x[1]), &inputs);
    }
}

fn rows(v: &[f32], from: usize, n: usize) -> &[f32] {
    let per = 4 * D;
    &v[from * per..(from + n) * per]
}

#[test]
fn batch_split_sends_each_row_block_through_its_own_source() {
    let mut m = with_sources();
    let (ya, yb) = (only(&mut m, "a"), only(&mut m, "b"));
    m.add_adapter("split", CompositionConfig::batch_split(&["a", "b"], vec![1, 1])).unwrap();
    m.set_adapter("split").unwrap();
    assert_eq!(m.param_counts().0, 0, "a split block trains nothing itself");
    let y = out(&m);
    assert!(max_abs_diff(rows(&y, 0, 1), rows(&ya, 0, 1)) < 1e-6);
    assert!(max_abs_diff(rows(&y, 1, 1), rows(&yb, 1, 1)) < 1e-6);
    // Sizes that do not add up to the batch: a typed error, not a panic.
    m.add_adapter("bad", CompositionConfig::batch_split(&["a", "b"], vec![2, 1])).unwrap();
    m.set_adapter("bad").unwrap();
    let e = m.forward(&batch(), &Ctx::eval()).unwrap_err();
    assert!(matches!(e, peft_core::Error::Count { expected: 3, got: 2, .. }), "{e}");
}

#[test]
fn parallel_over_a_repeated_batch_gives_each_source_its_copy() {
    let mut m = with_sources();
    let (ya, yb) = (only(&mut m, "a"), only(&mut m, "b"));
    m.add_adapter("par", CompositionConfig::parallel(&["a", "b"])).unwrap();
    m.set_adapter("par").unwrap();
    let b = batch();
    let twice = peft_models::tokenizer::Batch {
        input_ids: [b.input_ids.clone(), b.input_ids.clone()].concat(),
        token_type_ids: [b.token_type_ids.clone(), b.token_type_ids.clone()].concat(),
        attention_mask: [b.attention_mask.clone(), b.attention_mask.clone()].concat(),
        shape: [4, 4],
    };
    let y = m.forward(&twice, &Ctx::eval()).unwrap().to_vec();
    assert!(max_abs_diff(rows(&y, 0, 2), &ya) < 1e-6);
    assert!(max_abs_diff(rows(&y, 2, 2), &yb) < 1e-6);
    // A one-row batch over two sources: not a multiple.
    m.add_adapter("par2", CompositionConfig::parallel(&["b", "a"])).unwrap();
    m.set_adapter("par2").unwrap();
    let odd = peft_models::tokenizer::Batch {
        input_ids: b.input_ids[..4].to_vec(),
        token_type_ids: vec![0; 4],
        attention_mask: vec![1; 4],
        shape: [1, 4],
    };
    assert!(matches!(m.forward(&odd, &Ctx::eval()), Err(peft_core::Error::Arg { .. })));
}

#[test]
fn split_configs_are_checked_and_round_trip() {
    let bad = [
        CompositionConfig { batch_sizes: None, ..CompositionConfig::batch_split(&["a", "b"], vec![1, 1]) },
        CompositionConfig::batch_split(&["a", "b"], vec![1]),
        CompositionConfig::batch_split(&["a", "b"], vec![1, 0]),
        CompositionConfig { batch_sizes: Some(vec![1, 1]), ..CompositionConfig::fuse(&["a", "b"]) },
    ];
    for c in bad {
        assert!(matches!(c.validate(), Err(AdaptersError::InvalidConfig { field: "batch_sizes", .. })), "{c:?}");
    }
    let c = CompositionConfig::batch_split(&["a", "b"], vec![3, 5]);
    let (back, ignored) = CompositionConfig::from_json(&c.to_json().unwrap()).unwrap();
    assert_eq!((back, ignored.len()), (c, 0));
}
