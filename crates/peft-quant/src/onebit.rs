//! Low-bit (down to 1-bit) adapter weights ("precision redundancy" of adapters; spec §4.5).
//!
//! Per weight matrix `W`: `μ = mean(W)`, `σ = std(W)` (unbiased), `W_n = (W − μ)/(σ + 1e-5)`,
//! `Ŵ = Q_b(W_n)·σ + μ`, where `Q_b` rounds to the nearest level of a `2^b`-level normal codebook ([`levels`]; 1-bit:
//! `±0.674490 = ±Φ⁻¹(0.75)`, threshold 0). Training uses the straight-through estimator ([`fake_quant_ste`]):
//! forward `Ŵ`, backward the identity to `W`.
//!
//! Codebooks: thresholds are midpoints of consecutive levels and each level is the probability-median of its bin,
//! `level_i = Φ⁻¹((Φ(t_{i−1}) + Φ(t_i))/2)`, iterated to a fixed point from zeros ([`derive_levels`]); the
//! shipped tables ([`levels`], [`thresholds`]) are the spec's Appendix A values (6 decimals).
//!
//! Storage ([`LowBitWeight`]): codes packed LSB-first into a bit stream (`8/b` codes per byte for b ∈ {1, 2, 4};
//! 3-bit codes straddle bytes) plus `μ, σ` as f32: `⌈n·b/8⌉ + 8` bytes per matrix. Unpacking reconstructs
//! `level[q]·σ + μ`, exactly the fake-quant forward weight (which also multiplies by `σ`, not `σ + 1e-5`).

use ndarray::{ArrayD, IxDyn};
use peft_core::autograd::record;
use peft_core::{Error, Result, Tensor};

/// 1-bit levels.
pub const LEVELS_1: [f32; 2] = [-0.67449, 0.67449];
/// 2-bit levels.
pub const LEVELS_2: [f32; 4] = [-1.26572, -0.377754, 0.377754, 1.26572];
/// 3-bit levels.
pub const LEVELS_3: [f32; 8] = [-1.792025, -1.113729, -0.62542, -0.202624, 0.202624, 0.62542, 1.113729, 1.792025];
/// 4-bit levels.
pub const LEVELS_4: [f32; 16] = [
    -2.265491, -1.707738, -1.333107, -1.034006, -0.775192, -0.540072, -0.319036, -0.10555, 0.10555, 0.319036, 0.540072,
    0.775192, 1.034006, 1.333107, 1.707738, 2.265491,
];
const THR_1: [f32; 1] = [0.0];
const THR_2: [f32; 3] = [-0.821737, 0.0, 0.821737];
const THR_3: [f32; 7] = [-1.452877, -0.869574, -0.414022, 0.0, 0.414022, 0.869574, 1.452877];
const THR_4: [f32; 15] = [
    -1.986614, -1.520422, -1.183556, -0.904599, -0.657632, -0.429554, -0.212293, 0.0, 0.212293, 0.429554, 0.657632,
    0.904599, 1.183556, 1.520422, 1.986614,
];

/// Denominator guard of the normalisation `(W − μ)/(σ + 1e-5)`.
pub const SIGMA_EPS: f32 = 1e-5;

fn check_bits(op: &'static str, bits: u8) -> Result<()> {
    if (1..=4).contains(&bits) {
        Ok(())
    } else {
        Err(crate::QuantError::Bits { op, bits }.into())
    }
}

/// The sorted `2^bits` levels (`bits` ∈ 1..=4).
///
/// # Errors
/// [`crate::QuantError::Bits`] for other bit widths.
pub fn levels(bits: u8) -> Result<&'static [f32]> {
    check_bits("levels", bits)?;
    Ok(match bits {
        1 => &LEVELS_1,
        2 => &LEVELS_2,
        3 => &LEVELS_3,
        _ => &LEVELS_4,
    })
}

/// The `2^bits − 1` sorted decision thresholds (midpoints of consecutive levels).
///
/// # Errors
/// [`crate::QuantError::Bits`] for bit widths outside 1..=4.
pub fn thresholds(bits: u8) -> Result<&'static [f32]> {
    check_bits("thresholds", bits)?;
    Ok(match bits {
        1 => &THR_1,
        2 => &THR_2,
        3 => &THR_3,
        _ => &THR_4,
    })
}

