//! Task-tensor merge primitives (PEFT 0.21's `utils/merge_utils.py`): magnitude pruning, DARE random pruning,
//! TIES sign election and disjoint merge, and the merges built from them. [`crate::weighted`] applies them to
//! LoRA factors (`ties`, `dare_*`, `magnitude_prune`) or to `ΔW` (the `*_svd` variants).
//!
//! All functions work on equally-shaped `f64` arrays ("task tensors", one per adapter) and follow PEFT's order of
//! operations: prune each task tensor, elect the sign on the *unweighted* pruned tensors, then weight, then sum
//! (task arithmetic) or take the disjoint mean (TIES).
//!
//! **One deliberate difference: DARE's rescale.** The DARE paper (Yu et al., 2024, Eq. 2) divides the kept
//! entries by the keep probability so that the merge is unbiased. PEFT 0.21's `random_pruning` computes
//! `torch.div(pruned, density)` and discards the result, so its `dare_linear`/`dare_ties` do not rescale (the
//! merged delta shrinks by `density` in expectation). [`Merge::DareLinear`] and [`Merge::DareTies`] rescale by
//! default (`rescale: true`, the paper); set `rescale: false` (or [`crate::weighted::Combination::peft_dare`]) to
//! reproduce PEFT's output.

use ndarray::{ArrayD, Zip};
use rand::{Rng, RngCore};

/// How TIES elects the sign of each entry (PEFT's `majority_sign_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the values (`"total"`, PEFT's default).
    #[default]
    Total,
    /// The sign of the sum of the signs, i.e. the more frequent sign (`"frequency"`).
    Frequency,
}

impl MajoritySign {
    /// Parses PEFT's name (`"total"`, `"frequency"`).
    ///
    /// # Errors
    /// [`crate::LoraError::Unknown`] for another name.
    pub fn from_peft(name: &str) -> peft_core::Result<Self> {
        match name {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => crate::error::fail!(crate::LoraError::Unknown {
                what: "majority_sign_method",
                value: name.into(),
                expected: "total or frequency",
            }),
        }
    }
}

/// A merge of task tensors (PEFT's `task_arithmetic`, `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`).
///
/// `density` is the fraction of entries kept, in `[0, 1]`; as in PEFT, `density >= 1` prunes nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Merge {
    /// `Σ wᵢ·tᵢ`.
    TaskArithmetic,
    /// Keep the top `⌊density·numel⌋` entries of each `tᵢ` by magnitude, then `Σ wᵢ·tᵢ`.
    MagnitudePrune {
        /// Fraction kept.
        density: f64,
    },
    /// Magnitude-prune, elect a sign per entry, then the mean of the agreeing weighted entries.
    Ties {
        /// Fraction kept.
        density: f64,
        /// Sign election.
        sign: MajoritySign,
    },
    /// DARE: keep each entry with probability `density` (and rescale it by `1/density` when `rescale`), then
    /// `Σ wᵢ·tᵢ`.
    DareLinear {
        /// Keep probability.
        density: f64,
        /// Seed of the masks ([`crate::weighted`] derives one stream per site from it).
        seed: u64,
        /// Divide kept entries by `density` (the paper; `false` reproduces PEFT 0.21, see the module docs).
        rescale: bool,
    },
    /// DARE pruning followed by TIES' sign election and disjoint mean.
    DareTies {
        /// Keep probability.
        density: f64,
        /// Sign election.
        sign: MajoritySign,
        /// Seed of the masks ([`crate::weighted`] derives one stream per site from it).
        seed: u64,
        /// Divide kept entries by `density` (the paper; `false` reproduces PEFT 0.21, see the module docs).
        rescale: bool,
    },
}

impl Merge {
    /// The density, for the pruning merges.
    pub fn density(&self) -> Option<f64> {
        match *self {
            Merge::TaskArithmetic => None,
            Merge::MagnitudePrune { density }
            | Merge::Ties { density, .. }
            | Merge::DareLinear { density, .. }
            | Merge::DareTies { density, .. } => Some(density),
        }
    }

    /// True for the DARE merges (random masks).
    pub fn is_random(&self) -> bool {
        matches!(self, Merge::DareLinear { .. } | Merge::DareTies { .. })
    }

