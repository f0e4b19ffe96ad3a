//! ComPEFT (Yadav et al. 2023, <https://arxiv.org/abs/2311.13171>): compress a PEFT update by keeping its
//! top-k entries by magnitude and replacing each kept entry with `± α·σ` (one scale for the whole update).
//!
//! * **Task vector** τ ([`TaskVector`]): every adapter tensor, sorted by name, flattened and concatenated, minus
//!   its base (LoRA: 0, IA3: 1; full fine-tuning: the pretrained tensor).
//! * **Scale**: `σ = std(τ)` (unbiased) over the whole vector *before* pruning, as the authors' code
//!   (`compress_and_update_llama_adaptors`).
//! * **Top-k** ([`Selection`]): `Authors` reproduces `topk_values_mask`: threshold = the `(n − ⌊k·n⌋)`-th smallest
//!   `|τ|`, keep `|τ| ≥ threshold`, i.e. `⌊k·n⌋ + 1` entries absent ties (their off-by-one); `Exact` keeps exactly
//!   `⌊k·n⌋` entries (largest magnitudes, ties to the lower index). `k = 1` keeps everything.
//! * **Values** ([`ComPeftMode`]): `Ternary { alpha }` → `α·σ·sign(τ_i)` (authors' `replace_factor > 0`); `Stc` →
//!   `mean|τ_kept≠0| · sign(τ_i)` (the mean over the non-zero kept entries; the authors' code averages the *signed* kept values, which we take to be a slip;
//!   flagged); `PruneOnly` keeps the values.
//! * **Storage** ([`ComPeft::encode`], our definition — the paper's coding is not specified): a header (n, nnz,
//!   mode, f32 scale) and the smaller of (a) dense 2-bit codes (`00` zero, `01` +, `10` −; 2n bits) or (b) sparse
//!   Elias-γ coded index gaps plus one sign bit per nonzero. Prune-only stores γ gaps plus f32 values.
//!   [`ComPeft::compression_ratio`] compares against 16- or 32-bit dense storage.

use ndarray::{ArrayD, IxDyn};

use crate::error::{QuantError, Result};

/// How kept entries are represented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ComPeftMode {
    /// `α·σ·sign(τ)` (ComPEFT; the authors' `replace_factor = α > 0`, default 1).
    Ternary {
        /// The multiplier of σ.
        alpha: f32,
    },
    /// `mean|τ_kept|·sign(τ)` over the non-zero kept entries (sparse ternary compression).
    Stc,
    /// Keep the values of the top-k entries (plain magnitude pruning).
    PruneOnly,
}

/// Which entries survive the top-k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The authors' `kthvalue` rule: `⌊k·n⌋ + 1` entries plus ties.
    Authors,
    /// Exactly `⌊k·n⌋` entries.
    Exact,
}

/// ComPEFT settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ComPeftConfig {
    /// Fraction kept, in (0, 1] (`k`; the authors also accept percentages > 1, which callers divide by 100).
    pub density: f64,
    /// Value representation.
    pub mode: ComPeftMode,
    /// Top-k rule.
    pub selection: Selection,
}

impl Default for ComPeftConfig {
    /// 10% density, ternary with α = 1, the authors' selection rule.
    fn default() -> Self {
        ComPeftConfig { density: 0.1, mode: ComPeftMode::Ternary { alpha: 1.0 }, selection: Selection::Authors }
    }
}

/// A flattened PEFT update: the tensors sorted by name, concatenated.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskVector {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    values: Vec<f32>,
}

impl TaskVector {
    /// `τ = concat(sorted by name)(tensor − base)` for a scalar base (LoRA: 0, IA3: 1).
    pub fn from_tensors(mut tensors: Vec<(String, ArrayD<f32>)>, base: f32) -> Self {
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tv = TaskVector { names: Vec::new(), shapes: Vec::new(), values: Vec::new() };
        for (name, t) in tensors {
            tv.names.push(name);
            tv.shapes.push(t.shape().to_vec());
            tv.values.extend(t.iter().map(|v| v - base));
        }
        tv
    }

