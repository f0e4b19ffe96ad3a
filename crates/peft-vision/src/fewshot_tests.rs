use ndarray::{arr2, Array2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::*;

/// `n` points per class around `classes` random centres in `d` dimensions (noise `sd`), labels in class order.
fn gaussians(n: usize, classes: usize, d: usize, sd: f32, seed: u64, centres_seed: u64) -> (FeatureSet, Array2<f32>) {
    let mut cr = StdRng::seed_from_u64(centres_seed);
    let centres = Array2::from_shape_fn((classes, d), |_| cr.gen_range(-1.0f32..1.0));
    let mut rng = StdRng::seed_from_u64(seed);
    let noise = Normal::new(0.0f32, sd).unwrap();
    let mut f = Array2::zeros((n * classes, d));
    let mut labels = Vec::new();
    for k in 0..classes {
        for i in 0..n {
            for j in 0..d {
                f[[k * n + i, j]] = centres[[k, j]] + noise.sample(&mut rng);
            }
            labels.push(k);
        }
    }
    (FeatureSet::new(f, labels).unwrap(), centres)
}

fn normed(n: usize, seed: u64) -> FeatureSet {
    gaussians(n, 3, 6, 0.4, seed, 99).0.l2_normalized()
}

#[test]
fn tip_affinity_is_bounded_and_one_on_a_key() {
    let s = normed(4, 0);
    let tip = TipAdapter { beta: 3.0, ..TipAdapter::new(&s, 3) };
    let aff = cache_affinity(&s.features.dot(&tip.keys.t()), tip.beta);
    let lo = (-2.0f32 * 3.0).exp();
    assert!(aff.iter().all(|&a| a >= lo - 1e-6 && a <= 1.0 + 1e-6));
    for i in 0..s.len() {
        assert!((aff[[i, i]] - 1.0).abs() < 1e-5, "a query equal to key {i}");
    }
}

#[test]
fn tip_with_zero_alpha_is_zero_shot_and_tipx_with_zero_gamma_is_tip() {
    let (s, q) = (normed(4, 0), normed(5, 1));
    let prior = PrototypePrior::new(&s, 3).unwrap();
    let mut tip = TipAdapter::new(&s, 3);
    tip.alpha = 0.0;
    assert_eq!(tip.logits(&q.features, &prior).unwrap(), prior.zero_shot(&q.features, 3).unwrap());
    let mut x = TipX::new(&s, 3);
    (x.tip.alpha, x.tip.beta) = (2.0, 5.0);
    let t = TipAdapter { alpha: 2.0, beta: 5.0, ..TipAdapter::new(&s, 3) };
    assert_eq!(x.logits(&q.features, &prior).unwrap(), t.logits(&q.features, &prior).unwrap());
    x.gamma = 1.0;
    assert_ne!(x.logits(&q.features, &prior).unwrap(), t.logits(&q.features, &prior).unwrap());
    // Without a zero-shot branch there are no class distributions, so no KL term.
    assert_eq!(x.kl_logits(&q.features, &NoTextPrior).unwrap(), Array2::<f32>::zeros((15, 3)));
}

#[test]
fn kl_rows_are_non_negative_and_zero_on_the_support_diagonal() {
    let s = normed(4, 0);
    let prior = PrototypePrior::new(&s, 3).unwrap();
    let w = prior.class_weights().unwrap();
    let p = class_distributions(&s.features, w, 0.5);
    for r in p.rows() {
        assert!((r.sum() - 1.0).abs() < 1e-5);
    }
    let kl = kl_matrix(&p, &p);
    assert!(kl.iter().all(|&v| v >= -1e-6), "{kl}");
    for i in 0..s.len() {
        assert!(kl[[i, i]].abs() < 1e-6);
    }
    let r = rescale(&arr2(&[[1.0, 3.0], [2.0, 5.0]]), -1.0, 1.0);
    assert_eq!(r, arr2(&[[-1.0, 0.0], [-0.5, 1.0]]));
}

#[test]
fn gda_with_identity_precision_is_nearest_class_mean() {
    let (s, _) = gaussians(10, 4, 5, 0.5, 0, 3);
    let (q, _) = gaussians(20, 4, 5, 0.5, 1, 3);
    let mu = class_means(&s, 4).unwrap();
    let g = Gda::from_precision(&mu, &Array2::eye(5), 4);
    let got = argmax_rows(&g.discriminant(&q.features).unwrap());
    let want: Vec<usize> = q
        .features
        .rows()
        .into_iter()
        .map(|f| {
            (0..4)
                .map(|k| (k, mu.row(k).iter().zip(f.iter()).map(|(m, x)| (m - x).powi(2)).sum::<f32>()))
                .fold((0, f32::INFINITY), |b, (k, d)| if d < b.1 { (k, d) } else { b })
                .0
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn gda_reaches_the_bayes_rule_on_isotropic_gaussians() {
    // Equal priors and a shared isotropic covariance: the Bayes rule is the nearest true centre.
    let (s, centres) = gaussians(200, 3, 4, 0.6, 0, 7);
    let (q, _) = gaussians(300, 3, 4, 0.6, 1, 7);
    let g = Gda::fit(&s, 3).unwrap();
    let bayes = argmax_rows(&Gda::from_precision(&centres, &Array2::eye(4), 3).discriminant(&q.features).unwrap());
    let ours = argmax_rows(&g.discriminant(&q.features).unwrap());
    let agree = accuracy(&ours, &bayes);
    let (acc, bayes_acc) = (accuracy(&ours, &q.labels), accuracy(&bayes, &q.labels));
    assert!(agree > 0.97, "agreement {agree}");
    assert!((acc - bayes_acc).abs() < 0.02, "GDA {acc} vs Bayes {bayes_acc}");
}

#[test]
fn gda_alpha_zero_is_zero_shot_and_pinv_inverts() {
    let (s, q) = (normed(6, 0), normed(5, 1));
    let prior = PrototypePrior::new(&s, 3).unwrap();
    let mut g = Gda::fit(&s, 3).unwrap();
    g.alpha = 0.0;
    assert_eq!(g.logits(&q.features, &prior).unwrap(), prior.zero_shot(&q.features, 3).unwrap());
    let a = arr2(&[[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]]);
    let i = pinv_sym(&a).unwrap().dot(&a);
    for r in 0..3 {
        for c in 0..3 {
            assert!((i[[r, c]] - if r == c { 1.0 } else { 0.0 }).abs() < 1e-10);
        }
    }
    assert!(matches!(Gda::fit(&s.select(&[0]), 3), Err(VisionError::FewShot { .. })));
}

#[test]
fn prototype_prior_zero_shot_is_nearest_normalised_mean() {
    let (s, q) = (normed(6, 0), normed(5, 1));
    let prior = PrototypePrior::new(&s, 3).unwrap();
    let mu = class_means(&s, 3).unwrap();
    let zs = prior.zero_shot(&q.features, 3).unwrap();
    for (row, f) in zs.rows().into_iter().zip(q.features.rows()) {
        for k in 0..3 {
            let m = mu.row(k);
            let cos = m.dot(&f) / m.dot(&m).sqrt();
            assert!((row[k] - 100.0 * cos).abs() < 1e-3);
        }
    }
    let bad = ClassEmbeddings::new(Array2::ones((6, 2)));
    assert!(matches!(bad.zero_shot(&q.features, 3), Err(VisionError::Mismatch { .. })));
}

#[test]
fn searches_never_lose_to_the_initial_settings_on_validation() {
    let (s, v) = (normed(4, 0), normed(10, 2));
    let prior = PrototypePrior::new(&s, 3).unwrap();
    let mut tip = TipAdapter::new(&s, 3);
    let before = tip.accuracy(&v, &prior).unwrap();
    let best = tip.search(&v, &prior, 7.0, 3.0).unwrap();
    assert!(best >= before && (tip.accuracy(&v, &prior).unwrap() - best).abs() < 1e-12);
    let mut x = TipX::new(&s, 3);
    let b = x.search(&v, &prior).unwrap();
    assert!((x.accuracy(&v, &prior).unwrap() - b).abs() < 1e-12);
    let mut g = Gda::fit(&s, 3).unwrap();
    let b = g.search(&v, &prior).unwrap();
    assert!(GDA_ALPHAS.contains(&g.alpha) && (g.accuracy(&v, &prior).unwrap() - b).abs() < 1e-12);
}

#[test]
fn tip_adapter_f_trains_the_keys_and_lowers_the_loss() {
    let (s, _) = gaussians(8, 3, 6, 0.8, 0, 99);
    let s = s.l2_normalized();
    let mut tip = TipAdapter { alpha: 3.0, beta: 5.0, ..TipAdapter::new(&s, 3) };
    let keys0 = tip.keys.clone();
    let ce = |t: &TipAdapter| {
        let l = t.logits(&s.features, &NoTextPrior).unwrap();
        let lt = Tensor::new(l.into_dyn());
        let y: Vec<i64> = s.labels.iter().map(|&y| y as i64).collect();
        f64::from(lt.cross_entropy(&y, None, 0.0).unwrap().item().unwrap())
    };
    let before = ce(&tip);
    tip.fine_tune(&s, &NoTextPrior, 20, 8, 1e-2, 0).unwrap();
    assert_ne!(tip.keys, keys0);
    assert!(ce(&tip) < before, "{} -> {}", before, ce(&tip));
    assert!(matches!(tip.fine_tune(&s, &NoTextPrior, 0, 8, 1e-2, 0), Err(VisionError::Config { .. })));
}