    /// Merges `tensors` (equal shapes) with `weights`; `rng` draws the DARE masks (unused otherwise; the variant's
    /// `seed` is for callers that make the `rng`).
    ///
    /// # Errors
    /// [`peft_core::Error::Empty`] for no tensors, [`peft_core::Error::Count`] for mismatched lengths,
    /// [`peft_core::Error::Shape`] for mismatched shapes, [`crate::LoraError::Field`] for a density outside `[0, ∞)`
    /// or not finite.
    pub fn apply(
        &self,
        tensors: &[ArrayD<f64>],
        weights: &[f64],
        rng: &mut dyn RngCore,
    ) -> peft_core::Result<ArrayD<f64>> {
        const OP: &str = "merge";
        if tensors.is_empty() {
            return Err(peft_core::Error::Empty { op: OP, what: "the task tensor list" });
        }
        if tensors.len() != weights.len() {
            return Err(peft_core::Error::Count {
                op: OP,
                what: "weights per task tensor",
                expected: tensors.len(),
                got: weights.len(),
            });
        }
        if let Some(t) = tensors.iter().find(|t| t.shape() != tensors[0].shape()) {
            return Err(peft_core::Error::Shape { op: OP, lhs: tensors[0].shape().to_vec(), rhs: t.shape().to_vec() });
        }
        if let Some(d) = self.density() {
            if !(d.is_finite() && d >= 0.0) {
                crate::error::fail!(crate::LoraError::Field {
                    method: "merge",
                    field: "density",
                    value: d.to_string(),
                    rule: "must be finite and >= 0",
                });
            }
        }
        let pruned: Vec<ArrayD<f64>> = match *self {
            Merge::TaskArithmetic => tensors.to_vec(),
            Merge::MagnitudePrune { density } | Merge::Ties { density, .. } => {
                tensors.iter().map(|t| magnitude_prune(t, density)).collect()
            }
            Merge::DareLinear { density, rescale, .. } | Merge::DareTies { density, rescale, .. } => {
                tensors.iter().map(|t| random_prune(t, density, rescale, rng)).collect()
            }
        };
        Ok(match *self {
            Merge::Ties { sign, .. } | Merge::DareTies { sign, .. } => {
                let mask = majority_sign_mask(&pruned, sign);
                disjoint_merge(&pruned, weights, &mask)
            }
            _ => weighted_sum(&pruned, weights),
        })
    }
}

/// `Σ wᵢ·tᵢ` (PEFT's `task_arithmetic`).
pub fn weighted_sum(tensors: &[ArrayD<f64>], weights: &[f64]) -> ArrayD<f64> {
    let mut out = ArrayD::zeros(tensors[0].raw_dim());
    for (t, &w) in tensors.iter().zip(weights) {
        out.scaled_add(w, t);
    }
    out
}

/// Keeps the `⌊density·numel⌋` entries of largest magnitude, zeroing the rest (`density >= 1`: unchanged). Ties
/// in magnitude are broken towards the lower flat index (PEFT's `torch.topk` leaves this unspecified).
pub fn magnitude_prune(t: &ArrayD<f64>, density: f64) -> ArrayD<f64> {
    if density >= 1.0 {
        return t.clone();
    }
    let n = t.len();
    let k = (density * n as f64) as usize; // Python's int(density * numel): truncation
    let flat: Vec<f64> = t.iter().copied().collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| flat[j].abs().total_cmp(&flat[i].abs()).then(i.cmp(&j)));
    let mut keep = vec![false; n];
    for &i in &order[..k.min(n)] {
        keep[i] = true;
    }
    let mut out = t.clone();
    for (v, &kp) in out.iter_mut().zip(&keep) {
        if !kp {
            *v = 0.0;
        }
    }
    out
}

/// DARE: keeps each entry with probability `density` (a Bernoulli mask from `rng`), dividing kept entries by
/// `density` when `rescale` (so the expectation is unchanged). `density >= 1`: unchanged; `density = 0` with
/// `rescale` gives zeros (PEFT would produce NaN from 0/0).
pub fn random_prune(t: &ArrayD<f64>, density: f64, rescale: bool, rng: &mut dyn RngCore) -> ArrayD<f64> {
    if density >= 1.0 {
        return t.clone();
    }
    let scale = if rescale && density > 0.0 { 1.0 / density } else { 1.0 };
    t.mapv(|v| if rng.gen::<f64>() < density { v * scale } else { 0.0 })
}

