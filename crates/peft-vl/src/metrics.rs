//! Caption metrics as the coco-caption toolkit (`pycocoevalcap` 1.2) computes them: BLEU-1..4, ROUGE-L and
//! CIDEr-D, on captions tokenized by [`tokenize`].
//!
//! Definitions (each matches `pycocoevalcap`, checked against its numbers on a committed fixture,
//! `tests/fixtures/caption_metrics.json`):
//! - **BLEU-n** is corpus-level: clipped n-gram matches and candidate n-gram counts are summed over all
//!   candidates, `BLEU-n = (Π_{k≤n} (match_k + 1e-15) / (count_k + 1e-9))^{1/n}` times the brevity penalty
//!   `exp(1 − r/c)` when `c < r`, with `c` the summed candidate length and `r` the summed "closest" reference
//!   length (per candidate, the reference length nearest to its length, the shorter one on ties).
//! - **ROUGE-L** is per candidate `(1 + β²) P R / (R + β² P)` with `β = 1.2`, `P` and `R` the largest
//!   LCS/|candidate| and LCS/|reference| over the references; the corpus score is their mean.
//! - **CIDEr-D** (the toolkit's `CIDEr`): TF-IDF vectors of 1..4-grams with document frequency counted over the
//!   reference sets (one document per candidate) and `idf = ln(N) − ln(max(1, df))`; per n the candidate vector
//!   is clipped by the reference one (`Σ min(c, r)·r / (‖c‖ ‖r‖)`), times the Gaussian length penalty
//!   `exp(−δ²/(2·6²))`, where δ is the difference of the two captions' bigram counts (the toolkit's length);
//!   averaged over n and references, times 10; the corpus score is the mean over candidates. No stemming.
//! - METEOR is not implemented (it needs WordNet synonyms and paraphrase tables).
//!
//! [`tokenize`] approximates the toolkit's Stanford PTB tokenizer (Java) followed by its punctuation filter; the
//! fixture records how often the two disagree on real COCO captions (see the crate's README section in
//! `lib.rs`).
//!
//! ```
//! use peft_vl::metrics::{score_captions, tokenize};
//! assert_eq!(tokenize("A dog's ball, on the grass."), vec!["a", "dog", "'s", "ball", "on", "the", "grass"]);
//! let refs = vec![vec!["a dog runs on grass".to_string(), "a brown dog running".to_string()]];
//! let s = score_captions(&["a dog runs on grass".to_string()], &refs)?;
//! assert!((s.bleu[3] - 1.0).abs() < 1e-6 && (s.rouge_l - 1.0).abs() < 1e-12);
//! # Ok::<(), peft_vl::VlError>(())
//! ```

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::{Result, VlError};

/// Tokens the toolkit drops after PTB tokenization (`-LRB-` etc. stand for brackets).
const PUNCTUATION: [&str; 17] =
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"];

