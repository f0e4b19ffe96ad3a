//! The element types a tensor can hold: `f32` for models, `f64` for gradient checks.

use std::fmt::{Debug, Display};

/// A floating-point element type with the arithmetic and GEMM entry point the ops need.
///
/// Implemented for `f32` (models, training) and `f64` (finite-difference gradient checks).
pub trait Elem:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::NumAssign
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + std::iter::Sum
    + Send
    + Sync
    + Debug
    + Display
    + Default
    + 'static
{
    /// Name used in messages and file headers ("F32", "F64").
    const DTYPE: &'static str;
    /// Converts from f64 (rounding for f32).
    fn of(x: f64) -> Self;
    /// Converts to f64.
    fn f64(self) -> f64;
    /// The error function.
    fn erf(self) -> Self;
    /// `exp` for elementwise loops: `f32` uses a branch-free polynomial that vectorises (within 2e-7 relative of
    /// the exact value on `[-87, 88]`; arguments outside are clamped to that range), `f64` is the exact `exp`.
    fn exp_fast(self) -> Self;
}

impl Elem for f32 {
    const DTYPE: &'static str = "F32";
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    #[inline]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

impl Elem for f64 {
    const DTYPE: &'static str = "F64";
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// f32 erf as a branch-free rational approximation (the odd/even polynomial pair of Eigen / XLA `ErfImpl32`,
/// input clamped to [-4, 4]; plain mul/add, as `mul_add` is a libm call without `target-feature=+fma`), so GELU
/// loops vectorise; within 1e-6 absolute of the exact erf (about 5x faster
/// than `libm::erff` in DINOv2's GELU, which dominated its forward).
#[inline]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

/// f32 `exp` by range reduction `x = n·ln2 + r` (Cody-Waite split of ln2, `|r| <= ln2/2`), the degree-6
/// minimax polynomial of Cephes' `expf` for `e^r`, and `2^n` built from the exponent bits. Rounding to the nearest
/// `n` adds and subtracts 1.5·2^23 instead of calling `roundf`, so the loop stays SSE2-vectorisable. The input is
/// clamped to `[-87, 88]` (so `n` stays in the normal range).
#[inline]
fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = r * 1.987_569_1e-4 + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_f32_is_within_2e7_relative_of_exp() {
        let mut worst = 0.0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(super::exp_f32(x)) - want).abs() / want);
        }
        assert!(worst < 2e-7, "{worst}");
        assert_eq!(super::exp_f32(0.0), 1.0);
        assert_eq!(super::exp_f32(-1e9), super::exp_f32(-87.0));
        assert!(super::exp_f32(1e9).is_finite());
    }

    #[test]
    fn fast_erf_f32_is_within_1e6_of_exact_erf() {
        let mut worst = 0.0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((f64::from(super::erf_f32(x)) - libm::erf(f64::from(x))).abs());
        }
        assert!(worst < 1e-6, "{worst}");
        assert_eq!(super::erf_f32(0.0), 0.0);
        assert_eq!(super::erf_f32(-9.0), -super::erf_f32(9.0));
    }
}
