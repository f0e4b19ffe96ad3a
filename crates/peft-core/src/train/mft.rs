//! MFTCoder's multi-task losses (Liu et al. 2023, "MFTCoder: Boosting Code LLMs with Multitask Fine-Tuning"; spec
//! §1.4; reference `mftcoder_accelerate/src/utils/loss_utils.py` @8ba13f44) and CoBa's convergence-balanced task
//! weights (Gong et al. 2024, same file's `CoBaStatus`).
//!
//! A batch holds per-token losses `ℓ[b, t]` (cross-entropy with `reduction = none`), a mask of the tokens that count
//! (`m[b, t]`, 1 or 0; the reference's `loss_mask` or `labels != -100`) and one task id per sample. With
//! `T_b = Σ_t m[b, t]` and `S_b = Σ_t m[b, t]·ℓ[b, t]`, [`mft_loss`] computes:
//!
//! - [`MftBalance::Plain`] (`case1`): `Σ_b S_b / Σ_b T_b`, every token alike;
//! - [`MftBalance::SampleBalanced`] (`case2`): `mean_b S_b / T_b`, every sample alike;
//! - [`MftBalance::TaskBalanced`] (`case3`, the reference's default and CoBa's): per task `i` present,
//!   `L_i = Σ_{b∈i} S_b / Σ_{b∈i} T_b`, then `Σ_i w_i L_i / Σ_i w_i` over the present tasks (`w_i = 1/N` unless
//!   given);
//! - [`MftBalance::TaskSampleBalanced`] (`case4`): per task, the mean over its samples of `S_b / T_b`, then the
//!   same weighted mean over tasks.
//!
//! Deviation, on purpose: a sample without counted tokens (`T_b = 0`) is skipped by the per-sample means (the
//! reference divides by zero and returns NaN), a task whose samples hold no counted tokens is not "present", and a
//! batch with no counted token at all is [`Error::Empty`]. Differentiable in `ℓ` (built from tensor ops).
//!
//! [`Coba`] keeps the per-task validation-loss history and turns it into task weights for `case3`
//! ([`TaskWeights`] is the trainer-side [`LossWeighting`] that applies them to the per-task losses of a
//! [`crate::train::Loss::Tasks`] step). The focal-style and FAMO-style weightings the MFTCoder paper mentions are
//! not in the reference code and are not implemented.
//!
//! ```
//! use peft_core::train::mft::{mft_loss, MftBalance};
//! use peft_core::Tensor;
//!
//! // Task 0: one sample of 4 tokens, loss 1 each; task 1: one sample of 1 token, loss 3.
//! let l = Tensor::from_vec(vec![1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0], &[2, 4])?;
//! let m = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0];
//! let tokens = mft_loss(MftBalance::Plain, &l, &m, &[0, 1], None)?.item()?;
//! let tasks = mft_loss(MftBalance::TaskBalanced, &l, &m, &[0, 1], None)?.item()?;
//! assert!((tokens - 7.0 / 5.0).abs() < 1e-6); // every token alike
//! assert!((tasks - 2.0).abs() < 1e-6); // (1 + 3) / 2: every task alike
//! # Ok::<(), peft_core::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::tensor::Tensor;
use crate::train::LossWeighting;

/// How [`mft_loss`] balances tokens, samples and tasks (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MftBalance {
    /// `case1`: the mean over every counted token of the batch.
    Plain,
    /// `case2`: the mean over samples of each sample's token mean.
    SampleBalanced,
    /// `case3`: the weighted mean over present tasks of each task's token mean.
    TaskBalanced,
    /// `case4`: the weighted mean over present tasks of each task's mean of per-sample token means.
    TaskSampleBalanced,
}

