//! AdamW with decoupled weight decay, exactly as `torch.optim.AdamW` (single-tensor path, no amsgrad).

use std::collections::{BTreeMap, HashMap};

use ndarray::ArrayD;

use super::{
    check_state_dict, fused2, row_major, slice_mut, Groups, Optimizer, ParamGroup, ParamState, StateDict, Update,
};
use crate::autograd::GradStore;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::param::Param;
use crate::tensor::TensorId;

const KIND: &str = "adamw";
const BUFFERS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// The hyperparameters AdamW shares across groups (learning rate and weight decay live in [`ParamGroup`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Decay rates of the first and second moment estimates (PyTorch default `(0.9, 0.999)`).
    pub betas: (f64, f64),
    /// Added to the bias-corrected root of the second moment (PyTorch default `1e-8`).
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { betas: (0.9, 0.999), eps: 1e-8 }
    }
}

struct AdamState<E: Elem> {
    step: u64,
    exp_avg: ArrayD<E>,
    exp_avg_sq: ArrayD<E>,
}

/// AdamW (Loshchilov & Hutter), matching `torch.optim.AdamW(params, lr, betas, eps, weight_decay)`.
///
/// For each trainable parameter `p` with gradient `g`, at its `t`-th update with group rate `lr` (times the
/// schedule factor) and weight decay `wd`:
/// ```text
/// p ← p · (1 − lr·wd)
/// m ← m + (1 − β₁)(g − m)            v ← β₂·v + (1 − β₂)·g²
/// p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
/// ```
/// State (`exp_avg`, `exp_avg_sq`, per-parameter step) is keyed by parameter id and created on a parameter's
/// first update. Large tensors are updated in one fused parallel pass, in place.
///
/// ```
/// use peft_core::optim::{AdamW, Optimizer};
/// use peft_core::Param;
/// let p = Param::new("w", ndarray::arr1(&[1.0f32, -2.0]).into_dyn(), true);
/// let mut opt = AdamW::with_lr(vec![p.clone()], 0.1, 0.0)?;
/// let grads = p.tensor().square().sum_all().backward()?;
/// opt.step(&grads)?;
/// // The first Adam step moves each coordinate by about lr against the gradient's sign.
/// let v = p.value();
/// assert!((v[[0]] - 0.9).abs() < 1e-6 && (v[[1]] + 1.9).abs() < 1e-6);
/// # Ok::<(), peft_core::Error>(())
/// ```
pub struct AdamW<E: Elem = f32> {
    cfg: AdamWConfig,
    groups: Groups<E>,
    state: HashMap<TensorId, AdamState<E>>,
    steps: u64,
}

impl<E: Elem> AdamW<E> {
    /// AdamW over parameter groups.
    ///
    /// # Errors
    /// [`crate::Error::Arg`] for betas outside `[0, 1)`, a negative or non-finite `eps`, a negative or
    /// non-finite group rate or weight decay, or [`crate::Error::DuplicateParam`] for a parameter listed twice.
    pub fn new(groups: Vec<ParamGroup<E>>, cfg: AdamWConfig) -> Result<Self> {
        let (b1, b2) = cfg.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(Error::arg("AdamW", "betas", format!("{:?}", cfg.betas), "each must lie in [0, 1)"));
        }
        if !(cfg.eps.is_finite() && cfg.eps >= 0.0) {
            return Err(Error::arg("AdamW", "eps", cfg.eps, "must be finite and >= 0"));
        }
        Ok(AdamW { cfg, groups: Groups::new("AdamW", groups)?, state: HashMap::new(), steps: 0 })
    }

    /// AdamW over one group with the default betas and eps.
    ///
    /// # Errors
    /// As [`AdamW::new`].
    pub fn with_lr(params: Vec<Param<E>>, lr: f64, weight_decay: f64) -> Result<Self> {
        Self::new(vec![ParamGroup::new(params, lr, weight_decay)], AdamWConfig::default())
    }

    /// The shared hyperparameters.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }
}