    /// The flat values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The tensors `base + v` for flat values `v` laid out like this vector (e.g. [`ComPeft::decompress`]).
    ///
    /// # Errors
    /// [`QuantError::Size`] when `v` has another length.
    pub fn to_tensors(&self, v: &[f32], base: f32) -> Result<Vec<(String, ArrayD<f32>)>> {
        crate::error::size("task vector length", self.values.len(), v.len())?;
        let mut off = 0;
        let mut out = Vec::with_capacity(self.names.len());
        for (name, shape) in self.names.iter().zip(&self.shapes) {
            let n: usize = shape.iter().product();
            let data = v[off..off + n].iter().map(|x| x + base).collect();
            out.push((
                name.clone(),
                ArrayD::from_shape_vec(IxDyn(shape), data).expect("peft-rs bug: task vector shape"),
            ));
            off += n;
        }
        Ok(out)
    }
}

/// A compressed update: kept positions, their signs (or values) and one scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ComPeft {
    n: usize,
    scale: f32,
    /// Kept positions, increasing.
    idx: Vec<usize>,
    /// `true` for a negative kept entry (ternary modes).
    neg: Vec<bool>,
    /// Kept values (prune-only).
    values: Option<Vec<f32>>,
}

impl ComPeft {
    /// Compresses `tau`.
    ///
    /// # Errors
    /// [`QuantError::Empty`]; [`QuantError::NonFinite`] for NaN/inf entries or α;
    /// [`QuantError::BadQuantState`] for a density outside (0, 1].
    pub fn compress(tau: &[f32], cfg: &ComPeftConfig) -> Result<Self> {
        if tau.is_empty() {
            return Err(QuantError::Empty("compeft"));
        }
        if !(cfg.density > 0.0 && cfg.density <= 1.0) {
            return Err(QuantError::BadQuantState {
                key: "density".into(),
                msg: format!("{} not in (0, 1]", cfg.density),
            });
        }
        if tau.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite("compeft task vector".into()));
        }
        let n = tau.len();
        let keep = (n as f64 * cfg.density).floor() as usize;
        let idx = select(tau, keep, cfg.selection);
        let neg: Vec<bool> = idx.iter().map(|&i| tau[i] < 0.0).collect();
        let (scale, values) = match cfg.mode {
            ComPeftMode::Ternary { alpha } => {
                if !alpha.is_finite() {
                    return Err(QuantError::NonFinite("compeft alpha".into()));
                }
                (alpha * std_unbiased(tau), None)
            }
            ComPeftMode::Stc => {
                // Over the non-zero kept entries: a kept exact zero (the authors' `>=` threshold keeps zeros
                // when most of τ is zero) has no sign and stays 0, so it must not dilute the scale.
                let nz: Vec<f64> = idx.iter().map(|&i| f64::from(tau[i].abs())).filter(|&v| v != 0.0).collect();
                let mean = nz.iter().sum::<f64>() / nz.len().max(1) as f64;
                (mean as f32, None)
            }
            ComPeftMode::PruneOnly => (1.0, Some(idx.iter().map(|&i| tau[i]).collect())),
        };
        let neg = if values.is_some() { Vec::new() } else { neg };
        // A kept exact zero has no sign: it stays 0 (torch.sign(0) = 0), so drop it from the ternary support.
        let mut c = ComPeft { n, scale, idx, neg, values };
        if c.values.is_none() {
            let keep: Vec<bool> = c.idx.iter().map(|&i| tau[i] != 0.0).collect();
            let mut k = keep.iter();
            c.idx.retain(|_| *k.next().expect("peft-rs bug: mask length"));
            let mut k = keep.iter();
            c.neg.retain(|_| *k.next().expect("peft-rs bug: mask length"));
        }
        Ok(c)
    }

    /// Length of the uncompressed vector.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True for an empty vector (never produced by [`ComPeft::compress`]).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Number of nonzero entries.
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }

    /// The magnitude of every nonzero entry (`α·σ`, the STC mean, or 1 for prune-only).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The kept positions, increasing.
    pub fn indices(&self) -> &[usize] {
        &self.idx
    }

    /// The reconstructed vector τ̂.
    pub fn decompress(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n];
        match &self.values {
            Some(v) => self.idx.iter().zip(v).for_each(|(&i, &x)| out[i] = x),
            None => {
                self.idx.iter().zip(&self.neg).for_each(|(&i, &s)| out[i] = if s { -self.scale } else { self.scale })
            }
        }
        out
    }

    /// Bits of the dense 2-bit code body (ternary modes): `2n`.
    pub fn dense_bits(&self) -> usize {
        2 * self.n
    }

    /// Bits of the sparse body: Elias-γ index gaps (`2⌊log₂ gap⌋ + 1` each) plus one sign bit (ternary) or 32
    /// value bits (prune-only) per nonzero.
    pub fn sparse_bits(&self) -> usize {
        let per = if self.values.is_some() { 32 } else { 1 };
        gaps(&self.idx).map(|g| gamma_len(g) + per).sum()
    }

    /// Serialises: `n: u64 | nnz: u64 | mode: u8 | scale: f32` (little-endian, 21 bytes), then the body. Ternary
    /// updates use the smaller of the dense 2-bit body (mode 0; LSB-first, 4 codes per byte) and the sparse body
    /// (mode 1; γ gaps and sign bits, MSB-first); prune-only uses γ gaps and f32 values (mode 2).
    pub fn encode(&self) -> Vec<u8> {
        let mode: u8 = if self.values.is_some() {
            2
        } else if self.dense_bits() <= self.sparse_bits() {
            0
        } else {
            1
        };
        let mut out = Vec::new();
        out.extend((self.n as u64).to_le_bytes());
        out.extend((self.idx.len() as u64).to_le_bytes());
        out.push(mode);
        out.extend(self.scale.to_le_bytes());
        if mode == 0 {
            let mut body = vec![0u8; self.n.div_ceil(4)];
            for (&i, &s) in self.idx.iter().zip(&self.neg) {
                body[i / 4] |= (if s { 0b10 } else { 0b01 }) << (2 * (i % 4));
            }
            out.extend(body);
        } else {
            let mut w = BitWriter::default();
            for (k, g) in gaps(&self.idx).enumerate() {
                w.gamma(g);
                match &self.values {
                    Some(v) => w.bits(u64::from(v[k].to_bits()), 32),
                    None => w.bits(u64::from(self.neg[k]), 1),
                }
            }
            out.extend(w.finish());
        }
        out
    }

    /// Parses [`ComPeft::encode`]'s format.
    ///
    /// # Errors
    /// [`QuantError::BadQuantState`] for a truncated or inconsistent buffer.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |msg: &str| QuantError::BadQuantState { key: "compeft".into(), msg: msg.into() };
        if bytes.len() < 21 {
            return Err(bad("shorter than the 21-byte header"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("peft-rs bug: 8 bytes"));
        let n = usize::try_from(u64_at(0)).map_err(|_| bad("length overflows usize"))?;
        let nnz = usize::try_from(u64_at(8)).map_err(|_| bad("nnz overflows usize"))?;
        let mode = bytes[16];
        let scale = f32::from_le_bytes(bytes[17..21].try_into().expect("peft-rs bug: 4 bytes"));
        let body = &bytes[21..];
        if nnz > n {
            return Err(bad("more nonzeros than entries"));
        }
        let (mut idx, mut neg, mut values) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz), None);
        match mode {
            0 => {
                if body.len() != n.div_ceil(4) {
                    return Err(bad("dense body has the wrong length"));
                }
                for i in 0..n {
                    match (body[i / 4] >> (2 * (i % 4))) & 0b11 {
                        0 => {}
                        0b01 => {
                            idx.push(i);
                            neg.push(false);
                        }
                        0b10 => {
                            idx.push(i);
                            neg.push(true);
                        }
                        _ => return Err(bad("invalid 2-bit code 11")),
                    }
                }
                if idx.len() != nnz {
                    return Err(bad("nonzero count does not match the header"));
                }
            }
            1 | 2 => {
                let mut r = BitReader { data: body, pos: 0 };
                let mut vals = Vec::new();
                let mut prev: Option<usize> = None;
                for _ in 0..nnz {
                    let g = usize::try_from(r.gamma().ok_or_else(|| bad("truncated gap"))?).map_err(|_| bad("gap"))?;
                    let i = match prev {
                        None => g - 1,
                        Some(p) => p.checked_add(g).ok_or_else(|| bad("index overflows"))?,
                    };
                    if i >= n {
                        return Err(bad("index beyond the vector"));
                    }
                    idx.push(i);
                    prev = Some(i);
                    if mode == 1 {
                        neg.push(r.bits(1).ok_or_else(|| bad("truncated sign"))? == 1);
                    } else {
                        let b = r.bits(32).ok_or_else(|| bad("truncated value"))?;
                        vals.push(f32::from_bits(u32::try_from(b).expect("peft-rs bug: 32 bits")));
                        neg.push(false);
                    }
                }
                if body.len() != r.pos.div_ceil(8) {
                    return Err(bad("trailing bytes after the sparse body"));
                }
                if mode == 2 {
                    neg.clear();
                    values = Some(vals);
                }
            }
            _ => return Err(bad("unknown body mode")),
        }
        Ok(ComPeft { n, scale, idx, neg, values })
    }

    /// `n · baseline_bits / encoded bits`: e.g. 16 for a bf16 checkpoint, 32 for f32.
    pub fn compression_ratio(&self, baseline_bits: usize) -> f64 {
        (self.n * baseline_bits) as f64 / (8 * self.encode().len()) as f64
    }
}