/// `erfc(x)` (Numerical Recipes' Chebyshev fit, fractional error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The standard normal quantile, by bisection on [`phi`].
pub(crate) fn phi_inv(p: f64) -> f64 {
    let (mut lo, mut hi) = (-12.0f64, 12.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if phi(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Re-derives the `2^bits` levels by the spec's fixed-point iteration (`iters` rounds from zeros; 500 in the
/// reference code). Matches [`levels`] to about 1e-6.
pub fn derive_levels(bits: u8, iters: usize) -> Vec<f64> {
    let k = 1usize << bits.min(16);
    let mut lv = vec![0f64; k];
    for _ in 0..iters {
        let t: Vec<f64> = (0..=k)
            .map(|i| match i {
                0 => f64::NEG_INFINITY,
                i if i == k => f64::INFINITY,
                i => 0.5 * (lv[i - 1] + lv[i]),
            })
            .collect();
        let cdf = |x: f64| {
            if x.is_infinite() {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            } else {
                phi(x)
            }
        };
        // Equal levels give empty bins; spread them by bin index of equal probability the first time.
        let degenerate = lv.windows(2).any(|w| w[0] == w[1]);
        for i in 0..k {
            let (a, b) =
                if degenerate { (i as f64 / k as f64, (i + 1) as f64 / k as f64) } else { (cdf(t[i]), cdf(t[i + 1])) };
            lv[i] = phi_inv(0.5 * (a + b));
        }
    }
    lv
}

/// Index of the nearest level of `x` (thresholds sorted; a value on a threshold takes the upper level).
#[inline]
fn code_of(thr: &[f32], x: f32) -> u8 {
    thr.partition_point(|&t| t <= x) as u8
}

/// `(μ, σ)` of `w`: mean and unbiased standard deviation (σ = 0 for fewer than two values).
pub fn mean_std(w: &[f32]) -> (f32, f32) {
    let n = w.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = w.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    if n < 2 {
        return (mean as f32, 0.0);
    }
    let var = w.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean as f32, var.sqrt() as f32)
}

/// Codes and `(μ, σ)` of `w` at `bits`.
fn quantize_codes(w: &[f32], bits: u8) -> Result<(Vec<u8>, f32, f32)> {
    let thr = thresholds(bits)?;
    if let Some(v) = w.iter().find(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: format!("low-bit adapter weight ({v})") });
    }
    let (mu, sigma) = mean_std(w);
    let codes = w.iter().map(|&v| code_of(thr, (v - mu) / (sigma + SIGMA_EPS))).collect();
    Ok((codes, mu, sigma))
}

/// The fake-quantized values `level[q]·σ + μ` of `w`.
///
/// # Errors
/// [`crate::QuantError::Bits`] for unsupported `bits`; [`Error::NonFinite`].
pub fn fake_quant(w: &[f32], bits: u8) -> Result<Vec<f32>> {
    let (codes, mu, sigma) = quantize_codes(w, bits)?;
    let lv = levels(bits)?;
    Ok(codes.iter().map(|&q| lv[usize::from(q)] * sigma + mu).collect())
}

/// The straight-through fake-quantization op: forward `Ŵ = Q_b((W − μ)/(σ + 1e-5))·σ + μ`, backward the
/// identity (`∂L/∂W := ∂L/∂Ŵ`). Any shape; the statistics are over all elements.
///
/// # Errors
/// [`crate::QuantError::Bits`] for unsupported `bits`; [`Error::NonFinite`].
pub fn fake_quant_ste(w: &Tensor, bits: u8) -> Result<Tensor> {
    let out = fake_quant(w.as_slice(), bits)?;
    let arr = ArrayD::from_shape_vec(IxDyn(w.shape()), out).expect("peft-rs bug: fake_quant keeps the size");
    Ok(record("fake_quant_ste", arr, &[w], |g, needs| vec![needs[0].then(|| g.clone())]))
}

