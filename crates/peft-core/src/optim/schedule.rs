//! Learning-rate schedules: the factor the base rate is multiplied by at each step (Hugging Face's `LambdaLR`s).

/// A learning-rate schedule: `lr_factor(step)` multiplies every group's base learning rate.
///
/// Step `k` is the `k`-th optimizer step counted from 0, as with PyTorch's `LambdaLR` (whose factor for the
/// first step is `lambda(0)`): call `opt.set_lr_factor(s.lr_factor(k))` before the `k`-th `opt.step`.
/// Any `Fn(usize) -> f64` is a schedule.
pub trait LrSchedule {
    /// The factor at optimizer step `step` (0-based).
    fn lr_factor(&self, step: usize) -> f64;
}

impl<F: Fn(usize) -> f64> LrSchedule for F {
    fn lr_factor(&self, step: usize) -> f64 {
        self(step)
    }
}

/// The schedules of `transformers.optimization`, with the same formulas.
///
/// ```
/// use peft_core::optim::{LrSchedule, Schedule};
/// let s = Schedule::linear(10, 100);
/// assert_eq!(s.lr_factor(0), 0.0);
/// assert_eq!(s.lr_factor(5), 0.5);
/// assert_eq!(s.lr_factor(10), 1.0);
/// assert_eq!(s.lr_factor(55), 0.5);
/// assert_eq!(s.lr_factor(100), 0.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Factor 1 throughout (`get_constant_schedule`).
    Constant,
    /// Linear warmup from 0 to 1 over `warmup` steps, then 1 (`get_constant_schedule_with_warmup`).
    ConstantWithWarmup {
        /// Warmup steps.
        warmup: usize,
    },
    /// Linear warmup over `warmup` steps, then linear decay to 0 at step `total`
    /// (`get_linear_schedule_with_warmup`); 0 from `total` on.
    Linear {
        /// Warmup steps.
        warmup: usize,
        /// Total training steps.
        total: usize,
    },
    /// Linear warmup over `warmup` steps, then `0.5·(1 + cos(π·2·num_cycles·progress))` with
    /// `progress = (step − warmup)/(total − warmup)` (`get_cosine_schedule_with_warmup`; `num_cycles = 0.5` decays
    /// once from 1 to 0). Like HF, the formula is not clamped past `total`.
    Cosine {
        /// Warmup steps.
        warmup: usize,
        /// Total training steps.
        total: usize,
        /// Number of cosine half-periods ×0.5; HF's default 0.5 is one decay to 0.
        num_cycles: f64,
    },
}

impl Schedule {
    /// Linear warmup then linear decay to 0 at `total` (HF `get_linear_schedule_with_warmup`).
    pub fn linear(warmup: usize, total: usize) -> Self {
        Schedule::Linear { warmup, total }
    }

    /// Linear warmup then a half-cosine decay to 0 at `total` (HF `get_cosine_schedule_with_warmup`).
    pub fn cosine(warmup: usize, total: usize) -> Self {
        Schedule::Cosine { warmup, total, num_cycles: 0.5 }
    }
}

/// `step / max(1, warmup)` while warming up.
fn warmup_factor(step: usize, warmup: usize) -> Option<f64> {
    (step < warmup).then(|| step as f64 / warmup.max(1) as f64)
}

impl LrSchedule for Schedule {
    fn lr_factor(&self, step: usize) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup { warmup } => warmup_factor(step, warmup).unwrap_or(1.0),
            Schedule::Linear { warmup, total } => warmup_factor(step, warmup).unwrap_or_else(|| {
                let left = total as f64 - step as f64;
                (left / total.saturating_sub(warmup).max(1) as f64).max(0.0)
            }),
            Schedule::Cosine { warmup, total, num_cycles } => warmup_factor(step, warmup).unwrap_or_else(|| {
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Values from `tests/ref/optim_reference.py` (the HF lambdas in Python).
    #[test]
    fn linear_and_cosine_match_hf_at_key_steps() {
        let lin = Schedule::linear(10, 100);
        let cos = Schedule::cosine(10, 100);
        let table = [
            (0, 0.0, 0.0),
            (1, 0.1, 0.1),
            (5, 0.5, 0.5),
            (10, 1.0, 1.0),
            (11, 0.9888888888888889, 0.9996954135095479),
            (55, 0.5, 0.5),
            (99, 0.011111111111111112, 0.00030458649045211894),
            (100, 0.0, 0.0),
            (101, 0.0, 0.00030458649045211894),
        ];
        for (step, l, c) in table {
            assert!(close(lin.lr_factor(step), l), "linear at {step}: {}", lin.lr_factor(step));
            assert!(close(cos.lr_factor(step), c), "cosine at {step}: {}", cos.lr_factor(step));
        }
    }

    #[test]
    fn cosine_with_two_cycles_restarts() {
        let s = Schedule::Cosine { warmup: 0, total: 8, num_cycles: 2.0 };
        let want = [1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0];
        for (step, w) in want.iter().enumerate() {
            assert!(close(s.lr_factor(step), *w), "step {step}: {}", s.lr_factor(step));
        }
    }

    #[test]
    fn constant_and_warmup_variants() {
        assert_eq!(Schedule::Constant.lr_factor(0), 1.0);
        assert_eq!(Schedule::Constant.lr_factor(1_000_000), 1.0);
        let w = Schedule::ConstantWithWarmup { warmup: 4 };
        assert_eq!([0, 1, 2, 4, 100].map(|s| w.lr_factor(s)), [0.0, 0.25, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn zero_warmup_and_degenerate_totals_stay_finite() {
        let lin = Schedule::linear(0, 0);
        assert_eq!([0, 1, 5].map(|s| lin.lr_factor(s)), [0.0, 0.0, 0.0]);
        assert_eq!(Schedule::linear(0, 10).lr_factor(0), 1.0);
        assert_eq!(Schedule::cosine(0, 10).lr_factor(0), 1.0);
        // Warmup longer than training: HF's formulas give warmup values, then 0.
        let long = Schedule::linear(20, 10);
        assert_eq!(long.lr_factor(10), 0.5);
        assert_eq!(long.lr_factor(20), 0.0);
        assert!(Schedule::cosine(20, 10).lr_factor(25).is_finite());
    }

    #[test]
    fn closures_are_schedules() {
        let halve_every_10 = |step: usize| 0.5f64.powi((step / 10) as i32);
        assert_eq!(halve_every_10.lr_factor(25), 0.25);
    }
}