/// Characters split off the start of a word.
const LEADING: &[char] = &['"', '\'', '`', '(', '[', '{', '<'];
/// Characters split off the end of a word.
const TRAILING: &[char] = &['.', ',', '!', '?', ';', ':', '"', '\'', '`', ')', ']', '}', '>'];
/// Contraction suffixes PTB splits off (`dog's` -> `dog 's`, `don't` -> `do n't`).
const CLITICS: [&str; 7] = ["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];

/// Lower-cases and tokenizes a caption the way the coco-caption toolkit's PTB tokenizer + punctuation filter
/// does on ordinary captions: punctuation split off words and dropped, contractions split (`'s`, `n't`, ...),
/// brackets and quotes dropped, hyphenated words and numbers (`3.5`, `1,000`) kept whole.
pub fn tokenize(caption: &str) -> Vec<String> {
    let lower = caption.to_lowercase();
    let mut out = Vec::new();
    for word in lower.split_whitespace() {
        split_word(word, &mut out);
    }
    out.retain(|t| !PUNCTUATION.contains(&t.as_str()) && !t.chars().all(|c| c == '-' || c == '.'));
    out
}

fn split_word(word: &str, out: &mut Vec<String>) {
    let w = word.trim_start_matches(LEADING);
    let mut t = w.trim_end_matches(TRAILING);
    // An abbreviation (`a.m.`) keeps its final period, as PTB does.
    if t.contains('.') && w[t.len()..].starts_with('.') {
        t = &w[..t.len() + 1];
    }
    // Inner punctuation between letters (`chairs,a`) separates words; a comma between digits (`1,000`) does not.
    let chars: Vec<char> = t.chars().collect();
    let mut start = 0;
    let mut pieces = Vec::new();
    for i in 0..chars.len() {
        if matches!(chars[i], ',' | ';' | '!' | '?' | '(' | ')' | '"') {
            let digits = i > 0 && i + 1 < chars.len() && chars[i - 1].is_ascii_digit() && chars[i + 1].is_ascii_digit();
            if !(chars[i] == ',' && digits) {
                pieces.push(chars[start..i].iter().collect::<String>());
                start = i + 1;
            }
        }
    }
    pieces.push(chars[start..].iter().collect::<String>());
    for p in &pieces {
        let p = p.trim_start_matches(LEADING).trim_end_matches(|c: char| c != '.' && TRAILING.contains(&c));
        if p.is_empty() {
            continue;
        }
        if p == "cannot" {
            out.extend(["can".to_string(), "not".to_string()]);
            continue;
        }
        match CLITICS.iter().find(|c| p.len() > c.len() && p.ends_with(*c)) {
            Some(c) => {
                out.push(p[..p.len() - c.len()].to_string());
                out.push((*c).to_string());
            }
            None => out.push(p.to_string()),
        }
    }
}

/// Corpus scores of a set of candidates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaptionScores {
    /// BLEU-1, BLEU-2, BLEU-3, BLEU-4 (corpus-level).
    pub bleu: [f64; 4],
    /// ROUGE-L (mean over candidates).
    pub rouge_l: f64,
    /// CIDEr-D (mean over candidates; the toolkit's `CIDEr`, scaled by 10).
    pub cider_d: f64,
    /// Per candidate: BLEU-1..4 (sentence level, as the toolkit reports them).
    pub per_bleu: Vec<[f64; 4]>,
    /// Per candidate ROUGE-L.
    pub per_rouge_l: Vec<f64>,
    /// Per candidate CIDEr-D.
    pub per_cider_d: Vec<f64>,
}

/// Scores raw captions: tokenizes candidates and references with [`tokenize`], then [`score_tokenized`].
///
/// # Errors
/// As [`score_tokenized`].
pub fn score_captions(candidates: &[String], references: &[Vec<String>]) -> Result<CaptionScores> {
    let c: Vec<Vec<String>> = candidates.iter().map(|s| tokenize(s)).collect();
    let r: Vec<Vec<Vec<String>>> = references.iter().map(|rs| rs.iter().map(|s| tokenize(s)).collect()).collect();
    score_tokenized(&c, &r)
}

/// Scores tokenized candidates against tokenized references (one reference set per candidate).
///
/// # Errors
/// [`VlError::Count`] when the two lists differ in length, [`VlError::Empty`] for no candidates,
/// [`VlError::NoReferences`] for a candidate without references.
pub fn score_tokenized(candidates: &[Vec<String>], references: &[Vec<Vec<String>>]) -> Result<CaptionScores> {
    if candidates.len() != references.len() {
        return Err(VlError::Count {
            what: "reference sets (one per candidate)",
            expected: candidates.len(),
            got: references.len(),
        });
    }
    if candidates.is_empty() {
        return Err(VlError::Empty { what: "the candidate list" });
    }
    if let Some(index) = references.iter().position(Vec::is_empty) {
        return Err(VlError::NoReferences { index });
    }
    let (bleu, per_bleu) = bleu(candidates, references);
    let per_rouge_l: Vec<f64> = candidates.iter().zip(references).map(|(c, r)| rouge_l(c, r)).collect();
    let per_cider_d = cider_d(candidates, references);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(CaptionScores {
        bleu,
        rouge_l: mean(&per_rouge_l),
        cider_d: mean(&per_cider_d),
        per_bleu,
        per_rouge_l,
        per_cider_d,
    })
}

type Ngrams<'a> = HashMap<&'a [String], u32>;

/// Per n (1..=4): the tf-idf weights of the n-grams.
type TfIdf = [HashMap<Vec<String>, f64>; 4];

