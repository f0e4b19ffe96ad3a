use std::sync::Arc;

use peft_core::nn::{Linear, RandomInit, WeightSource};
use peft_core::testing::max_abs_diff;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

fn spec(r: usize, init: Init, dora: bool) -> LoraSpec {
    LoraSpec { r, alpha: 16.0, use_rslora: false, dropout: 0.0, init, use_dora: dora, lora_bias: false }
}

fn site(in_f: usize, out_f: usize) -> Linear {
    Linear::load("l", in_f, out_f, true, &RandomInit::new(1, 0.5)).unwrap()
}

fn x(rows: usize, in_f: usize) -> Tensor {
    Tensor::new(RandomInit::new(7, 1.0).get("x", &[rows, in_f]).unwrap())
}

fn attach(lin: &Linear, name: &str, sp: LoraSpec, seed: u64) -> Arc<LoraLinear> {
    let ad =
        Arc::new(LoraLinear::new(lin.path(), name, lin.base().as_ref(), sp, &mut StdRng::seed_from_u64(seed)).unwrap());
    lin.attach(ad.clone()).unwrap();
    ad
}

/// Gives B random values so the adapter is not an identity.
fn perturb(ad: &LoraLinear, seed: u64) {
    let b = RandomInit::new(seed, 0.3).get("b", &ad.lora_b().shape()).unwrap();
    ad.lora_b().set(b).unwrap();
    if let Some(m) = ad.magnitude() {
        m.update(|v| v.mapv_inplace(|x| x * 1.1));
    }
}

fn y(lin: &Linear, xs: &Tensor) -> Vec<f32> {
    lin.forward(xs, &Ctx::eval()).unwrap().to_vec()
}