/// Per task tensor, where its sign equals the elected sign (PEFT's `calculate_majority_sign_mask`): the elected
/// sign is `+1` where the sum of values (`Total`) or of signs (`Frequency`) over the tensors is `>= 0`, else `-1`.
/// Zero entries never agree.
pub fn majority_sign_mask(tensors: &[ArrayD<f64>], method: MajoritySign) -> Vec<ArrayD<bool>> {
    let sgn = |v: f64| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let mut mag = ArrayD::<f64>::zeros(tensors[0].raw_dim());
    for t in tensors {
        match method {
            MajoritySign::Total => mag += t,
            MajoritySign::Frequency => Zip::from(&mut mag).and(t).for_each(|m, &v| *m += sgn(v)),
        }
    }
    let elected = mag.mapv(|m| if m >= 0.0 { 1.0 } else { -1.0 });
    tensors.iter().map(|t| Zip::from(t).and(&elected).map_collect(|&v, &e| sgn(v) == e)).collect()
}

/// The disjoint mean: per entry, `Σ wᵢ·tᵢ` over the tensors whose mask is set, divided by their count (at least
/// 1) (PEFT's weighting followed by `disjoint_merge`).
pub fn disjoint_merge(tensors: &[ArrayD<f64>], weights: &[f64], mask: &[ArrayD<bool>]) -> ArrayD<f64> {
    let mut sum = ArrayD::<f64>::zeros(tensors[0].raw_dim());
    let mut count = ArrayD::<f64>::zeros(tensors[0].raw_dim());
    for ((t, &w), m) in tensors.iter().zip(weights).zip(mask) {
        Zip::from(&mut sum).and(&mut count).and(t).and(m).for_each(|s, c, &v, &keep| {
            if keep {
                *s += w * v;
                *c += 1.0;
            }
        });
    }
    Zip::from(&mut sum).and(&count).for_each(|s, &c| *s /= c.max(1.0));
    sum
}

#[cfg(test)]
mod tests {
    use ndarray::{arr1, ArrayD};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn v(x: &[f64]) -> ArrayD<f64> {
        arr1(x).into_dyn()
    }

    #[test]
    fn magnitude_prune_keeps_the_floor_of_density_times_numel_largest() {
        let t = v(&[0.1, -3.0, 2.0, -0.5, 1.0]);
        // int(0.5 * 5) = 2
        assert_eq!(magnitude_prune(&t, 0.5), v(&[0.0, -3.0, 2.0, 0.0, 0.0]));
        assert_eq!(magnitude_prune(&t, 0.0), v(&[0.0; 5]));
        assert_eq!(magnitude_prune(&t, 1.0), t);
        assert_eq!(magnitude_prune(&t, 0.99), v(&[0.0, -3.0, 2.0, -0.5, 1.0]));
    }

    #[test]
    fn ties_elects_signs_on_unweighted_tensors_and_averages_agreeing_entries() {
        let t1 = v(&[1.0, -2.0, 3.0, 0.0]);
        let t2 = v(&[-3.0, -1.0, 1.0, 0.0]);
        let mut rng = StdRng::seed_from_u64(0);
        let total = Merge::Ties { density: 1.0, sign: MajoritySign::Total };
        let got = total.apply(&[t1.clone(), t2.clone()], &[2.0, 0.5], &mut rng).unwrap();
        // entry 0: sum -2 -> sign -, only t2 agrees: 0.5*-3 / 1; entry 1: both agree: (2*-2 + 0.5*-1)/2;
        // entry 2: both +: (6 + 0.5)/2; entry 3: zeros never agree -> 0.
        assert_eq!(got, v(&[-1.5, -2.25, 3.25, 0.0]));
        let freq = Merge::Ties { density: 1.0, sign: MajoritySign::Frequency };
        let got = freq.apply(&[t1, t2], &[2.0, 0.5], &mut rng).unwrap();
        // entry 0: one + one - -> tie elects +: only t1: 2*1.
        assert_eq!(got, v(&[2.0, -2.25, 3.25, 0.0]));
    }