/// The per-sample token sums `S_b` (a `[B]` tensor) and token counts `T_b` after checking the shapes.
fn per_sample(op: &'static str, losses: &Tensor, mask: &[f32], tasks: &[usize]) -> crate::Result<(Tensor, Vec<f64>)> {
    let [b, t] = losses.shape() else {
        return Err(Error::Rank {
            op,
            expected: "per-token losses of shape [batch, tokens]",
            shape: losses.shape().to_vec(),
        });
    };
    let (b, t) = (*b, *t);
    if mask.len() != b * t {
        return Err(Error::Count { op, what: "mask entries (one per token)", expected: b * t, got: mask.len() });
    }
    if tasks.len() != b {
        return Err(Error::Count { op, what: "task ids (one per sample)", expected: b, got: tasks.len() });
    }
    if let Some(v) = mask.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
        return Err(Error::arg(op, "mask", v, "must be finite and >= 0"));
    }
    let m = Tensor::from_vec(mask.to_vec(), &[b, t])?;
    let sums = losses.mul(&m)?.sum(&[1], false)?;
    // One count per sample, also when there are no token positions (`t = 0`: every count is 0).
    let counts = (0..b).map(|r| mask[r * t..(r + 1) * t].iter().map(|&v| f64::from(v)).sum()).collect();
    Ok((sums, counts))
}

/// `Σ_{b ∈ rows} x[b]` as a scalar tensor.
fn sum_rows(x: &Tensor, rows: &[usize]) -> crate::Result<Tensor> {
    Ok(x.index_select(0, rows)?.sum_all())
}

/// The mean over `rows` with counted tokens of `S_b / T_b` (`None` when no row has any).
fn mean_of_sample_means(sums: &Tensor, counts: &[f64], rows: &[usize]) -> crate::Result<Option<Tensor>> {
    let rows: Vec<usize> = rows.iter().copied().filter(|&r| counts[r] > 0.0).collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let inv: Vec<f32> = rows.iter().map(|&r| (1.0 / counts[r]) as f32).collect();
    let inv = Tensor::from_vec(inv, &[rows.len()])?;
    let means = sums.index_select(0, &rows)?.mul(&inv)?;
    Ok(Some(means.sum_all().mul_scalar(1.0 / rows.len() as f32)))
}

/// MFTCoder's loss of one batch (see the module docs): `losses [B, T]` per-token losses, `mask` the `B·T` token
/// weights (row-major; 1 counts, 0 does not), `tasks` one task id per sample, `weights` the task weights `w_i` of
/// the task-balanced modes (indexed by task id; `None`: all equal).
///
/// # Errors
/// [`Error::Rank`] unless `losses` is 2-D; [`Error::Count`] for a mask or task list of the wrong length, or a task
/// id without a weight; [`Error::Arg`] for a negative or non-finite mask entry or weight; [`Error::Empty`] when no
/// token counts (or every present task has weight 0).
pub fn mft_loss(
    balance: MftBalance,
    losses: &Tensor,
    mask: &[f32],
    tasks: &[usize],
    weights: Option<&[f64]>,
) -> crate::Result<Tensor> {
    let op = "mft_loss";
    let (sums, counts) = per_sample(op, losses, mask, tasks)?;
    let total: f64 = counts.iter().sum();
    if total <= 0.0 {
        return Err(Error::Empty { op, what: "the set of counted tokens" });
    }
    let all: Vec<usize> = (0..tasks.len()).collect();
    match balance {
        MftBalance::Plain => Ok(sums.sum_all().mul_scalar((1.0 / total) as f32)),
        MftBalance::SampleBalanced => {
            mean_of_sample_means(&sums, &counts, &all)?.ok_or(Error::Empty { op, what: "the set of counted tokens" })
        }
        MftBalance::TaskBalanced | MftBalance::TaskSampleBalanced => {
            let mut ids: Vec<usize> = tasks.to_vec();
            ids.sort_unstable();
            ids.dedup();
            if let Some(w) = weights {
                if let Some(&max) = ids.last() {
                    if max >= w.len() {
                        return Err(Error::Count {
                            op,
                            what: "task weights (one per task id)",
                            expected: max + 1,
                            got: w.len(),
                        });
                    }
                }
                if let Some(v) = w.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                    return Err(Error::arg(op, "weights", v, "must be finite and >= 0"));
                }
            }
            let mut terms = Vec::with_capacity(ids.len());
            for &i in &ids {
                let rows: Vec<usize> = all.iter().copied().filter(|&b| tasks[b] == i).collect();
                let li = if balance == MftBalance::TaskBalanced {
                    let n: f64 = rows.iter().map(|&r| counts[r]).sum();
                    if n <= 0.0 {
                        continue;
                    }
                    sum_rows(&sums, &rows)?.mul_scalar((1.0 / n) as f32)
                } else {
                    match mean_of_sample_means(&sums, &counts, &rows)? {
                        Some(t) => t,
                        None => continue,
                    }
                };
                terms.push((weights.map_or(1.0 / ids.len() as f64, |w| w[i]), li));
            }
            weighted_mean(&terms)?.ok_or(Error::Empty { op, what: "the set of present tasks with a positive weight" })
        }
    }
}

