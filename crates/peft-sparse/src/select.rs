//! Mask selection: which `k` entries of a tensor to tune.
//!
//! - [`top_k_indices`]: the k largest scores of one tensor (|W| for magnitude, accumulated |gradient|, Fisher
//!   `Σ g²`); ties broken by the lower index, result sorted;
//! - [`top_k_global`]: one global threshold across tensors (LT-SFT's selection);
//! - [`ScoreAccumulator`]: sums |g| or g² over batches (dense while it selects, dropped after);
//! - [`top_rows`], [`top_heads`]: structured masks (whole output rows / channels, or blocks of rows = heads).
//!
//! Selection itself reads dense scores once (O(n) time and transient memory); what survives it is O(k).

use std::cmp::Ordering;

/// Score order: larger first, then lower index (NaN scores rank last).
fn by_score(scores: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => a.cmp(&b),
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => y.partial_cmp(&x).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
        }
    }
}

/// The flat indices of the `k` largest `scores` (all of them when `k ≥ len`), sorted increasingly.
///
/// ```
/// assert_eq!(peft_sparse::select::top_k_indices(&[0.1, 3.0, -5.0, 2.0], 2), vec![1, 3]);
/// ```
pub fn top_k_indices(scores: &[f32], k: usize) -> Vec<u64> {
    let n = scores.len();
    if k >= n {
        return (0..n as u64).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let cmp = by_score(scores);
    idx.select_nth_unstable_by(k - 1, &cmp);
    let mut out: Vec<u64> = idx[..k].iter().map(|&i| i as u64).collect();
    out.sort_unstable();
    out
}

/// The `k` largest scores across several tensors under one global threshold: per tensor, the sorted flat indices
/// chosen in it. Ties at the threshold go to the earlier tensor, then the lower index, so exactly `min(k, Σ len)`
/// entries are chosen.
pub fn top_k_global(scores: &[&[f32]], k: usize) -> Vec<Vec<u64>> {
    let total: usize = scores.iter().map(|s| s.len()).sum();
    let mut out = vec![Vec::new(); scores.len()];
    if k == 0 || total == 0 {
        return out;
    }
    let flat: Vec<f32> = scores.iter().flat_map(|s| s.iter().copied()).collect();
    let chosen = top_k_indices(&flat, k);
    let mut offsets = Vec::with_capacity(scores.len());
    let mut o = 0u64;
    for s in scores {
        offsets.push(o);
        o += s.len() as u64;
    }
    for g in chosen {
        let t = offsets.partition_point(|&off| off <= g) - 1;
        out[t].push(g - offsets[t]);
    }
    out
}

/// What a [`ScoreAccumulator`] sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    /// `Σ |g|` (accumulated gradient magnitude).
    AbsGrad,
    /// `Σ g²` (the empirical Fisher diagonal, SPT's sensitivity).
    Fisher,
}

/// Sums per-entry gradient scores of one tensor over batches.
#[derive(Clone, Debug)]
pub struct ScoreAccumulator {
    kind: Score,
    sums: Vec<f32>,
    batches: usize,
}

impl ScoreAccumulator {
    /// An accumulator for a tensor of `numel` entries.
    pub fn new(kind: Score, numel: usize) -> Self {
        ScoreAccumulator { kind, sums: vec![0.0; numel], batches: 0 }
    }

    /// Adds one batch's gradient (ignored unless it has `numel` entries).
    pub fn add(&mut self, grad: &[f32]) {
        if grad.len() != self.sums.len() {
            return;
        }
        match self.kind {
            Score::AbsGrad => self.sums.iter_mut().zip(grad).for_each(|(s, g)| *s += g.abs()),
            Score::Fisher => self.sums.iter_mut().zip(grad).for_each(|(s, g)| *s += g * g),
        }
        self.batches += 1;
    }

    /// Batches added.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// The sums.
    pub fn scores(&self) -> &[f32] {
        &self.sums
    }

    /// The k highest-scoring entries, sorted.
    pub fn top_k(&self, k: usize) -> Vec<u64> {
        top_k_indices(&self.sums, k)
    }
}

/// Structured selection on a `[rows, cols]` score matrix: every entry of the `n_rows` rows with the largest total
/// score (output channels), sorted flat indices.
pub fn top_rows(scores: &[f32], rows: usize, cols: usize, n_rows: usize) -> Vec<u64> {
    top_heads(scores, rows, cols, 1, n_rows)
}

/// Structured selection by heads: rows grouped in consecutive blocks of `head_rows` (a head's output rows in a
/// query/key/value projection); every entry of the `n_heads` blocks with the largest total score.
pub fn top_heads(scores: &[f32], rows: usize, cols: usize, head_rows: usize, n_heads: usize) -> Vec<u64> {
    if head_rows == 0 || scores.len() != rows * cols {
        return Vec::new();
    }
    let blocks = rows / head_rows;
    let totals: Vec<f32> =
        (0..blocks).map(|b| scores[b * head_rows * cols..(b + 1) * head_rows * cols].iter().sum()).collect();
    let chosen = top_k_indices(&totals, n_heads);
    chosen
        .iter()
        .flat_map(|&b| {
            let start = b as usize * head_rows * cols;
            (start..start + head_rows * cols).map(|i| i as u64)
        })
        .collect()
}

#[cfg(test)]
#[path = "select_tests.rs"]
mod tests;