/// Counts of the 1..=n-grams of a token list.
fn ngrams(tokens: &[String], n: usize) -> Ngrams<'_> {
    let mut m = HashMap::new();
    for k in 1..=n {
        for w in tokens.windows(k) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;

fn bleu(cands: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> ([f64; 4], Vec<[f64; 4]>) {
    let mut tot_guess = [0.0f64; 4];
    let mut tot_correct = [0.0f64; 4];
    let (mut tot_c, mut tot_r) = (0.0f64, 0.0f64);
    let mut per = Vec::with_capacity(cands.len());
    for (c, rs) in cands.iter().zip(refs) {
        let mut maxc: HashMap<&[String], u32> = HashMap::new();
        for r in rs {
            for (g, n) in ngrams(r, 4) {
                let e = maxc.entry(g).or_insert(0);
                *e = (*e).max(n);
            }
        }
        let clen = c.len();
        // closest reference length; ties go to the shorter
        let rlen = rs.iter().map(Vec::len).min_by_key(|&l| (l.abs_diff(clen), l)).unwrap_or(0);
        let mut correct = [0.0f64; 4];
        for (g, n) in ngrams(c, 4) {
            correct[g.len() - 1] += f64::from(n.min(maxc.get(g).copied().unwrap_or(0)));
        }
        let guess: [f64; 4] = std::array::from_fn(|k| clen.saturating_sub(k) as f64);
        let mut s = [0.0; 4];
        let mut prod = 1.0;
        for k in 0..4 {
            prod *= (correct[k] + TINY) / (guess[k] + SMALL);
            s[k] = prod.powf(1.0 / (k as f64 + 1.0));
            tot_guess[k] += guess[k];
            tot_correct[k] += correct[k];
        }
        let ratio = (clen as f64 + TINY) / (rlen as f64 + SMALL);
        if ratio < 1.0 {
            s.iter_mut().for_each(|v| *v *= (1.0 - 1.0 / ratio).exp());
        }
        per.push(s);
        tot_c += clen as f64;
        tot_r += rlen as f64;
    }
    let mut out = [0.0; 4];
    let mut prod = 1.0;
    for k in 0..4 {
        prod *= (tot_correct[k] + TINY) / (tot_guess[k] + SMALL);
        out[k] = prod.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (tot_c + TINY) / (tot_r + SMALL);
    if ratio < 1.0 {
        out.iter_mut().for_each(|v| *v *= (1.0 - 1.0 / ratio).exp());
    }
    (out, per)
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn rouge_l(c: &[String], refs: &[Vec<String>]) -> f64 {
    const BETA2: f64 = 1.2 * 1.2;
    if c.is_empty() {
        return 0.0;
    }
    let (mut p, mut r) = (0.0f64, 0.0f64);
    for rf in refs {
        let l = lcs(rf, c) as f64;
        p = p.max(l / c.len() as f64);
        r = r.max(if rf.is_empty() { 0.0 } else { l / rf.len() as f64 });
    }
    if p == 0.0 || r == 0.0 {
        return 0.0;
    }
    (1.0 + BETA2) * p * r / (r + BETA2 * p)
}

fn cider_d(cands: &[Vec<String>], refs: &[Vec<Vec<String>>]) -> Vec<f64> {
    const SIGMA: f64 = 6.0;
    let mut df: HashMap<&[String], f64> = HashMap::new();
    let cooked_refs: Vec<Vec<Ngrams<'_>>> = refs.iter().map(|rs| rs.iter().map(|r| ngrams(r, 4)).collect()).collect();
    for rs in &cooked_refs {
        let set: HashSet<&[String]> = rs.iter().flat_map(|m| m.keys().copied()).collect();
        for g in set {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let log_n = (cands.len() as f64).ln();
    // tf-idf per n, its norm per n, and the bigram count (the toolkit's "length")
    let vec_of = |m: &Ngrams<'_>| -> (TfIdf, [f64; 4], f64) {
        let mut v: TfIdf = Default::default();
        let mut norm = [0.0f64; 4];
        let mut len = 0.0;
        for (g, &tf) in m {
            let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
            let n = g.len() - 1;
            let w = f64::from(tf) * (log_n - d);
            v[n].insert(g.to_vec(), w);
            norm[n] += w * w;
            if n == 1 {
                len += f64::from(tf);
            }
        }
        (v, norm.map(f64::sqrt), len)
    };
    let mut scores = Vec::with_capacity(cands.len());
    for (c, rs) in cands.iter().zip(&cooked_refs) {
        let (vc, nc, lc) = vec_of(&ngrams(c, 4));
        let mut total = [0.0f64; 4];
        for r in rs {
            let (vr, nr, lr) = vec_of(r);
            let delta = lc - lr;
            for n in 0..4 {
                let mut val = 0.0;
                for (g, &wc) in &vc[n] {
                    let wr = vr[n].get(g).copied().unwrap_or(0.0);
                    val += wc.min(wr) * wr;
                }
                if nc[n] != 0.0 && nr[n] != 0.0 {
                    val /= nc[n] * nr[n];
                }
                total[n] += val * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
            }
        }
        scores.push(total.iter().sum::<f64>() / 4.0 / rs.len() as f64 * 10.0);
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn tokenizer_splits_punctuation_and_clitics_and_keeps_numbers_and_hyphens() {
        assert_eq!(tokenize("A man's bike, parked (outside)."), toks("a man 's bike parked outside"));
        assert_eq!(
            tokenize("They don't see 1,000 black-and-white cats..."),
            toks("they do n't see 1,000 black-and-white cats")
        );
        assert_eq!(tokenize("Two  dogs - running;fast!"), toks("two dogs running fast"));
        assert_eq!(tokenize("  \"Quoted\" words "), toks("quoted words"));
        assert!(tokenize(" . , ! ").is_empty());
    }

    #[test]
    fn identical_candidate_scores_one_on_bleu_and_rouge() {
        let c = vec![toks("a cat sits on the mat")];
        let r = vec![vec![toks("a cat sits on the mat"), toks("there is a cat")]];
        let s = score_tokenized(&c, &r).unwrap();
        for b in s.bleu {
            assert!((b - 1.0).abs() < 1e-9, "{b}");
        }
        assert!((s.rouge_l - 1.0).abs() < 1e-12);
        // one image: idf = ln(1) - ln(1) = 0 for every n-gram, so CIDEr-D is 0 by construction
        assert_eq!(s.cider_d, 0.0);
    }

    #[test]
    fn rouge_l_matches_a_hand_computed_lcs() {
        // LCS("a b c d", "a c e") = 2: P = 2/3, R = 2/4
        let (p, r) = (2.0 / 3.0, 0.5);
        let want = (1.0 + 1.44) * p * r / (r + 1.44 * p);
        assert!((rouge_l(&toks("a c e"), &[toks("a b c d")]) - want).abs() < 1e-12);
        assert_eq!(rouge_l(&toks("x y"), &[toks("a b")]), 0.0);
    }

    #[test]
    fn bleu_brevity_penalty_uses_the_closest_reference_length() {
        // candidate of 2 tokens, refs of 3 and 6: r = 3, BP = exp(1 - 3/2); all unigrams and the bigram match
        let c = vec![toks("a b")];
        let r = vec![vec![toks("a b c"), toks("a b c d e f")]];
        let s = score_tokenized(&c, &r).unwrap();
        let bp = (1.0f64 - 1.5).exp();
        assert!((s.bleu[0] - bp).abs() < 1e-9 && (s.bleu[1] - bp).abs() < 1e-9);
    }

    #[test]
    fn cider_d_rewards_the_right_image_over_a_wrong_one() {
        let refs = vec![
            vec![toks("a dog runs on the grass"), toks("a brown dog running")],
            vec![toks("a red bus on a street"), toks("a bus drives down the road")],
            vec![toks("a plate of food"), toks("food on a white plate")],
        ];
        let right = vec![toks("a dog running on grass"), toks("a red bus on the road"), toks("a plate with food")];
        let wrong = vec![right[1].clone(), right[2].clone(), right[0].clone()];
        let a = score_tokenized(&right, &refs).unwrap();
        let b = score_tokenized(&wrong, &refs).unwrap();
        assert!(a.cider_d > b.cider_d + 0.5, "{} vs {}", a.cider_d, b.cider_d);
        assert!(a.per_cider_d.iter().all(|v| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let c = vec![toks("a")];
        assert!(matches!(score_tokenized(&c, &[]), Err(VlError::Count { .. })));
        assert!(matches!(score_tokenized(&[], &[]), Err(VlError::Empty { .. })));
        assert!(matches!(score_tokenized(&c, &[vec![]]), Err(VlError::NoReferences { index: 0 })));
    }
}