/// Each task's token-mean loss in the batch (`L_i` of `case3`, detached), indexed by task id up to `n_tasks`;
/// `None` for a task with no counted token (the reference logs 0 there). What [`Coba::observe`] takes for a
/// validation batch.
///
/// # Errors
/// As [`mft_loss`]'s shape checks; [`Error::Index`] for a task id `>= n_tasks`.
pub fn task_token_means(
    losses: &Tensor,
    mask: &[f32],
    tasks: &[usize],
    n_tasks: usize,
) -> crate::Result<Vec<Option<f64>>> {
    let op = "task_token_means";
    let (sums, counts) = per_sample(op, losses, mask, tasks)?;
    let sums: Vec<f64> = sums.as_slice().iter().map(|&v| f64::from(v)).collect();
    let mut s = vec![0.0f64; n_tasks];
    let mut n = vec![0.0f64; n_tasks];
    for (b, &i) in tasks.iter().enumerate() {
        if i >= n_tasks {
            return Err(Error::Index { op, index: i as i64, position: vec![b], axis: 0, size: n_tasks });
        }
        s[i] += sums[b];
        n[i] += counts[b];
    }
    Ok(s.iter().zip(&n).map(|(s, n)| (*n > 0.0).then(|| s / n)).collect())
}

/// CoBa (convergence-balanced) task weights from a per-task validation-loss history, as the reference's
/// `CoBaStatus` computes them (update interval 1, one validation batch per step):
///
/// - [`Coba::observe`] records the per-task validation losses measured after each optimizer step (the reference
///   samples after every completed step from the second on), divided by the first ones observed
///   ([`Coba::normalize_by_first`]);
/// - the weights for step `c` (`c` = observations + 1) are uniform until `c` reaches `warmup_steps`; afterwards
///   they come from least-squares slopes over the last `history_length` steps per task (zero points, i.e. steps
///   where the task was absent, skipped) and over the per-step maximum across tasks: a relative convergence
///   score `RCS = softmax(N·s_i / Σ|s|)`, an absolute one from each task's slope history (`ACS = softmax` over
///   tasks of the current `−K·s_i / Σ_k |s_i,k|`) and a divergence factor `DF = K'·softmax(τ·(−K'·s_tot /
///   Σ|s_tot|))[last]`, combined as `softmax(N·(DF·RCS + (1−DF)·ACS))` and floored at `1/(10N)` (rescaled so they
///   still sum to 1). A task whose loss still falls fast gets less weight; one that stalls or rises gets more.
///
/// Kept from the reference as it is: the slope fit pairs the non-zero points with the *first* steps of the window,
/// and the slope history is cut at the global window start (`[:, start_step:]`), which only drops columns once the
/// run is longer than `warmup + history_length`. Where every slope is 0 the reference divides by zero; the
/// normalised scores are 0 here.
///
/// Normalisation (spec §1.4: "validation loss normalised by its initial value"; the reference's
/// `valid_task_loss_begining` is created as ones and, in the code we read, never set) is configurable:
/// [`Coba::normalize_by_first`], on by default.
#[derive(Clone, Debug)]
pub struct Coba {
    n: usize,
    warmup_steps: usize,
    history_length: usize,
    tau: f64,
    normalize: bool,
    initial: Option<Vec<f64>>,
    /// Per observation, per task: validation loss (normalised; 0 when the task was absent).
    history: Vec<Vec<f64>>,
    /// One column per weight computation: per-task slopes, and the slope of the per-step maximum.
    task_slopes: Vec<Vec<f64>>,
    total_slopes: Vec<f64>,
    weights: Vec<f64>,
}

