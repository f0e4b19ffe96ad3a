//! Shared pieces of the LoRA-family tuners: Kaiming-uniform init, the config-file helpers every method of this
//! crate uses (unknown keys reported, values parsed with their field named), and finite-difference checks for
//! tests.

use ndarray::{Array2, Ix2};
use peft_core::adapter::{AdapterError, AdapterResult, AdapterTensors, ModulePattern, TargetSpec};
use peft_core::Param;
use rand_distr::{Distribution, Uniform};
use serde_json::Value;

pub use peft_core::adapter::{site_rng, SavedTensors};

/// `kaiming_uniform_(a=√5)` for a `[rows, cols]` matrix with fan-in `fan_in`: U(−1/√fan_in, 1/√fan_in).
pub fn kaiming(fan_in: usize, rows: usize, cols: usize, rng: &mut impl rand::Rng) -> Array2<f32> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    let u = Uniform::new_inclusive(-bound, bound);
    Array2::from_shape_fn((rows, cols), |_| u.sample(rng))
}

/// Parses a method's config from its JSON object and lists the keys it does not know (as load-report lines).
///
/// # Errors
/// [`AdapterError::InvalidConfig`] naming the method for wrongly typed fields.
pub fn parse_config<C: serde::de::DeserializeOwned>(
    v: &Value,
    method: &str,
    known: &[&str],
) -> AdapterResult<(C, Vec<String>)> {
    let c = serde_json::from_value(v.clone()).map_err(|e| AdapterError::config(method, "<config>", e.to_string()))?;
    let ignored = v
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !known.contains(&k.as_str()))
                .map(|k| format!("`{k}` is not a {method} option and was ignored"))
                .collect()
        })
        .unwrap_or_default();
    Ok((c, ignored))
}

/// A config as its JSON value.
///
/// # Errors
/// Serialisation errors as [`AdapterError::InvalidConfig`].
pub fn config_json(c: &impl serde::Serialize, method: &str) -> AdapterResult<Value> {
    serde_json::to_value(c).map_err(|e| AdapterError::config(method, "<config>", e.to_string()))
}

/// The site selection of a method with PEFT's `target_modules` / `exclude_modules` keys.
///
/// # Errors
/// Invalid regular expressions.
pub fn target_spec(target: &ModulePattern, exclude: Option<&ModulePattern>) -> AdapterResult<TargetSpec> {
    Ok(TargetSpec::new(target, exclude, None, None, &[])?)
}

/// `target_modules` for reports (`"query,value"` or the regex).
pub fn describe_targets(t: &ModulePattern) -> String {
    match t {
        ModulePattern::List(v) => v.join(","),
        ModulePattern::Regex(s) => s.clone(),
    }
}

/// Checks, before anything is allocated, that tensor `key` (relative to the model root) is in `file` with shape
/// `want`.
///
/// # Errors
/// [`AdapterError::MissingTensor`] / [`AdapterError::TensorShape`] naming the full key.
pub fn expect_tensor(file: &AdapterTensors, key: &str, want: &[usize]) -> AdapterResult<()> {
    match file.shape(key) {
        None => {
            Err(AdapterError::MissingTensor { file: file.path().to_path_buf(), key: format!("base_model.model.{key}") })
        }
        Some(s) if s != want => Err(AdapterError::TensorShape {
            file: file.path().to_path_buf(),
            key: format!("base_model.model.{key}"),
            expected: want.to_vec(),
            found: s,
        }),
        Some(_) => Ok(()),
    }
}

/// A parameter's value as a matrix.
///
/// # Errors
/// [`crate::LoraError::NotMatrix`] when it is not 2-D.
pub fn m2(p: &Param) -> peft_core::Result<Array2<f32>> {
    p.value().to_owned().into_dimensionality::<Ix2>().map_err(|_| {
        crate::LoraError::NotMatrix {
            method: "structured",
            what: p.name().into(),
            expected: "a matrix",
            shape: p.shape(),
        }
        .into()
    })
}

#[cfg(test)]
pub(crate) mod fdcheck {
    //! Finite-difference checks of adapter parameters through a model forward (f32 forwards, f64 sums).

    use peft_core::{Param, Tensor};

    /// Central differences of `loss()` w.r.t. every entry of `p`.
    pub fn fd(loss: &dyn Fn() -> f64, p: &Param, eps: f32) -> Vec<f64> {
        (0..p.numel())
            .map(|i| {
                let v0 = p.value().to_owned();
                let mut vp = v0.clone();
                vp.as_slice_mut().expect("contiguous")[i] += eps;
                p.set(vp).expect("set");
                let lp = loss();
                let mut vm = v0.clone();
                vm.as_slice_mut().expect("contiguous")[i] -= eps;
                p.set(vm).expect("set");
                let lm = loss();
                p.set(v0).expect("set");
                (lp - lm) / (2.0 * f64::from(eps))
            })
            .collect()
    }

    /// Checks the gradient of the scalar `f()` w.r.t. each of `params` against central differences.
    pub fn check(f: &dyn Fn() -> Tensor, params: &[Param], eps: f32, tol: f64) {
        let g = f().backward().expect("backward");
        let scalar = || f64::from(peft_core::autograd::no_grad(f).item().expect("scalar"));
        for p in params {
            let zeros = ndarray::ArrayD::zeros(ndarray::IxDyn(&p.shape()));
            let an = g.get_id(p.id()).map_or(zeros, |a| a.to_owned());
            let num = fd(&scalar, p, eps);
            let scale = num.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, n)) in an.iter().zip(&num).enumerate() {
                assert!(
                    (f64::from(*a) - n).abs() <= tol * scale,
                    "{}[{i}]: analytic {a} vs numeric {n} (scale {scale})",
                    p.name()
                );
            }
        }
    }
}