impl<E: Elem> Optimizer<E> for AdamW<E> {
    fn step(&mut self, grads: &GradStore<E>) -> Result<()> {
        let plan = self.groups.plan("AdamW::step", grads)?;
        let (b1, b2) = self.cfg.betas;
        for Update { param: p, grad: g, lr, weight_decay: wd } in plan {
            let st = self.state.entry(p.id()).or_insert_with(|| AdamState {
                step: 0,
                exp_avg: ArrayD::zeros(g.raw_dim()),
                exp_avg_sq: ArrayD::zeros(g.raw_dim()),
            });
            st.step += 1;
            // Scalars as PyTorch computes them: in double precision, then cast to the tensor's type.
            let t = st.step as f64;
            let bias_correction1 = 1.0 - b1.powf(t);
            let bias_correction2 = 1.0 - b2.powf(t);
            let decay = E::of(1.0 - lr * wd);
            let step_size = E::of(lr / bias_correction1);
            let bc2_sqrt = E::of(bias_correction2.sqrt());
            let w1 = E::of(1.0 - b1);
            let beta2 = E::of(b2);
            let w2 = E::of(1.0 - b2);
            let eps = E::of(self.cfg.eps);
            let kernel = |p: &mut E, g: E, m: &mut E, v: &mut E| {
                let pd = *p * decay;
                *m = lerp(*m, g, w1);
                *v = *v * beta2 + w2 * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p = pd - step_size * (*m / denom);
            };
            let g = row_major(g);
            let g = g.as_slice().expect("peft-rs bug: standard layout");
            let (m, v) = (slice_mut(&mut st.exp_avg), slice_mut(&mut st.exp_avg_sq));
            p.update(|pv| fused2(slice_mut(pv), g, m, v, kernel));
        }
        self.steps += 1;
        Ok(())
    }

    fn set_lr_factor(&mut self, factor: f64) {
        self.groups.lr_factor = factor;
    }

    fn lr_factor(&self) -> f64 {
        self.groups.lr_factor
    }

