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
        libm::erff(self)
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
}