/// Positions kept by the top-k rule, increasing.
fn select(tau: &[f32], keep: usize, rule: Selection) -> Vec<usize> {
    let n = tau.len();
    let mut mags: Vec<(f32, usize)> = tau.iter().enumerate().map(|(i, v)| (v.abs(), i)).collect();
    match rule {
        Selection::Authors => {
            let kth = n - keep; // 1-based rank of the threshold among the smallest
            if kth == 0 {
                return (0..n).collect();
            }
            let (_, t, _) = mags.select_nth_unstable_by(kth - 1, |a, b| a.0.total_cmp(&b.0));
            let thr = t.0;
            (0..n).filter(|&i| tau[i].abs() >= thr).collect()
        }
        Selection::Exact => {
            if keep == 0 {
                return Vec::new();
            }
            // Largest magnitude first, ties to the lower index.
            mags.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut idx: Vec<usize> = mags[..keep].iter().map(|m| m.1).collect();
            idx.sort_unstable();
            idx
        }
    }
}

fn std_unbiased(v: &[f32]) -> f32 {
    let n = v.len() as f64;
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0);
    var.sqrt() as f32
}

/// Gaps between kept positions, the first measured from -1 (so every gap is >= 1).
fn gaps(idx: &[usize]) -> impl Iterator<Item = u64> + '_ {
    let mut prev: Option<usize> = None;
    idx.iter().map(move |&i| {
        let g = prev.map_or(i + 1, |p| i - p);
        prev = Some(i);
        g as u64
    })
}