/// How the straight-through estimator passes the gradient back to the latent weight `W`.
///
/// The spec's summary reads "backward identity to W"; the reference code (`binary_adapter/utils.py`, `QLinear`)
/// computes `μ`, `σ` from `W` without detaching them and makes only the rounding straight-through
/// (`wb = q(w).data + w − w.data`), so its gradient flows through the normalisation. [`SteGradient::ThroughStats`]
/// is the reference and the default; [`SteGradient::Identity`] is the summary's reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SteGradient {
    /// Only `Q_b` is straight-through (its derivative taken as 1); `(W − μ)/(σ + 1e-5)` and `·σ + μ` are
    /// differentiated, `μ` and `σ` included. Where `σ = 0` (an all-equal matrix, e.g. LoRA's `B` at its zero
    /// init) `σ` has no derivative and the identity is used for that matrix (see [`ste_backward`]).
    #[default]
    ThroughStats,
    /// `∂L/∂W := ∂L/∂Ŵ`.
    Identity,
}

/// The gradient at `w` of the straight-through fake quantisation, given the upstream gradient `g` of `Ŵ`.
///
/// For [`SteGradient::ThroughStats`], with `N` elements, `d = W − μ`, `s = σ + 1e-5`, `q = Q_b(d/s)` (the level,
/// a constant) and `ḡ = mean(g)`, the derivative of `Ŵ = (q + n − sg(n))·σ + μ`, `n = d/s` (`sg`: stop-gradient) is
///
/// `∂L/∂W_j = (σ/s)(g_j − ḡ) + ḡ + d_j/((N−1)σ) · (Σ g_i q_i − (σ/s²) Σ g_i d_i)`
///
/// (using `∂μ/∂W_j = 1/N`, `∂σ/∂W_j = d_j/((N−1)σ)`). For `σ = 0` or `N < 2` it returns `g` (identity).
/// Computed in f64.
///
/// # Errors
/// [`crate::QuantError::Bits`] for unsupported `bits`, [`Error::Shape`] when `g` and `w` differ in length.
pub fn ste_backward(w: &[f32], g: &[f32], bits: u8, mode: SteGradient) -> Result<Vec<f32>> {
    if g.len() != w.len() {
        return Err(Error::Shape { op: "ste_backward", lhs: vec![w.len()], rhs: vec![g.len()] });
    }
    let thr = thresholds(bits)?;
    let lv = levels(bits)?;
    let (mu32, sigma32) = mean_std(w);
    if mode == SteGradient::Identity || sigma32 == 0.0 || w.len() < 2 {
        return Ok(g.to_vec());
    }
    let n = w.len() as f64;
    let (mu, sigma) = (f64::from(mu32), f64::from(sigma32));
    let s = sigma + f64::from(SIGMA_EPS);
    let gbar = g.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut gq, mut gd) = (0f64, 0f64);
    for (&wi, &gi) in w.iter().zip(g) {
        // The same code the forward picked (f32 arithmetic, as in `quantize_codes`).
        let q = lv[usize::from(code_of(thr, (wi - mu32) / (sigma32 + SIGMA_EPS)))];
        gq += f64::from(gi) * f64::from(q);
        gd += f64::from(gi) * (f64::from(wi) - mu);
    }
    let k = (gq - sigma / (s * s) * gd) / ((n - 1.0) * sigma);
    Ok(w.iter()
        .zip(g)
        .map(|(&wi, &gi)| ((sigma / s) * (f64::from(gi) - gbar) + gbar + (f64::from(wi) - mu) * k) as f32)
        .collect())
}

/// The straight-through fake-quantization op with the gradient rule `mode`: forward
/// `Ŵ = Q_b((W − μ)/(σ + 1e-5))·σ + μ` (exactly [`fake_quant`]), backward [`ste_backward`].
///
/// # Errors
/// [`crate::QuantError::Bits`] for unsupported `bits`; [`Error::NonFinite`].
pub fn fake_quant_ste_with(w: &Tensor, bits: u8, mode: SteGradient) -> Result<Tensor> {
    if mode == SteGradient::Identity {
        return fake_quant_ste(w, bits);
    }
    let wv = w.as_slice().to_vec();
    let out = fake_quant(&wv, bits)?;
    let arr = ArrayD::from_shape_vec(IxDyn(w.shape()), out).expect("peft-rs bug: fake_quant keeps the size");
    Ok(record("fake_quant_ste_stats", arr, &[w], move |g, needs| {
        let grad = needs[0].then(|| {
            let gs: Vec<f32> = g.iter().copied().collect();
            let gw = ste_backward(&wv, &gs, bits, SteGradient::ThroughStats)
                .expect("peft-rs bug: bits and sizes checked in the forward");
            ArrayD::from_shape_vec(g.raw_dim(), gw).expect("peft-rs bug: same size")
        });
        vec![grad]
    }))
}

