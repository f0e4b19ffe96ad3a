//! Stochastic gradient descent with momentum, exactly as `torch.optim.SGD` (single-tensor path).

use std::collections::{BTreeMap, HashMap};

use ndarray::{ArrayD, IxDyn};

use super::{
    check_state_dict, fused0, fused1, row_major, slice_mut, Groups, Optimizer, ParamGroup, ParamState, StateDict,
    Update,
};
use crate::autograd::GradStore;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::param::Param;
use crate::tensor::TensorId;

const KIND: &str = "sgd";
const BUFFERS: [&str; 1] = ["momentum_buffer"];

/// The hyperparameters SGD shares across groups (learning rate and weight decay live in [`ParamGroup`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SgdConfig {
    /// Momentum factor (0 disables the momentum buffer).
    pub momentum: f64,
    /// Dampening of the gradient added to the momentum buffer (PyTorch default 0).
    pub dampening: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`, as in PyTorch).
    pub nesterov: bool,
}

/// SGD matching `torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)`.
///
/// For each trainable parameter `p` with gradient `g`, with group rate `lr` (times the schedule factor) and
/// weight decay `wd` (an L2 term, not decoupled):
/// ```text
/// d ← g + wd·p
/// b ← d on the first step, else μ·b + (1 − dampening)·d     (only when μ ≠ 0)
/// d ← d + μ·b if nesterov, else b                           (only when μ ≠ 0)
/// p ← p − lr·d
/// ```
///
/// ```
/// use peft_core::optim::{Optimizer, Sgd};
/// use peft_core::Param;
/// let p = Param::new("w", ndarray::arr1(&[1.0f32, -2.0]).into_dyn(), true);
/// let mut opt = Sgd::with_lr(vec![p.clone()], 0.1, 0.0)?;
/// let grads = p.tensor().square().sum_all().backward()?; // 2p
/// opt.step(&grads)?;
/// assert_eq!(p.value().as_slice().unwrap(), &[0.8, -1.6]);
/// # Ok::<(), peft_core::Error>(())
/// ```
pub struct Sgd<E: Elem = f32> {
    cfg: SgdConfig,
    groups: Groups<E>,
    momentum_buffers: HashMap<TensorId, ArrayD<E>>,
    steps: u64,
}

impl<E: Elem> Sgd<E> {
    /// SGD over parameter groups.
    ///
    /// # Errors
    /// [`crate::Error::Arg`] for a negative or non-finite momentum or dampening, Nesterov without momentum or
    /// with dampening, a negative or non-finite group rate or weight decay, or a parameter listed twice.
    pub fn new(groups: Vec<ParamGroup<E>>, cfg: SgdConfig) -> Result<Self> {
        if !(cfg.momentum.is_finite() && cfg.momentum >= 0.0) {
            return Err(Error::arg("Sgd", "momentum", cfg.momentum, "must be finite and >= 0"));
        }
        if !cfg.dampening.is_finite() {
            return Err(Error::arg("Sgd", "dampening", cfg.dampening, "must be finite"));
        }
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            return Err(Error::arg(
                "Sgd",
                "nesterov",
                format!("true (momentum {}, dampening {})", cfg.momentum, cfg.dampening),
                "Nesterov momentum requires a momentum > 0 and zero dampening",
            ));
        }
        Ok(Sgd { cfg, groups: Groups::new("Sgd", groups)?, momentum_buffers: HashMap::new(), steps: 0 })
    }

    /// SGD over one group with the given momentum, no dampening, no Nesterov and no weight decay.
    ///
    /// # Errors
    /// As [`Sgd::new`].
    pub fn with_lr(params: Vec<Param<E>>, lr: f64, momentum: f64) -> Result<Self> {
        Self::new(vec![ParamGroup::new(params, lr, 0.0)], SgdConfig { momentum, ..SgdConfig::default() })
    }

    /// The shared hyperparameters.
    pub fn config(&self) -> SgdConfig {
        self.cfg
    }
}