    fn groups(&self) -> &[ParamGroup<E>] {
        &self.groups.groups
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn state_dict(&self) -> StateDict<E> {
        let names = self.groups.names();
        let params = self
            .state
            .iter()
            .filter_map(|(id, st)| {
                let name = names.get(id)?;
                let buffers = BTreeMap::from([
                    (BUFFERS[0].to_string(), st.exp_avg.clone()),
                    (BUFFERS[1].to_string(), st.exp_avg_sq.clone()),
                ]);
                Some((name.to_string(), ParamState { step: st.step, buffers }))
            })
            .collect();
        StateDict { kind: KIND.into(), steps: self.steps, params }
    }

    fn load_state_dict(&mut self, state: &StateDict<E>) -> Result<()> {
        let checked = check_state_dict("AdamW::load_state_dict", KIND, &BUFFERS, &self.groups, state)?;
        self.state = checked
            .into_iter()
            .map(|(p, ps)| {
                let st = AdamState {
                    step: ps.step,
                    exp_avg: ps.buffers[BUFFERS[0]].clone(),
                    exp_avg_sq: ps.buffers[BUFFERS[1]].clone(),
                };
                (p.id(), st)
            })
            .collect();
        self.steps = state.steps;
        Ok(())
    }
}

/// `torch.lerp(start, end, weight)` as ATen's CPU kernel computes it.
#[inline]
fn lerp<E: Elem>(start: E, end: E, weight: E) -> E {
    if weight.abs() < E::of(0.5) {
        start + weight * (end - start)
    } else {
        end - (end - start) * (E::one() - weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::PAR_ELEMWISE;
    use crate::error::Error;
    use crate::optim::test_util::{assert_close, grads_for};
    use ndarray::{arr1, IxDyn};

    /// Reference: torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1) on
    /// p0 = [0.5, -1.0, 2.0] with gradients [0.1, -0.2, 0.3], [-0.3, 0.1, 0.2], [0.05, 0.0, -0.4], computed with
    /// Python floats (double) following `_single_tensor_adamw` line by line (`tests/ref/optim_reference.py`).
    #[test]
    fn three_steps_match_pytorch_reference() {
        let p = Param::new("w", arr1(&[0.5f32, -1.0, 2.0]).into_dyn(), true);
        let mut opt = AdamW::new(vec![ParamGroup::new(vec![p.clone()], 0.1, 0.1)], AdamWConfig::default()).unwrap();
        let want = [
            [0.395000009999999, -0.8900000049999998, 1.8800000033333333],
            [0.4404689910200654, -0.8544663026686757, 1.7641647942967698],
            [0.46381411898210584, -0.8253337108788344, 1.7437937431083594],
        ];
        let gs = [[0.1f32, -0.2, 0.3], [-0.3, 0.1, 0.2], [0.05, 0.0, -0.4]];
        for (g, w) in gs.iter().zip(&want) {
            opt.step(&grads_for(&[(&p, g)])).unwrap();
            assert_close(p.value().as_slice().unwrap(), w, 1e-5);
        }
        let sd = opt.state_dict();
        assert_eq!(sd.steps, 3);
        assert_eq!(sd.params["w"].step, 3);
        assert_close(
            sd.params["w"].buffers["exp_avg"].as_slice().unwrap(),
            &[-0.013899999999999996, -0.007200000000000001, 0.0022999999999999965],
            1e-5,
        );
        assert_close(
            sd.params["w"].buffers["exp_avg_sq"].as_slice().unwrap(),
            &[0.00010239001000000008, 4.991004000000006e-05, 0.0002897800900000003],
            1e-5,
        );
    }

    /// A large `eps` and small betas make the placement of `eps` (outside the root) and the bias corrections
    /// visible at f32 precision. Reference from `tests/ref/optim_reference.py`.
    #[test]
    fn eps_outside_sqrt_and_bias_correction_match_pytorch() {
        let p = Param::new("w", arr1(&[0.5f32, -1.0, 2.0]).into_dyn(), true);
        let cfg = AdamWConfig { betas: (0.5, 0.6), eps: 0.1 };
        let mut opt = AdamW::new(vec![ParamGroup::new(vec![p.clone()], 0.1, 0.1)], cfg).unwrap();
        let want = [
            [0.445, -0.9233333333333333, 1.905],
            [0.48886632475943925, -0.9141, 1.8178003965746519],
            [0.4995558857255671, -0.9049590000000001, 1.829365209741636],
        ];
        let gs = [[0.1f32, -0.2, 0.3], [-0.3, 0.1, 0.2], [0.05, 0.0, -0.4]];
        for (g, w) in gs.iter().zip(&want) {
            opt.step(&grads_for(&[(&p, g)])).unwrap();
            assert_close(p.value().as_slice().unwrap(), w, 1e-5);
        }
        let sd = opt.state_dict();
        assert_close(sd.params["w"].buffers["exp_avg_sq"].as_slice().unwrap(), &[0.02404, 0.00816, 0.08656], 1e-5);
    }

    /// Two groups (lr 0.1 / wd 0.5 and lr 0.01 / wd 0) and a schedule factor of 0.5: each group uses its own
    /// rate and decay. Reference from `tests/ref/optim_reference.py`.
    #[test]
    fn groups_use_their_own_lr_and_weight_decay() {
        let a = Param::new("a.weight", arr1(&[1.0f32, -1.0]).into_dyn(), true);
        let b = Param::new("a.bias", arr1(&[1.0f32, -1.0]).into_dyn(), true);
        let groups = vec![ParamGroup::new(vec![a.clone()], 0.1, 0.5), ParamGroup::new(vec![b.clone()], 0.01, 0.0)];
        let mut opt = AdamW::new(groups, AdamWConfig::default()).unwrap();
        opt.set_lr_factor(0.5);
        let g = [0.2f32, -0.4];
        opt.step(&grads_for(&[(&a, &g), (&b, &g)])).unwrap();
        // lr_eff 0.05, wd 0.5: p·(1 − 0.025) − 0.05·sign(g); lr_eff 0.005, no decay.
        assert_close(a.value().as_slice().unwrap(), &[0.9250000024999998, -0.9250000012499999], 1e-5);
        assert_close(b.value().as_slice().unwrap(), &[0.99500000025, -0.995000000125], 1e-5);
    }

    #[test]
    fn frozen_and_gradless_params_are_untouched() {
        let trained = Param::new("t", arr1(&[1.0f32]).into_dyn(), true);
        let frozen = Param::new("f", arr1(&[1.0f32]).into_dyn(), true);
        let no_grad = Param::new("n", arr1(&[1.0f32]).into_dyn(), true);
        let mut opt = AdamW::with_lr(vec![trained.clone(), frozen.clone(), no_grad.clone()], 0.1, 0.1).unwrap();
        let gs = grads_for(&[(&trained, &[1.0]), (&frozen, &[1.0])]);
        frozen.set_trainable(false);
        opt.step(&gs).unwrap();
        assert_ne!(trained.value()[[0]], 1.0);
        assert_eq!(frozen.value()[[0]], 1.0);
        assert_eq!(no_grad.value()[[0]], 1.0, "no gradient means no weight decay either");
        let sd = opt.state_dict();
        assert_eq!(sd.params.keys().collect::<Vec<_>>(), ["t"]);
    }

    #[test]
    fn non_finite_gradient_leaves_params_and_state_unchanged() {
        let a = Param::new("a", arr1(&[0.5f32, -1.0]).into_dyn(), true);
        let b = Param::new("layer.b", arr1(&[2.0f32]).into_dyn(), true);
        let mut opt = AdamW::with_lr(vec![a.clone(), b.clone()], 0.1, 0.1).unwrap();
        opt.step(&grads_for(&[(&a, &[0.1, 0.2]), (&b, &[0.3])])).unwrap();
        let (a0, b0, sd0) = (a.value().to_owned(), b.value().to_owned(), opt.state_dict());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // `a` comes first and is fine: it must not be updated either.
            let err = opt.step(&grads_for(&[(&a, &[0.1, 0.2]), (&b, &[bad])])).unwrap_err();
            assert!(matches!(&err, Error::NonFinite { what } if what == "gradient of layer.b"), "{err}");
            assert_eq!(a.value(), a0);
            assert_eq!(b.value(), b0);
            assert_eq!(opt.state_dict(), sd0);
        }
        let err = opt.checked_step(f32::NAN, &grads_for(&[(&a, &[0.1, 0.2])])).unwrap_err();
        assert!(matches!(&err, Error::NonFinite { what } if what == "loss"));
        assert_eq!(a.value(), a0);
        assert_eq!(opt.state_dict(), sd0);
        // The optimizer continues from the last good state.
        opt.checked_step(1.0, &grads_for(&[(&a, &[0.1, 0.2]), (&b, &[0.3])])).unwrap();
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn state_bytes_counts_two_moments_and_a_counter_per_stepped_param() {
        let a = Param::new("a", arr1(&[0.5f32, -1.0, 2.0]).into_dyn(), true);
        let b = Param::new("b", ArrayD::<f32>::zeros(IxDyn(&[4, 5])), true);
        let mut opt = AdamW::with_lr(vec![a.clone(), b.clone()], 0.1, 0.0).unwrap();
        assert_eq!(opt.state_bytes(), 0, "no state before the first step");
        opt.step(&grads_for(&[(&a, &[0.1f32, 0.2, 0.3])])).unwrap();
        assert_eq!(opt.state_bytes(), 8 + 2 * 4 * 3, "only `a` has a gradient yet");
        opt.step(&grads_for(&[(&a, &[0.1f32, 0.2, 0.3]), (&b, &[0.5f32; 20])])).unwrap();
        assert_eq!(opt.state_bytes(), (8 + 2 * 4 * 3) + (8 + 2 * 4 * 20));
    }

    #[test]
    fn state_dict_round_trip_resumes_identically() {
        let mk = || Param::new("w", arr1(&[0.5f32, -1.0, 2.0]).into_dyn(), true);
        let gs = [[0.1f32, -0.2, 0.3], [-0.3, 0.1, 0.2], [0.05, 0.0, -0.4]];
        let (p1, p2) = (mk(), mk());
        let mut o1 = AdamW::with_lr(vec![p1.clone()], 0.1, 0.1).unwrap();
        let mut o2 = AdamW::with_lr(vec![p2.clone()], 0.1, 0.1).unwrap();
        o1.step(&grads_for(&[(&p1, &gs[0])])).unwrap();
        o2.step(&grads_for(&[(&p2, &gs[0])])).unwrap();
        // Resume o2 into a fresh optimizer over a fresh parameter with the same name and value.
        let p3 = Param::new("w", p2.value().to_owned(), true);
        let mut o3 = AdamW::with_lr(vec![p3.clone()], 0.1, 0.1).unwrap();
        o3.load_state_dict(&o2.state_dict()).unwrap();
        for g in &gs[1..] {
            o1.step(&grads_for(&[(&p1, g)])).unwrap();
            o3.step(&grads_for(&[(&p3, g)])).unwrap();
        }
        assert_eq!(p1.value(), p3.value());
        assert_eq!(o1.state_dict(), o3.state_dict());
    }

    #[test]
    fn load_state_dict_rejects_bad_state_and_keeps_current() {
        let p = Param::new("w", arr1(&[0.5f32, -1.0]).into_dyn(), true);
        let mut opt = AdamW::with_lr(vec![p.clone()], 0.1, 0.0).unwrap();
        opt.step(&grads_for(&[(&p, &[1.0, 1.0])])).unwrap();
        let good = opt.state_dict();

        let mut unknown = good.clone();
        let st = unknown.params.remove("w").unwrap();
        unknown.params.insert("other".into(), st);
        assert!(matches!(opt.load_state_dict(&unknown), Err(Error::UnknownName { name }) if name == "other"));

        let mut wrong_shape = good.clone();
        wrong_shape.params.get_mut("w").unwrap().buffers.insert("exp_avg".into(), ArrayD::zeros(IxDyn(&[3])));
        assert!(matches!(opt.load_state_dict(&wrong_shape), Err(Error::Shape { .. })));

        let mut missing = good.clone();
        missing.params.get_mut("w").unwrap().buffers.remove("exp_avg_sq");
        assert!(matches!(
            opt.load_state_dict(&missing),
            Err(Error::OptimizerState { problem: crate::StateProblem::MissingBuffer { .. }, .. })
        ));

        let mut kind = good.clone();
        kind.kind = "sgd".into();
        assert!(matches!(
            opt.load_state_dict(&kind),
            Err(Error::OptimizerState { problem: crate::StateProblem::Kind { .. }, .. })
        ));
        assert_eq!(opt.state_dict(), good);
    }

    #[test]
    fn non_contiguous_gradient_gives_the_same_update() {
        let init = ndarray::arr2(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]]).into_dyn();
        let g = ndarray::arr2(&[[0.1f32, -0.2, 0.3], [-0.3, 0.1, 0.2]]).into_dyn();
        let g_fortran = g.t().as_standard_layout().t().to_owned();
        assert!(!g_fortran.is_standard_layout());
        let (a, b) = (Param::new("a", init.clone(), true), Param::new("b", init, true));
        let mut opt = AdamW::with_lr(vec![a.clone(), b.clone()], 0.1, 0.1).unwrap();
        let mut gs = GradStore::default();
        gs.insert(a.id(), g.clone());
        gs.insert(b.id(), g_fortran);
        opt.step(&gs).unwrap();
        assert_eq!(a.value(), b.value());
    }

    #[test]
    fn gradient_shape_mismatch_is_an_error() {
        let p = Param::new("w", arr1(&[0.5f32, -1.0]).into_dyn(), true);
        let mut opt = AdamW::with_lr(vec![p.clone()], 0.1, 0.0).unwrap();
        let mut gs = GradStore::default();
        gs.insert(p.id(), ArrayD::zeros(IxDyn(&[3])));
        assert!(matches!(opt.step(&gs), Err(Error::Shape { .. })));
        assert_eq!(opt.steps(), 0);
    }

    #[test]
    fn bad_hyperparameters_are_rejected() {
        let p = Param::new("w", arr1(&[0.5f32]).into_dyn(), true);
        let g = |betas, eps| AdamW::new(vec![ParamGroup::new(vec![p.clone()], 0.1, 0.0)], AdamWConfig { betas, eps });
        assert!(matches!(g((1.0, 0.999), 1e-8), Err(Error::Arg { .. })));
        assert!(matches!(g((0.9, -0.1), 1e-8), Err(Error::Arg { .. })));
        assert!(matches!(g((0.9, 0.999), f64::NAN), Err(Error::Arg { .. })));
        let mut opt = g((0.9, 0.999), 1e-8).unwrap();
        opt.set_lr_factor(f64::NAN);
        let gs = grads_for(&[(&p, &[1.0])]);
        assert!(matches!(opt.step(&gs), Err(Error::Arg { .. })));
        assert_eq!(p.value()[[0]], 0.5);
    }

    #[test]
    fn large_tensor_parallel_path_matches_serial() {
        let n = PAR_ELEMWISE + 7;
        let init: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 10.0).collect();
        let grad: Vec<f32> = (0..n).map(|i| ((i % 31) as f32 - 15.0) / 7.0).collect();
        let big = Param::new("big", ArrayD::from_shape_vec(IxDyn(&[n]), init.clone()).unwrap(), true);
        let mut opt = AdamW::with_lr(vec![big.clone()], 0.01, 0.1).unwrap();
        for _ in 0..2 {
            opt.step(&grads_for(&[(&big, &grad)])).unwrap();
        }
        // The same update element by element on small params (serial path).
        for i in [0, 1, 500, n - 1] {
            let s = Param::new("s", arr1(&[init[i]]).into_dyn(), true);
            let mut o = AdamW::with_lr(vec![s.clone()], 0.01, 0.1).unwrap();
            for _ in 0..2 {
                o.step(&grads_for(&[(&s, &[grad[i]])])).unwrap();
            }
            assert_eq!(s.value()[[0]], big.value()[[i]]);
        }
    }
}