/// A weight matrix stored at `bits` bits per element plus `μ, σ`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowBitWeight {
    bits: u8,
    shape: Vec<usize>,
    packed: Vec<u8>,
    mu: f32,
    sigma: f32,
}

impl LowBitWeight {
    /// Quantizes and packs `w` (row-major, `shape`).
    ///
    /// # Errors
    /// [`crate::QuantError::Bits`] for unsupported `bits`; [`Error::Shape`] when `w.len()` is not the product of `shape`;
    /// [`Error::NonFinite`].
    pub fn quantize(w: &[f32], shape: &[usize], bits: u8) -> Result<Self> {
        if shape.iter().product::<usize>() != w.len() {
            return Err(Error::Shape { op: "LowBitWeight::quantize", lhs: shape.to_vec(), rhs: vec![w.len()] });
        }
        let (codes, mu, sigma) = quantize_codes(w, bits)?;
        let b = usize::from(bits);
        let mut packed = vec![0u8; (codes.len() * b).div_ceil(8)];
        for (i, &q) in codes.iter().enumerate() {
            for j in 0..b {
                if (q >> j) & 1 == 1 {
                    let bit = i * b + j;
                    packed[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        Ok(LowBitWeight { bits, shape: shape.to_vec(), packed, mu, sigma })
    }

    /// Rebuilds a weight from its stored parts (as read from a file).
    ///
    /// # Errors
    /// [`crate::QuantError::Bits`] for unsupported `bits`, [`crate::QuantError::Size`] for a packed length other than `⌈n·bits/8⌉`, or non-finite `μ, σ`.
    pub fn from_parts(bits: u8, shape: &[usize], packed: Vec<u8>, mu: f32, sigma: f32) -> Result<Self> {
        check_bits("LowBitWeight::from_parts", bits)?;
        let n: usize = shape.iter().product();
        let want = (n * usize::from(bits)).div_ceil(8);
        if packed.len() != want {
            return Err(crate::QuantError::Size {
                what: format!("LowBitWeight::from_parts: packed bytes for {n} codes at {bits} bits"),
                expected: want,
                got: packed.len(),
            }
            .into());
        }
        if !(mu.is_finite() && sigma.is_finite()) {
            return Err(Error::NonFinite { what: format!("low-bit weight statistics (mu {mu}, sigma {sigma})") });
        }
        Ok(LowBitWeight { bits, shape: shape.to_vec(), packed, mu, sigma })
    }

    /// Bits per element.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// `(μ, σ)`.
    pub fn stats(&self) -> (f32, f32) {
        (self.mu, self.sigma)
    }

    /// The packed code bytes (LSB-first bit stream).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// Code `i`.
    pub fn code(&self, i: usize) -> u8 {
        let b = usize::from(self.bits);
        (0..b).fold(0u8, |q, j| {
            let bit = i * b + j;
            q | (((self.packed[bit / 8] >> (bit % 8)) & 1) << j)
        })
    }

    /// The reconstructed weight `level[q]·σ + μ` (equal to [`fake_quant`] of the original).
    pub fn unpack(&self) -> Vec<f32> {
        let lv = levels(self.bits).expect("peft-rs bug: bits checked at construction");
        let n: usize = self.shape.iter().product();
        (0..n).map(|i| lv[usize::from(self.code(i))] * self.sigma + self.mu).collect()
    }

    /// Bytes held: `⌈n·b/8⌉` packed codes plus 8 for `μ, σ`.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + 8
    }

    /// Serializes as `[bits u8][rank u8][dims u32 LE…][μ f32][σ f32][packed]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.bits, self.shape.len() as u8];
        for &d in &self.shape {
            out.extend_from_slice(&(d as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.mu.to_le_bytes());
        out.extend_from_slice(&self.sigma.to_le_bytes());
        out.extend_from_slice(&self.packed);
        out
    }

    /// Parses [`LowBitWeight::to_bytes`].
    ///
    /// # Errors
    /// [`crate::QuantError::Corrupt`] for truncated or inconsistent bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |problem: &'static str| -> Error {
            crate::QuantError::Corrupt { what: "LowBitWeight::from_bytes", problem }.into()
        };
        let (&bits, rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
        check_bits("LowBitWeight::from_bytes", bits)?;
        let (&rank, mut rest) = rest.split_first().ok_or_else(|| bad("truncated header"))?;
        let take4 = |rest: &mut &[u8]| -> Result<[u8; 4]> {
            if rest.len() < 4 {
                return Err(bad("truncated header"));
            }
            let (a, b) = rest.split_at(4);
            *rest = b;
            Ok(a.try_into().expect("peft-rs bug: 4 bytes"))
        };
        let shape: Vec<usize> =
            (0..rank).map(|_| take4(&mut rest).map(|b| u32::from_le_bytes(b) as usize)).collect::<Result<_>>()?;
        let mu = f32::from_le_bytes(take4(&mut rest)?);
        let sigma = f32::from_le_bytes(take4(&mut rest)?);
        let n = crate::error::checked_numel("LowBitWeight", &shape)?;
        let want = n.checked_mul(usize::from(bits)).map(|b| b.div_ceil(8));
        if want != Some(rest.len()) {
            return Err(bad("packed length does not match the shape"));
        }
        Ok(LowBitWeight { bits, shape, packed: rest.to_vec(), mu, sigma })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::nn::{RandomInit, WeightSource};

    fn randn(seed: u64, shape: &[usize]) -> ArrayD<f32> {
        RandomInit::new(seed, 0.02).get("w", shape).unwrap()
    }

    #[test]
    fn shipped_codebooks_are_the_fixed_points_of_the_median_iteration() {
        for bits in 1..=4u8 {
            let lv = levels(bits).unwrap();
            let thr = thresholds(bits).unwrap();
            let d = derive_levels(bits, 500);
            for (a, b) in lv.iter().zip(&d) {
                assert!((f64::from(*a) - b).abs() < 2e-6, "{bits} bits: {a} vs {b}");
            }
            for (i, t) in thr.iter().enumerate() {
                assert!((t - 0.5 * (lv[i] + lv[i + 1])).abs() < 2e-6, "{bits} bits threshold {i}");
            }
        }
        assert!((phi_inv(0.75) - 0.674_489_75).abs() < 1e-6);
    }

    #[test]
    fn one_bit_weight_has_exactly_two_values_mu_plus_minus_0_6745_sigma() {
        let w = randn(1, &[8, 32]);
        let (mu, sigma) = mean_std(w.as_slice().unwrap());
        let q = fake_quant(w.as_slice().unwrap(), 1).unwrap();
        let mut vals: Vec<f32> = q.clone();
        vals.sort_by(f32::total_cmp);
        vals.dedup();
        assert_eq!(vals, vec![mu - LEVELS_1[1] * sigma, mu + LEVELS_1[1] * sigma]);
        for (x, y) in w.iter().zip(&q) {
            assert_eq!(*y > mu, *x >= mu, "sign of the centred value decides");
        }
    }

    #[test]
    fn ste_forwards_the_quantized_weight_and_passes_the_gradient_through() {
        // L(W) = Σ c ⊙ (Ŵ ∘ Ŵ): the STE gradient at W must equal ∂L/∂Ŵ = 2 c ⊙ Ŵ, checked against central
        // finite differences of L as a function of Ŵ.
        let w = randn(2, &[6, 10]);
        let c = randn(3, &[6, 10]).mapv(|v| v * 50.0);
        let loss = |t: &Tensor| t.mul(t).unwrap().mul(&Tensor::new(c.clone())).unwrap().sum_all();
        for bits in 1..=4u8 {
            let wv = Tensor::var(w.clone());
            let wq = fake_quant_ste(&wv, bits).unwrap();
            assert_eq!(wq.as_slice(), fake_quant(w.as_slice().unwrap(), bits).unwrap().as_slice());
            let g = loss(&wq).backward().unwrap();
            let gw = g.get(&wv).unwrap();
            let what = wq.data().to_owned();
            let h = 1e-3f32;
            for i in 0..what.len() {
                let mut p = what.clone();
                let mut m = what.clone();
                p.as_slice_mut().unwrap()[i] += h;
                m.as_slice_mut().unwrap()[i] -= h;
                let fd = (loss(&Tensor::new(p)).item().unwrap() - loss(&Tensor::new(m)).item().unwrap()) / (2.0 * h);
                let an = gw.as_slice().unwrap()[i];
                assert!((fd - an).abs() <= 1e-3 * (1.0 + an.abs()), "{bits} bits, {i}: fd {fd} vs ste {an}");
            }
        }
        // A constant input builds no graph.
        assert!(!fake_quant_ste(&Tensor::new(w), 1).unwrap().tracks());
    }

    /// The surrogate whose derivative the through-stats STE is: `f(W) = (c + n(W))·σ(W) + μ(W)` with
    /// `n = (W − μ)/(σ + 1e-5)` and `c = Q(n(W₀)) − n(W₀)` frozen at the point of evaluation (so `f(W₀) = Ŵ` and
    /// Q's derivative is 1), in f64.
    fn surrogate(w: &[f64], c: &[f64]) -> Vec<f64> {
        let n = w.len() as f64;
        let mu = w.iter().sum::<f64>() / n;
        let sigma = (w.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let s = sigma + f64::from(SIGMA_EPS);
        w.iter().zip(c).map(|(v, ci)| (ci + (v - mu) / s) * sigma + mu).collect()
    }

    #[test]
    fn through_stats_ste_gradient_matches_finite_differences_of_the_non_rounding_part() {
        for (bits, scale, seed) in [(1u8, 1.0f32, 10u64), (2, 50.0, 11), (3, 1.0, 12), (4, 50.0, 13), (1, 0.05, 14)] {
            let w = randn(seed, &[5, 12]).mapv(|v| v * scale);
            let coef = randn(seed + 100, &[5, 12]).mapv(|v| v * 50.0);
            let wv = Tensor::var(w.clone());
            let wq = fake_quant_ste_with(&wv, bits, SteGradient::ThroughStats).unwrap();
            // The forward is exactly the fake-quantized weight.
            assert_eq!(wq.as_slice(), fake_quant(w.as_slice().unwrap(), bits).unwrap().as_slice());
            let g = wq.mul(&Tensor::new(coef.clone())).unwrap().sum_all().backward().unwrap();
            let gw = g.get(&wv).unwrap();
            let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
            let (mu, sigma) = mean_std(w.as_slice().unwrap());
            let thr = thresholds(bits).unwrap();
            let lv = levels(bits).unwrap();
            let s = f64::from(sigma) + f64::from(SIGMA_EPS);
            let c: Vec<f64> = w
                .iter()
                .map(|&v| {
                    let q = f64::from(lv[usize::from(code_of(thr, (v - mu) / (sigma + SIGMA_EPS)))]);
                    q - (f64::from(v) - f64::from(mu)) / s
                })
                .collect();
            let coef64: Vec<f64> = coef.iter().map(|&v| f64::from(v)).collect();
            let loss = |x: &[f64]| surrogate(x, &c).iter().zip(&coef64).map(|(a, b)| a * b).sum::<f64>();
            let h = 1e-6 * f64::from(scale);
            let mut differs_from_identity = false;
            for i in 0..w64.len() {
                let (mut p, mut m) = (w64.clone(), w64.clone());
                p[i] += h;
                m[i] -= h;
                let fd = (loss(&p) - loss(&m)) / (2.0 * h);
                let an = f64::from(gw.as_slice().unwrap()[i]);
                assert!((fd - an).abs() <= 1e-3 * (1.0 + an.abs()), "{bits} bits x{scale}, {i}: fd {fd} vs {an}");
                differs_from_identity |= (an - coef64[i]).abs() > 1e-2 * (1.0 + coef64[i].abs());
            }
            assert!(differs_from_identity, "the statistics' terms are not negligible");
            // Identity mode passes the upstream gradient unchanged.
            let wv = Tensor::var(w.clone());
            let wq = fake_quant_ste_with(&wv, bits, SteGradient::Identity).unwrap();
            let g = wq.mul(&Tensor::new(coef.clone())).unwrap().sum_all().backward().unwrap();
            assert_eq!(g.get(&wv).unwrap().to_owned(), coef);
        }
    }

    #[test]
    fn zero_matrix_quantizes_to_zero_and_gets_the_identity_gradient() {
        // LoRA's B at init: σ = 0, μ = 0, so Ŵ = level·0 + 0 = 0 exactly (the adapter stays the identity), and
        // the statistics have no derivative: the gradient passes unchanged so B can leave zero.
        for bits in 1..=4u8 {
            let z = ArrayD::<f32>::zeros(IxDyn(&[4, 3]));
            assert!(fake_quant(z.as_slice().unwrap(), bits).unwrap().iter().all(|&v| v == 0.0));
            let lb = LowBitWeight::quantize(z.as_slice().unwrap(), &[4, 3], bits).unwrap();
            assert!(lb.unpack().iter().all(|&v| v == 0.0));
            let zv = Tensor::var(z.clone());
            let coef = randn(7, &[4, 3]);
            let g = fake_quant_ste_with(&zv, bits, SteGradient::ThroughStats)
                .unwrap()
                .mul(&Tensor::new(coef.clone()))
                .unwrap()
                .sum_all()
                .backward()
                .unwrap();
            assert_eq!(g.get(&zv).unwrap().to_owned(), coef);
        }
        assert!(matches!(ste_backward(&[1.0, 2.0], &[1.0], 1, SteGradient::ThroughStats), Err(Error::Shape { .. })));
    }

    #[test]
    fn pack_unpack_round_trips_and_storage_is_n_bits_plus_two_floats() {
        for bits in 1..=4u8 {
            for shape in [vec![8, 32], vec![3, 7], vec![1]] {
                let w = randn(4, &shape);
                let lb = LowBitWeight::quantize(w.as_slice().unwrap(), &shape, bits).unwrap();
                let n: usize = shape.iter().product();
                assert_eq!(lb.storage_bytes(), (n * usize::from(bits)).div_ceil(8) + 8);
                assert_eq!(lb.unpack(), fake_quant(w.as_slice().unwrap(), bits).unwrap());
                let back = LowBitWeight::from_bytes(&lb.to_bytes()).unwrap();
                assert_eq!(back, lb);
            }
        }
        // 1 bit per parameter: a 384 x 8 LoRA A is 384 bytes + 8.
        let w = randn(5, &[8, 384]);
        let lb = LowBitWeight::quantize(w.as_slice().unwrap(), &[8, 384], 1).unwrap();
        assert_eq!(lb.storage_bytes(), 384 + 8);
        // LSB first: code i is bit i of the stream.
        for i in 0..16 {
            assert_eq!(lb.code(i), (lb.packed()[i / 8] >> (i % 8)) & 1);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let bits = |r: Result<_>| {
            matches!(r.err().as_ref().and_then(crate::QuantError::of), Some(crate::QuantError::Bits { .. }))
        };
        assert!(bits(levels(0).map(|_| ())));
        assert!(bits(fake_quant(&[1.0, 2.0], 5).map(|_| ())));
        assert!(matches!(fake_quant(&[1.0, f32::NAN], 1), Err(Error::NonFinite { .. })));
        assert!(matches!(LowBitWeight::quantize(&[1.0; 5], &[2, 2], 1), Err(Error::Shape { .. })));
        let corrupt = |b: &[u8]| {
            let e = LowBitWeight::from_bytes(b).err().unwrap();
            matches!(crate::QuantError::of(&e), Some(crate::QuantError::Corrupt { .. }))
        };
        assert!(corrupt(&[1, 1, 4, 0, 0, 0]));
        assert!(corrupt(&[]));
    }
}
