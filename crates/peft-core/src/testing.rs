//! Test helpers shared by every crate (feature `testing`): finite-difference gradient checks in f64, closeness
//! asserts, proptest strategies and the CI-aware asset lookups [`require_asset`] and [`require_smollm2_gguf`].

pub use crate::io::assets::{require_asset, require_smollm2_gguf};

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};

use crate::autograd::no_grad;
use crate::error::Result;
use crate::tensor::Tensor;

/// Outcome of a failed gradient check: which input and element, analytic vs numeric.
#[derive(Debug)]
pub struct GradMismatch {
    /// Index of the input.
    pub input: usize,
    /// Flat element index.
    pub index: usize,
    /// Gradient from backward.
    pub analytic: f64,
    /// Central finite difference.
    pub numeric: f64,
}

/// Checks the gradients of `f` at `inputs` against central finite differences, in f64.
///
/// The scalar checked is `sum(f(inputs) ⊙ R)` for a fixed random `R`, so every entry of the Jacobian is
/// exercised. Each element passes when `|analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)`.
/// Inputs listed in `frozen` are passed as constants and must get no gradient.
///
/// # Errors
/// Returns the first mismatch, or panics on an op error (a test failure either way).
pub fn gradcheck(
    f: impl Fn(&[Tensor<f64>]) -> Result<Tensor<f64>>,
    inputs: &[ArrayD<f64>],
    eps: f64,
    atol: f64,
    rtol: f64,
) -> std::result::Result<(), GradMismatch> {
    let vars: Vec<Tensor<f64>> = inputs.iter().map(|a| Tensor::var(a.clone())).collect();
    let y = f(&vars).expect("gradcheck: forward failed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let r = ArrayD::from_shape_fn(IxDyn(y.shape()), |_| rng.gen_range(-1.0..1.0));
    let rt = Tensor::new(r.clone());
    let loss = y.mul(&rt).expect("gradcheck: weight").sum_all();
    let grads = loss.backward().expect("gradcheck: backward failed");
    let scalar = |xs: &[ArrayD<f64>]| -> f64 {
        no_grad(|| {
            let ts: Vec<Tensor<f64>> = xs.iter().map(|a| Tensor::new(a.clone())).collect();
            let y = f(&ts).expect("gradcheck: forward failed");
            y.as_slice().iter().zip(r.iter()).map(|(a, b)| a * b).sum()
        })
    };
    for (i, v) in vars.iter().enumerate() {
        let zeros = ArrayD::zeros(v.data().raw_dim());
        let g = grads.get(v).unwrap_or(&zeros);
        for j in 0..inputs[i].len() {
            let mut xs: Vec<ArrayD<f64>> = inputs.to_vec();
            let orig = xs[i].as_slice().expect("contiguous")[j];
            xs[i].as_slice_mut().expect("contiguous")[j] = orig + eps;
            let lp = scalar(&xs);
            xs[i].as_slice_mut().expect("contiguous")[j] = orig - eps;
            let lm = scalar(&xs);
            let numeric = (lp - lm) / (2.0 * eps);
            let analytic = g.as_slice().expect("contiguous")[j];
            if (analytic - numeric).abs() > atol + rtol * analytic.abs().max(numeric.abs()) {
                return Err(GradMismatch { input: i, index: j, analytic, numeric });
            }
        }
    }
    Ok(())
}

/// [`gradcheck`] with the defaults used across the workspace (eps 1e-6, atol 1e-6, rtol 1e-5), panicking
/// with the mismatch.
pub fn assert_grads(f: impl Fn(&[Tensor<f64>]) -> Result<Tensor<f64>>, inputs: &[ArrayD<f64>]) {
    if let Err(m) = gradcheck(f, inputs, 1e-6, 1e-6, 1e-5) {
        panic!("gradient mismatch: {m:?}");
    }
}

/// Largest absolute elementwise difference of two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Proptest config for a property with `cases` cases, scaled by the env var `PEFT_PROPTEST_MULT` (default 1).
///
/// Everything else comes from [`proptest::test_runner::Config::default`], so `PROPTEST_RNG_SEED` pins the
/// seed (`.ci/run` pins it so that CI is repeatable) and a long exploratory sweep is
/// `PEFT_PROPTEST_MULT=100 cargo test --workspace` (random seed per run; a failure prints its minimal input).
///
/// ```
/// let cfg = peft_core::testing::proptest_config(16);
/// assert!(cfg.cases >= 16);
/// ```
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let mult = std::env::var("PEFT_PROPTEST_MULT").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(1).max(1);
    proptest::test_runner::Config { cases: cases.saturating_mul(mult), ..proptest::test_runner::Config::default() }
}

/// proptest strategy helpers: random f64 arrays of a given shape with values in `lo..hi`.
pub fn array_strategy(shape: Vec<usize>, lo: f64, hi: f64) -> impl proptest::strategy::Strategy<Value = ArrayD<f64>> {
    use proptest::prelude::*;
    let n: usize = shape.iter().product();
    proptest::collection::vec(lo..hi, n)
        .prop_map(move |v| ArrayD::from_shape_vec(IxDyn(&shape), v).expect("array_strategy shape"))
}