#[test]
fn lora_and_dora_are_identity_at_init() {
    for dora in [false, true] {
        let lin = site(6, 5);
        let xs = x(3, 6);
        let y0 = y(&lin, &xs);
        let ad = attach(&lin, "default", spec(2, Init::Default, dora), 0);
        assert!(max_abs_diff(&y0, &y(&lin, &xs)) < 1e-5, "dora={dora}");
        // A is Kaiming-uniform(a=√5): |A| ≤ 1/√in.
        let bound = 1.0 / 6f32.sqrt();
        assert!(ad.lora_a().value().iter().all(|v| v.abs() <= bound));
        assert!(ad.lora_a().value().iter().any(|v| v.abs() > 0.1 * bound));
        assert!(ad.lora_b().value().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn pissa_and_olora_keep_the_model_output_at_init_and_rewrite_the_base() {
    for init in [Init::Pissa { niter: None }, Init::Olora] {
        let lin = site(6, 5);
        let xs = x(3, 6);
        let w0 = lin.base().dense_weight().unwrap();
        let y0 = y(&lin, &xs);
        let ad = attach(&lin, "p", spec(3, init, false), 0);
        assert!(max_abs_diff(&y0, &y(&lin, &xs)) < 1e-5, "{init:?}");
        let w1 = lin.base().dense_weight().unwrap();
        assert!(max_abs_diff(w0.as_slice().unwrap(), w1.as_slice().unwrap()) > 1e-2);
        // W_res + s·B·A == W.
        let back = &w1 + &ad.lora_weight().unwrap().into_dyn();
        assert!(max_abs_diff(w0.as_slice().unwrap(), back.as_slice().unwrap()) < 1e-5);
    }
}

#[test]
fn pissa_takes_the_principal_singular_directions() {
    let lin = site(6, 5);
    let w = lin.base().dense_weight().unwrap().mapv(f64::from);
    let (_, sv, _) = peft_core::linalg::svd(&w).unwrap();
    let ad = attach(&lin, "p", spec(2, Init::Pissa { niter: None }, false), 0);
    let (_, s_res, _) = peft_core::linalg::svd(&lin.base().dense_weight().unwrap().mapv(f64::from)).unwrap();
    // The residual keeps the minor singular values only.
    assert!((s_res[0] - sv[2]).abs() < 1e-4, "{s_res} vs {sv}");
    // A = √(S_r/s)·Vt_r: the squared row norms of A are S_r / s.
    let a = ad.lora_a().value();
    let n0: f64 = (0..6).map(|j| f64::from(a[[0, j]]).powi(2)).sum();
    assert!((n0 - sv[0] / ad.scaling()).abs() < 1e-4);
}

#[test]
fn merge_equals_unmerged_forward_and_unmerge_restores_the_weight() {
    for dora in [false, true] {
        let lin = site(7, 4);
        let ad = attach(&lin, "a", spec(3, Init::Default, dora), 2);
        perturb(&ad, 9);
        let xs = x(5, 7);
        let w0 = lin.base().dense_weight().unwrap();
        let y0 = y(&lin, &xs);
        lin.merge("a").unwrap();
        assert!(max_abs_diff(&y0, &y(&lin, &xs)) < 1e-5, "dora={dora}");
        lin.unmerge("a").unwrap();
        let w2 = lin.base().dense_weight().unwrap();
        assert!(max_abs_diff(w0.as_slice().unwrap(), w2.as_slice().unwrap()) < 1e-5, "dora={dora}");
        assert!(max_abs_diff(&y0, &y(&lin, &xs)) < 1e-5);
    }
}

#[test]
fn dora_merged_weight_has_the_magnitude_as_row_norms() {
    let lin = site(7, 4);
    let ad = attach(&lin, "a", spec(3, Init::Default, true), 2);
    perturb(&ad, 9);
    lin.merge("a").unwrap();
    let w = lin.base().dense_weight().unwrap().into_dimensionality::<Ix2>().unwrap();
    let norms = row_norms(&w);
    let m = ad.magnitude().unwrap().value();
    for i in 0..4 {
        assert!((norms[i] - m[[i]]).abs() < 1e-5);
    }
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    let lin = site(4, 4);
    let sp = LoraSpec { use_rslora: true, ..spec(4, Init::Default, false) };
    let ad = attach(&lin, "a", sp, 0);
    assert_eq!(ad.scaling(), 8.0);
    perturb(&ad, 3);
    let b = ad.lora_b().value().into_dimensionality::<Ix2>().unwrap().to_owned();
    let a = ad.lora_a().value().into_dimensionality::<Ix2>().unwrap().to_owned();
    let want = b.dot(&a).mapv(|v| v * 8.0);
    assert!(max_abs_diff(want.as_slice().unwrap(), ad.lora_weight().unwrap().as_slice().unwrap()) < 1e-6);
    assert_eq!(spec(4, Init::Default, false).scaling(), 4.0);
}

#[test]
fn gaussian_init_has_std_one_over_r() {
    let lin = site(400, 4);
    let ad = attach(&lin, "g", spec(4, Init::Gaussian, false), 0);
    let a = ad.lora_a().value();
    let var = a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / a.len() as f64;
    assert!((var.sqrt() - 0.25).abs() < 0.02, "{}", var.sqrt());
}

#[test]
fn mixed_batch_rows_equal_single_adapter_runs() {
    let lin = site(5, 3);
    let a1 = attach(&lin, "one", spec(2, Init::Default, false), 1);
    let a2 = attach(&lin, "two", spec(2, Init::Default, true), 2);
    perturb(&a1, 4);
    perturb(&a2, 5);
    let xs = x(3, 5);
    lin.set_active(&["one"]);
    let y1 = y(&lin, &xs);
    lin.set_active(&["two"]);
    let y2 = y(&lin, &xs);
    lin.set_active(&[]);
    let yb = y(&lin, &xs);
    let ctx = Ctx::eval().with_adapter_names(vec!["two".into(), "__base__".into(), "one".into()]);
    let ym = lin.forward(&xs, &ctx).unwrap().to_vec();
    assert!(max_abs_diff(&ym[0..3], &y2[0..3]) < 1e-6);
    assert!(max_abs_diff(&ym[3..6], &yb[3..6]) < 1e-6);
    assert!(max_abs_diff(&ym[6..9], &y1[6..9]) < 1e-6);
}

#[test]
fn dropout_applies_in_training_only() {
    let lin = site(8, 3);
    let ad = attach(&lin, "d", LoraSpec { dropout: 0.5, ..spec(2, Init::Default, false) }, 1);
    perturb(&ad, 2);
    let xs = x(4, 8);
    let e1 = y(&lin, &xs);
    assert_eq!(e1, y(&lin, &xs));
    let t = lin.forward(&xs, &Ctx::train(3)).unwrap().to_vec();
    assert!(max_abs_diff(&e1, &t) > 1e-4);
}

/// Loss `Σ y ⊙ R` for a fixed random R.
fn loss(lin: &Linear, xs: &Tensor, r: &Tensor) -> Tensor {
    lin.forward(xs, &Ctx::eval()).unwrap().mul(r).unwrap().sum_all()
}

/// Central finite differences of `loss` w.r.t. every entry of `p`, in f64 accumulation over f32 forwards.
fn fd(lin: &Linear, xs: &Tensor, r: &Tensor, p: &Param) -> Vec<f64> {
    let eps = 1e-2f32;
    let n = p.numel();
    (0..n)
        .map(|i| {
            let v0 = p.value().to_owned();
            let mut vp = v0.clone();
            vp.as_slice_mut().unwrap()[i] += eps;
            p.set(vp).unwrap();
            let lp: f64 = loss(lin, xs, r).to_vec().iter().map(|&v| f64::from(v)).sum();
            let mut vm = v0.clone();
            vm.as_slice_mut().unwrap()[i] -= eps;
            p.set(vm).unwrap();
            let lm: f64 = loss(lin, xs, r).to_vec().iter().map(|&v| f64::from(v)).sum();
            p.set(v0).unwrap();
            (lp - lm) / (2.0 * f64::from(eps))
        })
        .collect()
}

fn assert_close(analytic: &[f32], numeric: &[f64], what: &str) {
    let scale = numeric.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (a, n) in analytic.iter().zip(numeric) {
        assert!((f64::from(*a) - n).abs() <= 2e-3 * scale, "{what}: analytic {a} vs numeric {n}");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    // The loss is bilinear in (A, B), so central differences are exact up to f32 rounding.
    for rs in [false, true] {
        let lin = site(5, 4);
        let ad = attach(&lin, "a", LoraSpec { use_rslora: rs, ..spec(3, Init::Default, false) }, 1);
        perturb(&ad, 2);
        let xs = x(3, 5);
        let r = Tensor::new(RandomInit::new(11, 1.0).get("r", &[3, 4]).unwrap());
        let g = loss(&lin, &xs, &r).backward().unwrap();
        for p in [ad.lora_a(), ad.lora_b()] {
            let an = g.get_id(p.id()).unwrap().as_slice().unwrap().to_vec();
            assert_close(&an, &fd(&lin, &xs, &r, p), p.name());
        }
    }
}

#[test]
fn dora_magnitude_gradient_matches_finite_differences() {
    // The detached norm does not depend on m, so dL/dm is the true derivative.
    let lin = site(5, 4);
    let ad = attach(&lin, "a", spec(2, Init::Default, true), 1);
    perturb(&ad, 2);
    let xs = x(3, 5);
    let r = Tensor::new(RandomInit::new(11, 1.0).get("r", &[3, 4]).unwrap());
    let g = loss(&lin, &xs, &r).backward().unwrap();
    let m = ad.magnitude().unwrap();
    let an = g.get_id(m.id()).unwrap().as_slice().unwrap().to_vec();
    assert_close(&an, &fd(&lin, &xs, &r, m), "m");
}

#[test]
fn dora_lora_gradients_treat_the_norm_as_constant() {
    // With ‖V‖ frozen at its current value, y = f ⊙ (W x + s·B·A·x) + b is bilinear in (A, B): compare with the
    // closed form dL/dB = s · (f ⊙ R)ᵀ · (x Aᵀ), dL/dA = s · ((f ⊙ R) B)ᵀ · x, computed in f64.
    let lin = site(5, 4);
    let ad = attach(&lin, "a", spec(2, Init::Default, true), 1);
    perturb(&ad, 2);
    let xs = x(3, 5);
    let r = Tensor::new(RandomInit::new(11, 1.0).get("r", &[3, 4]).unwrap());
    let g = loss(&lin, &xs, &r).backward().unwrap();
    let to2 = |a: &ArrayD<f32>| a.mapv(f64::from).into_dimensionality::<Ix2>().unwrap();
    let w = to2(&lin.base().dense_weight().unwrap());
    let (a, b) = (to2(&ad.lora_a().value().to_owned()), to2(&ad.lora_b().value().to_owned()));
    let s = ad.scaling();
    let v = &w + &(b.dot(&a) * s);
    let m = ad.magnitude().unwrap().value().mapv(f64::from);
    let f: Vec<f64> = (0..4).map(|i| m[[i]] / v.row(i).dot(&v.row(i)).sqrt()).collect();
    let fr = Array2::from_shape_fn((3, 4), |(n, o)| f64::from(r.as_slice()[n * 4 + o]) * f[o]);
    let xx = to2(&xs.data().to_owned());
    let gb = fr.t().dot(&xx.dot(&a.t())) * s;
    let ga = fr.dot(&b).t().dot(&xx) * s;
    let cmp = |an: &ArrayD<f32>, want: &Array2<f64>, what: &str| {
        for (p, q) in an.iter().zip(want.iter()) {
            assert!((f64::from(*p) - q).abs() < 1e-4 * (1.0 + q.abs()), "{what}: {p} vs {q}");
        }
    };
    cmp(g.get_id(ad.lora_b().id()).unwrap(), &gb, "B");
    cmp(g.get_id(ad.lora_a().id()).unwrap(), &ga, "A");
}

#[test]
fn mutated_init_converts_to_plain_lora_on_the_original_weight() {
    let lin = site(6, 5);
    let w0 = lin.base().dense_weight().unwrap();
    let ad = attach(&lin, "p", spec(2, Init::Pissa { niter: None }, false), 0);
    perturb(&ad, 5); // "training"
    let wres = lin.base().dense_weight().unwrap();
    let (a0, b0) = ad.initial().unwrap().clone();
    let (a2, b2) =
        convert_mutated_to_lora(&ad.lora_a().value().to_owned(), &ad.lora_b().value().to_owned(), &a0, &b0).unwrap();
    assert_eq!(a2.shape(), &[4, 6]);
    assert_eq!(b2.shape(), &[5, 4]);
    // Doubling r and alpha keeps s; W0 + s·B'A' == W_res + s·B·A.
    let s = ad.scaling() as f32;
    let d2 = to2f(&b2).dot(&to2f(&a2)).mapv(|v| v * s).into_dyn();
    let lhs = &w0 + &d2;
    let rhs = &wres + &ad.lora_weight().unwrap().into_dyn();
    assert!(max_abs_diff(lhs.as_slice().unwrap(), rhs.as_slice().unwrap()) < 1e-5);
}

fn to2f(a: &ArrayD<f32>) -> Array2<f32> {
    a.clone().into_dimensionality::<Ix2>().unwrap()
}

#[test]
fn oversized_pissa_rank_is_an_error() {
    let lin = site(3, 2);
    let r = LoraLinear::new("l", "p", lin.base().as_ref(), spec(3, Init::Olora, false), &mut StdRng::seed_from_u64(0));
    let e = r.err().unwrap();
    assert!(
        matches!(crate::LoraError::of(&e), Some(crate::LoraError::Rank { method: "olora", r: 3, max: 2, .. })),
        "{e}"
    );
}

#[test]
fn dora_with_dropout_recomputes_the_base_term_on_the_dropped_input() {
    // PEFT: with active dropout, base_result is W·dropout(x) (no bias) and the DoRA term is
    // (f − 1)·W·x' + f·s·B·A·x', added to the undropped base output W·x + b.
    let lin = site(6, 4);
    let ad = attach(&lin, "d", LoraSpec { dropout: 0.3, ..spec(2, Init::Default, true) }, 1);
    perturb(&ad, 2);
    let xs = x(5, 6);
    let y = lin.forward(&xs, &Ctx::train(9)).unwrap();
    let xd = Ctx::train(9).with_rng(|r| xs.dropout(0.3, true, r)).unwrap();
    let to2 = |a: &ArrayD<f32>| a.mapv(f64::from).into_dimensionality::<Ix2>().unwrap();
    let w = to2(&lin.base().dense_weight().unwrap());
    let bias = lin.base().bias().unwrap().value().mapv(f64::from);
    let (x0, x1) = (to2(&xs.data().to_owned()), to2(&xd.data().to_owned()));
    let lw = ad.lora_weight().unwrap().mapv(f64::from);
    let v = &w + &lw;
    let m = ad.magnitude().unwrap().value().mapv(f64::from);
    let base = x0.dot(&w.t());
    let wxd = x1.dot(&w.t());
    let lora = x1.dot(&lw.t());
    for n in 0..5 {
        for o in 0..4 {
            let f = m[[o]] / v.row(o).dot(&v.row(o)).sqrt();
            let want = base[[n, o]] + bias[[o]] + (f - 1.0) * wxd[[n, o]] + f * lora[[n, o]];
            let got = f64::from(y.as_slice()[n * 4 + o]);
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}

/// Rounding bound of the unmerged f32 forward, per output element.
///
/// The DoRA forward adds `(f − 1)·W·x` and `f·s·B·A·x` with `f = m / ‖W + s·B·A‖`. When a row of
/// `W + s·B·A` nearly cancels, `f` is large and both terms are large with opposite signs, so their
/// sum carries an absolute error of a few f32 ulps *of the terms*, not of the result (the merged
/// weight `m·v/‖v‖` has no such cancellation). Bound: `8·ε·f·(|W·x| + |s·B·A·x|)`, zero for LoRA.
fn unmerged_rounding_bound(lin: &Linear, ad: &LoraLinear, xs: &Tensor) -> Vec<f32> {
    let Some(m) = ad.magnitude() else { return vec![0.0; xs.shape()[0] * lin.base().out_features()] };
    let to2 = |a: &ArrayD<f32>| a.mapv(f64::from).into_dimensionality::<Ix2>().unwrap();
    let w = to2(&lin.base().dense_weight().unwrap());
    let lw = ad.lora_weight().unwrap().mapv(f64::from);
    let x = to2(&xs.data().to_owned());
    let m = m.value().mapv(f64::from);
    let (wx, lx) = (x.dot(&w.t()), x.dot(&lw.t()));
    let v = &w + &lw;
    let mut out = Vec::new();
    for n in 0..x.nrows() {
        for o in 0..w.nrows() {
            let f = m[[o]] / v.row(o).dot(&v.row(o)).sqrt();
            out.push((8.0 * f64::from(f32::EPSILON) * f * (wx[[n, o]].abs() + lx[[n, o]].abs())) as f32);
        }
    }
    out
}

/// CI's proptest find (in_f=1, out_f=3, r=1, rows=1, seed=845): row 2 of W + s·B·A is −0.20757 +
/// 0.20808 = 5.1e-4, so f ≈ 445 and the unmerged forward sums ±92 to get 0.368. The merged forward
/// agrees with the f64 reference to 1e-6; the unmerged one is off by ≈1.9e-5, inside its bound.
#[test]
fn dora_merge_on_a_nearly_cancelling_row_is_exact_and_the_unmerged_error_is_conditioning() {
    let seed = 845;
    let lin = Linear::load("l", 1, 3, false, &RandomInit::new(seed, 0.5)).unwrap();
    let ad = attach(&lin, "a", spec(1, Init::Default, true), seed);
    perturb(&ad, seed + 1);
    let xs = Tensor::new(RandomInit::new(seed + 2, 1.0).get("x", &[1, 1]).unwrap());
    let to2 = |a: &ArrayD<f32>| a.mapv(f64::from).into_dimensionality::<Ix2>().unwrap();
    let w = to2(&lin.base().dense_weight().unwrap());
    let v = &w + &ad.lora_weight().unwrap().mapv(f64::from);
    let m = ad.magnitude().unwrap().value().mapv(f64::from);
    let x = f64::from(xs.to_vec()[0]);
    let want: Vec<f64> = (0..3).map(|o| m[[o]] * v[[o, 0]] / v[[o, 0]].abs() * x).collect();
    assert!(v[[2, 0]].abs() < 1e-3, "the case must keep its near-cancelling row: {v:?}");
    let y0 = y(&lin, &xs);
    let bound = unmerged_rounding_bound(&lin, &ad, &xs);
    lin.merge("a").unwrap();
    let y1 = y(&lin, &xs);
    for o in 0..3 {
        assert!((f64::from(y1[o]) - want[o]).abs() < 1e-6, "merged {o}: {} vs {}", y1[o], want[o]);
        let err = (f64::from(y0[o]) - want[o]).abs();
        assert!(err < 1e-6 + f64::from(bound[o]), "unmerged {o}: err {err} bound {}", bound[o]);
    }
    assert!(bound[2] > 1e-5 && bound[2] < 1e-3, "bound on the cancelling row: {}", bound[2]);
}

mod prop {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(16))]

        /// Random shapes (size-1 axes included): merge ≡ unmerged forward, unmerge restores W, for LoRA and DoRA.
        #[test]
        fn merge_matches_forward_on_random_shapes(
            in_f in 1usize..7, out_f in 1usize..7, r in 1usize..4, rows in 1usize..4, dora in any::<bool>(),
            seed in 0u64..1000,
        ) {
            let lin = Linear::load("l", in_f, out_f, seed % 2 == 0, &RandomInit::new(seed, 0.5)).unwrap();
            let ad = attach(&lin, "a", spec(r, Init::Default, dora), seed);
            perturb(&ad, seed + 1);
            let xs = Tensor::new(RandomInit::new(seed + 2, 1.0).get("x", &[rows, in_f]).unwrap());
            let w0 = lin.base().dense_weight().unwrap();
            let y0 = y(&lin, &xs);
            let bound = unmerged_rounding_bound(&lin, &ad, &xs);
            lin.merge("a").unwrap();
            let y1 = y(&lin, &xs);
            for (i, (a, b)) in y0.iter().zip(&y1).enumerate() {
                prop_assert!((a - b).abs() < 1e-5 + bound[i], "{a} vs {b} (bound {})", bound[i]);
            }
            lin.unmerge("a").unwrap();
            let w2 = lin.base().dense_weight().unwrap();
            prop_assert!(max_abs_diff(w0.as_slice().unwrap(), w2.as_slice().unwrap()) < 1e-5);
        }

        /// LoRA gradients of A and B match central differences on random shapes.
        #[test]
        fn lora_grads_on_random_shapes(
            in_f in 1usize..6, out_f in 1usize..6, r in 1usize..4, rows in 1usize..4, seed in 0u64..1000,
        ) {
            let lin = Linear::load("l", in_f, out_f, true, &RandomInit::new(seed, 0.5)).unwrap();
            let ad = attach(&lin, "a", spec(r, Init::Default, false), seed);
            perturb(&ad, seed + 1);
            let xs = Tensor::new(RandomInit::new(seed + 2, 1.0).get("x", &[rows, in_f]).unwrap());
            let rr = Tensor::new(RandomInit::new(seed + 3, 1.0).get("r", &[rows, out_f]).unwrap());
            let g = loss(&lin, &xs, &rr).backward().unwrap();
            for p in [ad.lora_a(), ad.lora_b()] {
                let an = g.get_id(p.id()).unwrap().as_slice().unwrap().to_vec();
                assert_close(&an, &fd(&lin, &xs, &rr, p), p.name());
            }
        }
    }
}

/// `lora_bias` (PEFT ≥ 0.14): zero at init with init true (identity kept), `U(±1/√r)` with init false; the bias
/// gradient matches finite differences; merging adds `s·c` to the base bias and unmerging restores it exactly;
/// a base without bias cannot merge it, and DoRA / mutating inits reject it.
#[test]
fn lora_bias_is_identity_at_init_has_exact_gradients_and_merges_into_the_base_bias() {
    let with_bias = |init| LoraSpec { lora_bias: true, ..spec(3, init, false) };
    let lin = site(5, 4);
    let xs = x(3, 5);
    let y0 = y(&lin, &xs);
    let ad = attach(&lin, "a", with_bias(Init::Default), 1);
    let c = ad.lora_b_bias().unwrap();
    assert_eq!(c.name(), "l.lora_B.a.bias");
    assert!(c.value().iter().all(|&v| v == 0.0));
    assert!(max_abs_diff(&y0, &y(&lin, &xs)) < 1e-6);
    assert_eq!(ad.params().len(), 3);
    // Gradients of A, B and the bias against central differences.
    perturb(&ad, 2);
    c.set(RandomInit::new(4, 0.5).get("c", &[4]).unwrap()).unwrap();
    let r = Tensor::new(RandomInit::new(11, 1.0).get("r", &[3, 4]).unwrap());
    let g = loss(&lin, &xs, &r).backward().unwrap();
    for p in [ad.lora_a(), ad.lora_b(), c] {
        let an = g.get_id(p.id()).unwrap().as_slice().unwrap().to_vec();
        assert_close(&an, &fd(&lin, &xs, &r, p), p.name());
    }
    // The bias term is s·c on every row: with B = 0 the output moves by exactly s·c.
    let yb = y(&lin, &xs);
    let b0 = lin.base().bias().unwrap().value().to_owned();
    lin.merge("a").unwrap();
    assert!(max_abs_diff(&yb, &y(&lin, &xs)) < 1e-5);
    let b1 = lin.base().bias().unwrap().value().to_owned();
    let want = &b0 + &c.value().mapv(|v| v * ad.scaling() as f32);
    assert!(max_abs_diff(b1.as_slice().unwrap(), want.as_slice().unwrap()) < 1e-6);
    lin.unmerge("a").unwrap();
    let b2 = lin.base().bias().unwrap().value().to_owned();
    assert!(max_abs_diff(b0.as_slice().unwrap(), b2.as_slice().unwrap()) < 1e-6);
    assert!(max_abs_diff(&yb, &y(&lin, &xs)) < 1e-5);
    // init false: nn.Linear's default bias init.
    let lin2 = site(5, 4);
    let ad2 = attach(&lin2, "r", with_bias(Init::Random), 3);
    let bound = 1.0 / 3f32.sqrt();
    let v = ad2.lora_b_bias().unwrap().value().to_owned();
    assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|&x| x != 0.0));
    // No base bias: forward works, merging is an error that leaves the weight untouched.
    let nb = Linear::load("n", 5, 4, false, &RandomInit::new(1, 0.5)).unwrap();
    let ad3 = attach(&nb, "a", with_bias(Init::Default), 1);
    perturb(&ad3, 5);
    let w0 = nb.base().dense_weight().unwrap();
    assert!(nb.merge("a").is_err());
    assert_eq!(w0, nb.base().dense_weight().unwrap());
    assert!(!nb.is_merged("a").unwrap());
    for bad in [LoraSpec { use_dora: true, ..with_bias(Init::Default) }, with_bias(Init::Olora)] {
        let l = site(5, 4);
        assert!(LoraLinear::new("l", "x", l.base().as_ref(), bad, &mut StdRng::seed_from_u64(0)).is_err());
    }
}