impl Coba {
    /// The reference's defaults: warmup 100 steps, history 200 points, τ = 5, for `n_tasks` tasks.
    pub fn new(n_tasks: usize) -> Self {
        Self::with(n_tasks, 100, 200, 5.0)
    }

    /// Custom warmup (at least 2), history length (at least 1) and temperature.
    pub fn with(n_tasks: usize, warmup_steps: usize, history_length: usize, tau: f64) -> Self {
        let n = n_tasks.max(1);
        Coba {
            n,
            warmup_steps: warmup_steps.max(2),
            history_length: history_length.max(1),
            tau,
            normalize: true,
            initial: None,
            history: Vec::new(),
            task_slopes: Vec::new(),
            total_slopes: Vec::new(),
            weights: vec![1.0 / n as f64; n],
        }
    }

    /// Whether losses are divided by the first observation's (true by default; false: raw losses, as the
    /// reference code runs).
    pub fn normalize_by_first(mut self, on: bool) -> Self {
        self.normalize = on;
        self
    }

    /// Records the validation losses measured after the step just taken (one per task, `None` for a task the
    /// validation batch did not hold) and computes the weights for the next step. The first call's losses are the
    /// normalisers (a task absent then, or at 0, normalises by 1).
    ///
    /// # Errors
    /// [`Error::Count`] for the wrong number of tasks; [`Error::Arg`] for a negative or non-finite loss.
    pub fn observe(&mut self, losses: &[Option<f64>]) -> crate::Result<()> {
        if losses.len() != self.n {
            return Err(Error::Count {
                op: "Coba::observe",
                what: "validation losses (one per task)",
                expected: self.n,
                got: losses.len(),
            });
        }
        if let Some(v) = losses.iter().flatten().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(Error::arg("Coba::observe", "validation loss", v, "must be finite and >= 0"));
        }
        let normalize = self.normalize;
        let init = self
            .initial
            .get_or_insert_with(|| {
                losses.iter().map(|l| if normalize { l.filter(|v| *v > 0.0).unwrap_or(1.0) } else { 1.0 }).collect()
            })
            .clone();
        self.history.push(losses.iter().zip(&init).map(|(l, i)| l.map_or(0.0, |v| v / i)).collect());
        let next_step = self.history.len() + 1;
        if next_step >= self.warmup_steps {
            self.recompute(next_step);
        }
        Ok(())
    }

    /// The task weights for the next step (sum 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The reference's `compute_per_task_weight(completed_steps = c)`, with the history of steps `1..c`.
    fn recompute(&mut self, c: usize) {
        let n = self.n;
        let start = c.saturating_sub(self.history_length);
        let xs: Vec<f64> = (start..c).map(|s| s as f64).collect();
        let take = (c - start).min(self.history.len());
        let window = &self.history[self.history.len() - take..];
        let slopes: Vec<f64> =
            (0..n).map(|i| window_slope(&xs, &window.iter().map(|h| h[i]).collect::<Vec<_>>())).collect();
        let max_curve: Vec<f64> = window.iter().map(|h| h.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect();
        let total = window_slope(&xs, &max_curve);
        self.task_slopes.push(slopes.clone());
        self.total_slopes.push(total);

        let abs_sum: f64 = slopes.iter().map(|s| s.abs()).sum();
        let rcs = softmax(&slopes.iter().map(|s| safe_div(n as f64 * s, abs_sum)).collect::<Vec<_>>());
        // ACS: each task's slope history from column `start` (the reference's `[:, start_step:]`; never empty
        // here), normalised by its own absolute sum and negated; the current column's softmax over tasks.
        let cols = &self.task_slopes[start.min(self.task_slopes.len() - 1)..];
        let k = cols.len() as f64;
        let current: Vec<f64> = (0..n)
            .map(|i| {
                let row_abs: f64 = cols.iter().map(|c| c[i].abs()).sum();
                safe_div(-k * cols[cols.len() - 1][i], row_abs)
            })
            .collect();
        let acs = softmax(&current);
        let kt = self.total_slopes.len() as f64;
        let tot_abs: f64 = self.total_slopes.iter().map(|s| s.abs()).sum();
        let norm: Vec<f64> = self.total_slopes.iter().map(|s| self.tau * safe_div(-kt * s, tot_abs)).collect();
        let df = softmax(&norm).last().copied().unwrap_or(0.0) * kt;
        let logits: Vec<f64> = rcs.iter().zip(&acs).map(|(r, a)| n as f64 * (df * r + (1.0 - df) * a)).collect();
        let mut w = softmax(&logits);
        let floor = 1.0 / (10.0 * n as f64);
        if w.iter().any(|&v| v < floor) {
            for v in &mut w {
                *v = *v * (1.0 - floor * n as f64) + floor;
            }
        }
        self.weights = w;
    }
}

