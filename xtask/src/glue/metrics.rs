//! GLUE metrics, matching scikit-learn / SciPy conventions (including their degenerate cases, noted per function).

/// Fraction of equal entries; 0 for empty input.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// (tp, fp, fn, tn) for the positive class 1.
fn confusion(pred: &[usize], gold: &[usize]) -> (f64, f64, f64, f64) {
    let (mut tp, mut fp, mut fneg, mut tn) = (0.0, 0.0, 0.0, 0.0);
    for (&p, &g) in pred.iter().zip(gold) {
        match (p == 1, g == 1) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fneg += 1.0,
            (false, false) => tn += 1.0,
        }
    }
    (tp, fp, fneg, tn)
}

/// Binary F1 of class 1 (`sklearn.metrics.f1_score`); 0 when there are no true positives (sklearn's
/// `zero_division` result).
pub fn f1(pred: &[usize], gold: &[usize]) -> f64 {
    let (tp, fp, fneg, _) = confusion(pred, gold);
    if tp == 0.0 {
        return 0.0;
    }
    2.0 * tp / (2.0 * tp + fp + fneg)
}

/// Matthews correlation coefficient (`sklearn.metrics.matthews_corrcoef`); 0 when a marginal is constant (e.g. a
/// predictor that always says the same class), as sklearn.
pub fn matthews(pred: &[usize], gold: &[usize]) -> f64 {
    let (tp, fp, fneg, tn) = confusion(pred, gold);
    let den = ((tp + fp) * (tp + fneg) * (tn + fp) * (tn + fneg)).sqrt();
    if den == 0.0 {
        return 0.0;
    }
    (tp * tn - fp * fneg) / den
}

/// Pearson correlation (`scipy.stats.pearsonr`); 0 where SciPy gives NaN (fewer than 2 points or a constant input).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return 0.0;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// 1-based ranks with ties given their average rank (`scipy.stats.rankdata(method="average")`). NaN sorts last.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (`scipy.stats.spearmanr`): Pearson of the average ranks; 0 for degenerate input.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn accuracy_counts_matches() {
        close(accuracy(&[1, 0, 1, 1], &[1, 1, 1, 0]), 0.5);
        close(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn f1_of_positive_class_by_hand() {
        // tp=2 fp=1 fn=1: P=2/3 R=2/3 F1=2/3.
        close(f1(&[1, 1, 1, 0, 0], &[1, 1, 0, 1, 0]), 2.0 / 3.0);
        // No positive predictions or no positives: 0 (sklearn zero_division).
        close(f1(&[0, 0], &[1, 0]), 0.0);
        close(f1(&[0, 0], &[0, 0]), 0.0);
        close(f1(&[1, 1], &[1, 1]), 1.0);
    }

    #[test]
    fn matthews_by_hand_and_degenerate() {
        // tp=2 fp=1 fn=1 tn=1: (2-1)/sqrt(3*3*2*2) = 1/6.
        close(matthews(&[1, 1, 1, 0, 0], &[1, 1, 0, 1, 0]), 1.0 / 6.0);
        close(matthews(&[1, 0, 1, 0], &[1, 0, 1, 0]), 1.0);
        close(matthews(&[0, 1, 0, 1], &[1, 0, 1, 0]), -1.0);
        // Constant predictor: 0 like sklearn.
        close(matthews(&[1, 1, 1], &[1, 0, 1]), 0.0);
        close(matthews(&[], &[]), 0.0);
    }

    #[test]
    fn pearson_by_hand_and_degenerate() {
        close(pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]), 1.0);
        close(pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
        // x=(1,2,3,4) y=(1,3,2,4): sxy=4, sxx=syy=5 -> 0.8.
        close(pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]), 0.8);
        close(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
        close(pearson(&[1.0], &[2.0]), 0.0);
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[10.0, 20.0, 10.0, 30.0]), vec![1.5, 3.0, 1.5, 4.0]);
        assert_eq!(ranks(&[5.0, 5.0, 5.0]), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn spearman_by_hand_with_ties() {
        // Monotone but non-linear: 1.
        close(spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 8.0, 27.0, 64.0]), 1.0);
        // x ranks (1,2,3,4), y=(1,2,2,3) ranks (1,2.5,2.5,4): sxy=4.5, sxx=5, syy=4.5 -> 4.5/sqrt(22.5).
        close(spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 2.0, 3.0]), 4.5 / 22.5f64.sqrt());
        close(spearman(&[1.0, 2.0], &[3.0, 3.0]), 0.0);
    }
}