    #[test]
    fn magnitude_prune_merge_is_the_weighted_sum_of_pruned_tensors() {
        let t1 = v(&[1.0, -2.0, 3.0, 0.5]);
        let t2 = v(&[-3.0, -1.0, 1.5, 0.2]);
        let got = Merge::MagnitudePrune { density: 0.5 }
            .apply(&[t1, t2], &[1.0, -1.0], &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert_eq!(got, v(&[3.0, -2.0, 1.5, 0.0]));
    }

    #[test]
    fn dare_keeps_the_density_and_the_expectation() {
        let n = 200_000;
        let t = ArrayD::from_elem(ndarray::IxDyn(&[n]), 2.0);
        let mut rng = StdRng::seed_from_u64(7);
        for density in [0.1, 0.3, 0.9] {
            let p = random_prune(&t, density, true, &mut rng);
            let kept = p.iter().filter(|&&x| x != 0.0).count() as f64 / n as f64;
            // binomial std: sqrt(d(1-d)/n) < 1.2e-3
            assert!((kept - density).abs() < 6e-3, "density {density}: kept {kept}");
            // kept entries are rescaled by 1/density = 1/(1-p_drop)
            assert!(p.iter().all(|&x| x == 0.0 || (x - 2.0 / density).abs() < 1e-12));
            let mean = p.mean().unwrap();
            assert!((mean - 2.0).abs() < 0.05 * 2.0 / density.sqrt(), "density {density}: mean {mean}");
        }
        assert_eq!(random_prune(&t, 1.0, true, &mut rng), t);
    }

    #[test]
    fn dare_masks_are_reproducible_from_the_seed() {
        let t = v(&[1.0; 64]);
        let a = random_prune(&t, 0.5, true, &mut StdRng::seed_from_u64(3));
        let b = random_prune(&t, 0.5, true, &mut StdRng::seed_from_u64(3));
        let c = random_prune(&t, 0.5, true, &mut StdRng::seed_from_u64(4));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        let t = v(&[1.0, 2.0]);
        assert!(Merge::TaskArithmetic.apply(&[], &[], &mut rng).is_err());
        assert!(Merge::TaskArithmetic.apply(std::slice::from_ref(&t), &[1.0, 2.0], &mut rng).is_err());
        assert!(Merge::TaskArithmetic.apply(&[t.clone(), v(&[1.0])], &[1.0, 2.0], &mut rng).is_err());
        assert!(Merge::MagnitudePrune { density: -0.1 }.apply(std::slice::from_ref(&t), &[1.0], &mut rng).is_err());
        assert!(Merge::DareLinear { density: f64::NAN, seed: 0, rescale: true }.apply(&[t], &[1.0], &mut rng).is_err());
        assert!(MajoritySign::from_peft("median").is_err());
        assert_eq!(MajoritySign::from_peft("frequency").unwrap(), MajoritySign::Frequency);
    }

    /// The paper's DARE divides kept entries by the density; PEFT 0.21 (`rescale=False` in effect) does not. Same
    /// seed, same mask: the two differ by exactly the factor `density`, and only the paper's is unbiased.
    #[test]
    fn dare_rescale_is_the_papers_and_peft_compat_drops_it() {
        use rand::SeedableRng;
        let t = ArrayD::from_shape_fn(ndarray::IxDyn(&[40, 30]), |i| (i[0] as f64 - 20.0) * 0.1 + i[1] as f64 * 0.01);
        let density = 0.25;
        let run = |rescale| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            Merge::DareLinear { density, seed: 7, rescale }.apply(std::slice::from_ref(&t), &[1.0], &mut rng).unwrap()
        };
        let (paper, peft) = (run(true), run(false));
        for ((p, q), v) in paper.iter().zip(&peft).zip(&t) {
            assert!(*q == 0.0 || q == v, "PEFT-compatible DARE keeps entries unscaled");
            assert!((p * density - q).abs() <= 1e-12 * v.abs().max(1.0));
        }
        // Unbiased: the paper's sum is near the original sum, PEFT's near density times it.
        let (s, sp) = (t.iter().map(|v| v.abs()).sum::<f64>(), paper.iter().map(|v| v.abs()).sum::<f64>());
        assert!((sp / s - 1.0).abs() < 0.15, "paper DARE keeps the expected magnitude: {}", sp / s);
        let sq = peft.iter().map(|v| v.abs()).sum::<f64>();
        assert!((sq / s - density).abs() < 0.05, "PEFT DARE shrinks by the density: {}", sq / s);
    }
}