fn safe_div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// The least-squares slope of `y` against `x` over the points where `y ≠ 0` (the reference drops zeros, i.e.
/// steps where the task was absent, then pairs the remaining `y` with the *first* `len` of `x`; kept as is);
/// 0 with fewer than two points.
fn window_slope(x: &[f64], y: &[f64]) -> f64 {
    let y: Vec<f64> = y.iter().copied().filter(|v| *v != 0.0).collect();
    let x = &x[..y.len().min(x.len())];
    if y.len() < 2 {
        return 0.0;
    }
    let k = y.len() as f64;
    let mx = x.iter().sum::<f64>() / k;
    let my = y.iter().sum::<f64>() / k;
    let sxy: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    safe_div(sxy, sxx)
}

/// `case3` over the per-task losses of a [`crate::train::Loss::Tasks`] step (each already its task's token mean):
/// `Σ_i w_i L_i / Σ_i w_i` over the tasks present, with weights read from a shared [`Coba`] (or fixed ones), so a
/// training loop can call [`Coba::observe`] between steps while the trainer owns this weighting.
pub struct TaskWeights {
    source: WeightSource,
}

enum WeightSource {
    Fixed(Vec<f64>),
    Coba(Arc<Mutex<Coba>>),
}

impl TaskWeights {
    /// Fixed weights by task id (uniform ones give MFTCoder's default `case3`).
    pub fn fixed(weights: Vec<f64>) -> Self {
        TaskWeights { source: WeightSource::Fixed(weights) }
    }

    /// Weights read from `coba` at every step.
    pub fn coba(coba: Arc<Mutex<Coba>>) -> Self {
        TaskWeights { source: WeightSource::Coba(coba) }
    }
}

impl LossWeighting for TaskWeights {
    fn combine(&mut self, _step: usize, losses: &[(usize, Tensor)]) -> crate::Result<Tensor> {
        let op = "TaskWeights";
        let w: Vec<f64> = match &self.source {
            WeightSource::Fixed(w) => w.clone(),
            WeightSource::Coba(c) => c.lock().unwrap_or_else(|p| p.into_inner()).weights().to_vec(),
        };
        let mut terms = Vec::with_capacity(losses.len());
        for (k, l) in losses {
            let Some(&wk) = w.get(*k) else {
                return Err(Error::Index { op, index: *k as i64, position: vec![], axis: 0, size: w.len() });
            };
            terms.push((wk, l.clone()));
        }
        weighted_mean(&terms)?.ok_or(Error::Empty { op, what: "the task loss list (or its total weight)" })
    }
}

/// `Σ w·x / Σ w` over `(w, x)` terms; `None` when there are none or the weights sum to 0.
fn weighted_mean(terms: &[(f64, Tensor)]) -> crate::Result<Option<Tensor>> {
    let wsum: f64 = terms.iter().map(|(w, _)| w).sum();
    let mut acc: Option<Tensor> = None;
    for (w, x) in terms {
        let t = x.mul_scalar(*w as f32);
        acc = Some(match acc {
            Some(a) => a.add(&t)?,
            None => t,
        });
    }
    Ok(acc.filter(|_| wsum > 0.0).map(|a| a.mul_scalar((1.0 / wsum) as f32)))
}

#[cfg(test)]
#[path = "mft_tests.rs"]
mod tests;