/// Length of the Elias-γ code of `g >= 1`: `2⌊log₂ g⌋ + 1`.
fn gamma_len(g: u64) -> usize {
    2 * (63 - g.leading_zeros() as usize) + 1
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    nbits: usize,
}

impl BitWriter {
    /// Appends the low `k` bits of `v`, most significant first.
    fn bits(&mut self, v: u64, k: usize) {
        for j in (0..k).rev() {
            if self.nbits.is_multiple_of(8) {
                self.out.push(0);
            }
            if (v >> j) & 1 == 1 {
                let last = self.out.len() - 1;
                self.out[last] |= 0x80 >> (self.nbits % 8);
            }
            self.nbits += 1;
        }
    }

    /// Elias-γ: `⌊log₂ g⌋` zeros, then `g` in binary.
    fn gamma(&mut self, g: u64) {
        let nb = 64 - g.leading_zeros() as usize;
        self.bits(0, nb - 1);
        self.bits(g, nb);
    }

    fn finish(self) -> Vec<u8> {
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<u64> {
        let b = self.data.get(self.pos / 8)?;
        let v = (b >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u64::from(v))
    }

    fn bits(&mut self, k: usize) -> Option<u64> {
        (0..k).try_fold(0u64, |acc, _| Some(acc << 1 | self.bit()?))
    }

    fn gamma(&mut self) -> Option<u64> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 63 {
                return None;
            }
        }
        Some(1 << zeros | self.bits(zeros)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Distinct, nonzero magnitudes (no ties) with mixed signs.
    fn tau(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1009) as f32 + 1.0) * if i % 3 == 0 { -1e-3 } else { 1e-3 }).collect()
    }

    fn cfg(density: f64, mode: ComPeftMode, selection: Selection) -> ComPeftConfig {
        ComPeftConfig { density, mode, selection }
    }

    #[test]
    fn ternary_values_are_plus_minus_alpha_sigma_and_nnz_follows_the_selection_rule() {
        let t = tau(1000);
        let sigma = std_unbiased(&t);
        for (sel, expected) in [(Selection::Authors, 101), (Selection::Exact, 100)] {
            let c = ComPeft::compress(&t, &cfg(0.1, ComPeftMode::Ternary { alpha: 2.5 }, sel)).unwrap();
            assert_eq!(c.nnz(), expected, "{sel:?}");
            assert_eq!(c.scale(), 2.5 * sigma);
            let d = c.decompress();
            for (i, (&a, &b)) in t.iter().zip(&d).enumerate() {
                assert!(b == 0.0 || b == c.scale() * a.signum(), "entry {i}: {b}");
            }
            // The kept entries are the largest magnitudes.
            let min_kept = c.indices().iter().map(|&i| t[i].abs()).fold(f32::INFINITY, f32::min);
            let max_dropped = (0..1000).filter(|i| d[*i] == 0.0).map(|i| t[i].abs()).fold(0.0, f32::max);
            assert!(min_kept > max_dropped);
        }
    }

    #[test]
    fn authors_rule_keeps_ties_at_the_threshold() {
        let t = [1.0f32, -1.0, 1.0, 0.5, 0.25, 2.0];
        // keep = floor(0.5 * 6) = 3; threshold = 3rd smallest |t| = 1.0 -> everything >= 1.0 (four entries).
        let c = ComPeft::compress(&t, &cfg(0.5, ComPeftMode::PruneOnly, Selection::Authors)).unwrap();
        assert_eq!(c.indices(), &[0, 1, 2, 5]);
        let c = ComPeft::compress(&t, &cfg(0.5, ComPeftMode::PruneOnly, Selection::Exact)).unwrap();
        assert_eq!(c.indices(), &[0, 1, 5], "exactly three, ties to the lower index");
    }

    #[test]
    fn full_density_prune_only_returns_tau_unchanged_and_stc_uses_the_mean_kept_magnitude() {
        let t = tau(257);
        for sel in [Selection::Authors, Selection::Exact] {
            let c = ComPeft::compress(&t, &cfg(1.0, ComPeftMode::PruneOnly, sel)).unwrap();
            assert_eq!(c.decompress(), t);
        }
        let c = ComPeft::compress(&t, &cfg(0.2, ComPeftMode::Stc, Selection::Exact)).unwrap();
        let mean = c.indices().iter().map(|&i| f64::from(t[i].abs())).sum::<f64>() / c.nnz() as f64;
        assert_eq!(c.scale(), mean as f32);
    }

    /// Audit item: STC's scale averaged |τ| over every kept entry, zeros included. When most of τ is zero the
    /// authors' `>=` threshold keeps zeros; the scale is the mean over the non-zero kept entries.
    #[test]
    fn stc_scale_is_the_mean_over_nonzero_kept_entries() {
        let t: Vec<f32> = (0..100).map(|i| if i % 10 < 7 { 0.0 } else { (i as f32 - 50.0) * 0.01 }).collect();
        let c = ComPeft::compress(&t, &cfg(0.5, ComPeftMode::Stc, Selection::Authors)).unwrap();
        let nz: Vec<f64> = t.iter().filter(|v| **v != 0.0).map(|v| f64::from(v.abs())).collect();
        assert_eq!(c.scale(), (nz.iter().sum::<f64>() / nz.len() as f64) as f32);
        // every non-zero output is ±scale; zeros stay zero
        for (o, v) in c.decompress().iter().zip(&t) {
            assert!(if *v == 0.0 { *o == 0.0 } else { o.abs() == c.scale() }, "{v} -> {o}");
        }
    }

    #[test]
    fn storage_bits_follow_the_dense_and_gamma_formulas_and_the_smaller_is_written() {
        let t = tau(4096);
        let sparse = ComPeft::compress(&t, &cfg(0.05, ComPeftMode::Ternary { alpha: 1.0 }, Selection::Exact)).unwrap();
        let expected: usize = gaps(sparse.indices()).map(|g| 2 * (g as f64).log2().floor() as usize + 1 + 1).sum();
        assert_eq!(sparse.sparse_bits(), expected);
        assert_eq!(sparse.dense_bits(), 8192);
        assert!(sparse.sparse_bits() < sparse.dense_bits());
        assert_eq!(sparse.encode().len(), 21 + sparse.sparse_bits().div_ceil(8));
        let dense = ComPeft::compress(&t, &cfg(0.9, ComPeftMode::Ternary { alpha: 1.0 }, Selection::Exact)).unwrap();
        assert_eq!(dense.encode().len(), 21 + 4096 / 4);
        // Against a bf16 checkpoint of the same update.
        let r16 = sparse.compression_ratio(16);
        assert!((r16 - (4096.0 * 16.0) / (8.0 * sparse.encode().len() as f64)).abs() < 1e-12);
        assert!(r16 > 20.0, "5% density compresses a bf16 update more than 20x (got {r16})");
    }

    #[test]
    fn gamma_codes_of_small_gaps() {
        let mut w = BitWriter::default();
        for g in [1u64, 2, 3, 4, 5, 17] {
            w.gamma(g);
        }
        // 1 | 010 | 011 | 00100 | 00101 | 000010001
        let bits = "1010011001000010100001000 1".replace(' ', "");
        let bytes = w.finish();
        let got: String = bytes.iter().map(|b| format!("{b:08b}")).collect();
        assert_eq!(&got[..bits.len()], bits);
        assert_eq!(gamma_len(17), 9);
    }

    #[test]
    fn task_vectors_flatten_sorted_by_name_and_restore() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let b = ArrayD::from_shape_vec(IxDyn(&[3]), vec![5.0f32, 6.0, 7.0]).unwrap();
        let tv = TaskVector::from_tensors(vec![("z.lora_B".into(), a.clone()), ("a.lora_A".into(), b.clone())], 1.0);
        assert_eq!(tv.values(), &[4.0, 5.0, 6.0, 0.0, 1.0, 2.0, 3.0]);
        let back = tv.to_tensors(tv.values(), 1.0).unwrap();
        assert_eq!(back, vec![("a.lora_A".to_string(), b), ("z.lora_B".to_string(), a)]);
        assert!(matches!(tv.to_tensors(&[0.0], 0.0), Err(QuantError::Size { .. })));
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let c = ComPeftConfig::default();
        assert!(matches!(ComPeft::compress(&[], &c), Err(QuantError::Empty(_))));
        assert!(matches!(ComPeft::compress(&[1.0, f32::NAN], &c), Err(QuantError::NonFinite(_))));
        for d in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(matches!(
                ComPeft::compress(&[1.0], &cfg(d, c.mode, c.selection)),
                Err(QuantError::BadQuantState { .. })
            ));
        }
        let good = ComPeft::compress(&tau(100), &c).unwrap().encode();
        assert!(matches!(ComPeft::decode(&good[..10]), Err(QuantError::BadQuantState { .. })));
        assert!(matches!(ComPeft::decode(&good[..good.len() - 1]), Err(QuantError::BadQuantState { .. })));
        let mut m = good.clone();
        m[16] = 9;
        assert!(matches!(ComPeft::decode(&m), Err(QuantError::BadQuantState { .. })));
        let mut m = good;
        m[8] = 200; // nnz > n
        assert!(matches!(ComPeft::decode(&m), Err(QuantError::BadQuantState { .. })));
    }

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(32))]

        #[test]
        fn decode_of_encode_is_exact(
            v in prop::collection::vec(-1.0f32..1.0, 1..600),
            density in 0.001f64..=1.0,
            mode in 0u8..3,
            exact in any::<bool>(),
        ) {
            let mode = match mode { 0 => ComPeftMode::Ternary { alpha: 0.7 }, 1 => ComPeftMode::Stc, _ => ComPeftMode::PruneOnly };
            let sel = if exact { Selection::Exact } else { Selection::Authors };
            let c = ComPeft::compress(&v, &cfg(density, mode, sel)).unwrap();
            let back = ComPeft::decode(&c.encode()).unwrap();
            prop_assert_eq!(back.decompress(), c.decompress());
            prop_assert_eq!(back, c);
        }
    }
}