impl<E: Elem> Optimizer<E> for Sgd<E> {
    fn step(&mut self, grads: &GradStore<E>) -> Result<()> {
        let plan = self.groups.plan("Sgd::step", grads)?;
        let SgdConfig { momentum, dampening, nesterov } = self.cfg;
        let (mu, damp) = (E::of(momentum), E::of(1.0 - dampening));
        for Update { param: p, grad: g, lr, weight_decay: wd } in plan {
            let (lr, wd) = (E::of(lr), E::of(wd));
            // The gradient with the L2 term, as `grad.add(param, alpha=weight_decay)` computes it.
            let d = move |p: E, g: E| if wd != E::zero() { g + wd * p } else { g };
            let g = row_major(g);
            let g = g.as_slice().expect("peft-rs bug: standard layout");
            if momentum == 0.0 {
                p.update(|pv| fused0(slice_mut(pv), g, |p, g| *p -= lr * d(*p, g)));
                continue;
            }
            let first = !self.momentum_buffers.contains_key(&p.id());
            let buf = self.momentum_buffers.entry(p.id()).or_insert_with(|| ArrayD::zeros(IxDyn(&p.shape())));
            let kernel = |p: &mut E, g: E, b: &mut E| {
                let dp = d(*p, g);
                *b = if first { dp } else { *b * mu + damp * dp };
                let step = if nesterov { dp + mu * *b } else { *b };
                *p -= lr * step;
            };
            let buf = slice_mut(buf);
            p.update(|pv| fused1(slice_mut(pv), g, buf, kernel));
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

    /// Momentum buffers keyed by name; the per-parameter `step` is the optimizer's step count (SGD keeps none).
    fn state_dict(&self) -> StateDict<E> {
        let names = self.groups.names();
        let params = self
            .momentum_buffers
            .iter()
            .filter_map(|(id, b)| {
                let name = names.get(id)?;
                let buffers = BTreeMap::from([(BUFFERS[0].to_string(), b.clone())]);
                Some((name.to_string(), ParamState { step: self.steps, buffers }))
            })
            .collect();
        StateDict { kind: KIND.into(), steps: self.steps, params }
    }

    fn load_state_dict(&mut self, state: &StateDict<E>) -> Result<()> {
        let checked = check_state_dict("Sgd::load_state_dict", KIND, &BUFFERS, &self.groups, state)?;
        self.momentum_buffers = checked.into_iter().map(|(p, ps)| (p.id(), ps.buffers[BUFFERS[0]].clone())).collect();
        self.steps = state.steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::optim::test_util::{assert_close, grads_for};
    use ndarray::arr1;

    const P0: [f32; 3] = [0.5, -1.0, 2.0];
    const GS: [[f32; 3]; 3] = [[0.1, -0.2, 0.3], [-0.3, 0.1, 0.2], [0.05, 0.0, -0.4]];

    /// Runs three steps of SGD(lr=0.1, weight_decay=0.1, cfg) from P0 over GS; returns the params after each
    /// step and the optimizer.
    fn run(cfg: SgdConfig) -> (Vec<Vec<f32>>, Sgd) {
        let p = Param::new("w", arr1(&P0).into_dyn(), true);
        let mut opt = Sgd::new(vec![ParamGroup::new(vec![p.clone()], 0.1, 0.1)], cfg).unwrap();
        let mut out = Vec::new();
        for g in &GS {
            opt.step(&grads_for(&[(&p, g)])).unwrap();
            out.push(p.value().as_slice().unwrap().to_vec());
        }
        (out, opt)
    }

    /// References from `tests/ref/optim_reference.py` (`_single_tensor_sgd` in Python floats).
    #[test]
    fn plain_sgd_with_weight_decay_matches_pytorch_reference() {
        let (got, opt) = run(SgdConfig::default());
        let want = [
            [0.485, -0.97, 1.95],
            [0.51015, -0.9702999999999999, 1.9104999999999999],
            [0.5000485, -0.9605969999999999, 1.931395],
        ];
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-6);
        }
        assert!(opt.state_dict().params.is_empty(), "no momentum, no buffer");
    }

    #[test]
    fn momentum_with_dampening_matches_pytorch_reference() {
        let (got, opt) = run(SgdConfig { momentum: 0.9, dampening: 0.1, nesterov: false });
        let want = [
            [0.485, -0.97, 1.95],
            [0.494135, -0.9432699999999999, 1.86945],
            [0.493409285, -0.9107235699999999, 1.81612995],
        ];
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-6);
        }
        let sd = opt.state_dict();
        assert_close(
            sd.params["w"].buffers["momentum_buffer"].as_slice().unwrap(),
            &[0.007257150000000032, -0.3254643000000001, 0.5332005000000001],
            1e-5,
        );
    }

    #[test]
    fn nesterov_matches_pytorch_reference() {
        let (got, opt) = run(SgdConfig { momentum: 0.9, dampening: 0.0, nesterov: true });
        let want = [
            [0.4715, -0.943, 1.905],
            [0.5073915, -0.9197829999999999, 1.790305],
            [0.4977969115, -0.8808988229999999, 1.764208705],
        ];
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-6);
        }
        let sd = opt.state_dict();
        assert_close(
            sd.params["w"].buffers["momentum_buffer"].as_slice().unwrap(),
            &[-0.005325849999999993, -0.3298483000000001, 0.5354805],
            1e-5,
        );
    }

    #[test]
    fn nesterov_needs_momentum_and_no_dampening() {
        let p = Param::new("w", arr1(&[1.0f32]).into_dyn(), true);
        let groups = || vec![ParamGroup::new(vec![p.clone()], 0.1, 0.0)];
        let bad = [
            SgdConfig { momentum: 0.0, dampening: 0.0, nesterov: true },
            SgdConfig { momentum: 0.9, dampening: 0.1, nesterov: true },
            SgdConfig { momentum: -0.9, dampening: 0.0, nesterov: false },
        ];
        for cfg in bad {
            assert!(matches!(Sgd::new(groups(), cfg), Err(Error::Arg { .. })), "{cfg:?}");
        }
    }

    #[test]
    fn non_finite_gradient_keeps_params_and_momentum() {
        let p = Param::new("w", arr1(&[1.0f32, 2.0]).into_dyn(), true);
        let mut opt = Sgd::with_lr(vec![p.clone()], 0.1, 0.9).unwrap();
        opt.step(&grads_for(&[(&p, &[1.0, 1.0])])).unwrap();
        let (v0, sd0) = (p.value().to_owned(), opt.state_dict());
        let err = opt.step(&grads_for(&[(&p, &[1.0, f32::NAN])])).unwrap_err();
        assert!(matches!(&err, Error::NonFinite { what } if what == "gradient of w"));
        assert_eq!(p.value(), v0);
        assert_eq!(opt.state_dict(), sd0);
    }

    #[test]
    fn state_dict_round_trip_resumes_identically() {
        let cfg = SgdConfig { momentum: 0.9, dampening: 0.0, nesterov: true };
        let (full, _) = run(cfg);
        let p = Param::new("w", arr1(&P0).into_dyn(), true);
        let mut first = Sgd::new(vec![ParamGroup::new(vec![p.clone()], 0.1, 0.1)], cfg).unwrap();
        first.step(&grads_for(&[(&p, &GS[0])])).unwrap();
        let q = Param::new("w", p.value().to_owned(), true);
        let mut resumed = Sgd::new(vec![ParamGroup::new(vec![q.clone()], 0.1, 0.1)], cfg).unwrap();
        resumed.load_state_dict(&first.state_dict()).unwrap();
        for g in &GS[1..] {
            resumed.step(&grads_for(&[(&q, g)])).unwrap();
        }
        assert_eq!(q.value().as_slice().unwrap(), full[2].as_slice());
        assert_eq!(resumed.steps(), 3);
    }
}
