//! The audio front end for short clips: WAV -> mono -> band-limited resampling to 16 kHz -> a fixed window ->
//! Whisper's log-mel spectrogram over that window -> optional SpecAugment masking.
//!
//! **Resampling** is [`peft_models::audio::resample`]: a polyphase FIR resampler with a Kaiser-windowed sinc
//! low-pass (β = 5, `20·max(up, down) + 1` taps, cutoff at the lower Nyquist frequency), the algorithm of
//! `scipy.signal.resample_poly` and checked against it there. It is re-exported here ([`resample`]) and tested
//! below against an analytic sine (8 -> 16 kHz) and for anti-aliasing (a tone above the new Nyquist frequency is
//! removed, 16 -> 8 kHz), the two properties nearest-sample or linear interpolation fail.
//!
//! **Short windows.** Whisper's encoder was trained on 30 s windows (3000 mel frames, 1500 positions); FSDD
//! clips are 0.14-2.28 s (99% under 0.92 s). [`FrontEnd`] computes the log-mel over a window of
//! [`FrontEnd::seconds`] only (default 1 s: 100 frames -> 50 encoder positions), with Whisper's STFT, mel
//! projection, `log10`, `max - 8` clamp and `(x + 4) / 4` scaling unchanged; the encoder then uses the first
//! `frames / 2` positional embeddings ([`crate::encoder::encode_window`]). For a clip shorter than the window (by
//! the STFT's 200-sample half window) the features are exactly the first frames of Whisper's 30 s features
//! (the clamp's maximum lies in the speech either way; checked by
//! `window_features_equal_the_first_frames_of_the_30s_features`). What changes is the encoder's context: it no
//! longer attends over ~29 s of padding. Cost per clip falls ~30x in the linear layers and ~900x in attention.
//! Clips longer than the window are cut at its end.

use std::path::Path;

use ndarray::{Array2, ArrayD, Ix2};
use rand::Rng;

pub use peft_models::audio::{read_wav_prefix, resample, Audio, LogMel};

use crate::error::{AudioDataError, Result};

/// Whisper's sample rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Log-mel features over a fixed window of a clip.
#[derive(Clone, Debug)]
pub struct FrontEnd {
    mel: LogMel,
}

impl FrontEnd {
    /// Whisper's log-mel (`filters [201, n_mels]`, n_fft 400, hop 160) over a `seconds`-long window at 16 kHz.
    ///
    /// # Errors
    /// [`AudioDataError::InvalidConfig`] unless the window gives an even number of frames from 2 to 3000
    /// (Whisper's second convolution halves the frames; 3000 is the encoder's 30 s); filter-shape errors.
    pub fn whisper(filters: &ArrayD<f32>, seconds: f64) -> Result<Self> {
        let mut mel = LogMel::whisper(filters)?;
        let n = (seconds * f64::from(SAMPLE_RATE)).round();
        let frames = n / mel.hop as f64;
        if !(2.0..=3000.0).contains(&frames) || frames.fract() != 0.0 || !(frames as usize).is_multiple_of(2) {
            return Err(AudioDataError::config(
                "FrontEnd",
                "seconds",
                format!("{seconds} s gives {frames} frames; need an even whole number in 2..=3000 (multiples of 0.02 s up to 30 s)"),
            ));
        }
        mel.n_samples = n as usize;
        Ok(FrontEnd { mel })
    }

    /// Loads `mel_filters.safetensors` from a Whisper model folder.
    ///
    /// # Errors
    /// As [`FrontEnd::whisper`], and file errors.
    pub fn load(model_dir: &Path, seconds: f64) -> Result<Self> {
        let f = peft_core::io::SafeTensorsFile::open(model_dir.join("mel_filters.safetensors"))?;
        Self::whisper(&f.get("mel_filters")?, seconds)
    }

    /// The window length in seconds.
    pub fn seconds(&self) -> f64 {
        self.mel.n_samples as f64 / f64::from(SAMPLE_RATE)
    }

    /// Mel frames per window.
    pub fn frames(&self) -> usize {
        self.mel.n_frames()
    }

    /// Mel bins.
    pub fn n_mels(&self) -> usize {
        self.mel.n_mels()
    }

    /// `[n_mels, frames]` features of 16 kHz samples (zero-padded or cut to the window).
    pub fn features(&self, samples_16k: &[f32]) -> Array2<f32> {
        self.mel.features(samples_16k).into_dimensionality::<Ix2>().expect("peft-rs bug: log-mel is 2-d")
    }

    /// Reads a WAV file (only the window plus a 50 ms margin for the resampler's filter), resamples it to 16 kHz
    /// and returns its features.
    ///
    /// # Errors
    /// WAV and resampling errors.
    pub fn features_of_file(&self, path: &Path) -> Result<Array2<f32>> {
        let a = read_wav_prefix(path, Some(self.seconds() + 0.05))?;
        let x = resample(&a.samples, a.sample_rate, SAMPLE_RATE)?;
        Ok(self.features(&x))
    }

    /// Features of many files, in parallel (rayon); `[n, n_mels, frames]`.
    ///
    /// # Errors
    /// The first file that fails.
    pub fn features_of_files(&self, paths: &[&Path]) -> Result<ndarray::Array3<f32>> {
        use rayon::prelude::*;
        let each: Vec<Array2<f32>> = paths.par_iter().map(|p| self.features_of_file(p)).collect::<Result<_>>()?;
        let mut out = ndarray::Array3::zeros((paths.len(), self.n_mels(), self.frames()));
        for (mut o, f) in out.outer_iter_mut().zip(&each) {
            o.assign(f);
        }
        Ok(out)
    }
}

/// SpecAugment-style masking (Park et al., 2019) of a `[n_mels, frames]` spectrogram: `freq_masks` bands of
/// `0..=freq_width` mel bins and `time_masks` spans of `0..=time_width` frames, each width and start drawn
/// uniformly (torchaudio's `FrequencyMasking` / `TimeMasking`), filled with the spectrogram's mean. (AST masks
/// its mean/std-normalised fbank with 0, i.e. with the mean; Whisper features are not zero-mean, so the mean is
/// used explicitly.) Training-time only; PETL-AST uses frequency 24 / time 80 on 128-bin, 500-frame ESC-50 input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpecAugment {
    /// Number of frequency masks.
    pub freq_masks: usize,
    /// Largest frequency-mask width (mel bins).
    pub freq_width: usize,
    /// Number of time masks.
    pub time_masks: usize,
    /// Largest time-mask width (frames).
    pub time_width: usize,
}

impl SpecAugment {
    /// Masks `spec [n_mels, frames]` in place; widths are capped at the axis length.
    pub fn apply(&self, spec: &mut Array2<f32>, rng: &mut impl Rng) {
        let (m, t) = spec.dim();
        if m == 0 || t == 0 {
            return;
        }
        let fill = spec.mean().unwrap_or(0.0);
        let span = |n: usize, width: usize, rng: &mut dyn rand::RngCore| {
            let w = rng.gen_range(0..=width.min(n));
            let s = rng.gen_range(0..=n - w);
            (s, w)
        };
        for _ in 0..self.freq_masks {
            let (s, w) = span(m, self.freq_width, rng);
            spec.slice_mut(ndarray::s![s..s + w, ..]).fill(fill);
        }
        for _ in 0..self.time_masks {
            let (s, w) = span(t, self.time_width, rng);
            spec.slice_mut(ndarray::s![.., s..s + w]).fill(fill);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;
    use rand::SeedableRng;
    use std::f64::consts::PI;

    fn sine(freq: f64, rate: f64, n: usize) -> Vec<f32> {
        (0..n).map(|i| (2.0 * PI * freq * i as f64 / rate).sin() as f32).collect()
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    /// 8 -> 16 kHz: a 440 Hz sine comes out as the analytic 440 Hz sine at 16 kHz (away from the edges, where
    /// the filter sees the zero padding).
    #[test]
    fn upsampled_sine_matches_the_analytic_sine() -> Result<()> {
        let x = sine(440.0, 8000.0, 4000);
        let y = resample(&x, 8000, 16_000)?;
        assert_eq!(y.len(), 8000);
        let want = sine(440.0, 16_000.0, 8000);
        let err = y[400..7600].iter().zip(&want[400..7600]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 2e-3, "max error {err}");
        // 3 kHz (0.75 of the old Nyquist frequency) still passes within 1%
        let y = resample(&sine(3000.0, 8000.0, 4000), 8000, 16_000)?;
        let want = sine(3000.0, 16_000.0, 8000);
        let err = y[400..7600].iter().zip(&want[400..7600]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-2, "3 kHz max error {err}");
        Ok(())
    }

    /// 16 -> 8 kHz: a 6 kHz tone (above the new 4 kHz Nyquist) would alias to 2 kHz under decimation; the
    /// low-pass removes it, while a 1 kHz tone keeps its amplitude.
    #[test]
    fn downsampling_removes_tones_above_the_new_nyquist() -> Result<()> {
        let hi = resample(&sine(6000.0, 16_000.0, 16_000), 16_000, 8000)?;
        let naive: Vec<f32> = sine(6000.0, 16_000.0, 16_000).into_iter().step_by(2).collect();
        assert!(rms(&naive[400..7600]) > 0.6, "decimation alone aliases the tone");
        let r = rms(&hi[400..7600]);
        assert!(r < 1e-2, "aliased residue rms {r} (input rms 0.707)");
        let lo = resample(&sine(1000.0, 16_000.0, 16_000), 16_000, 8000)?;
        let r = rms(&lo[400..7600]);
        assert!((r - std::f64::consts::FRAC_1_SQRT_2).abs() < 5e-3, "1 kHz rms {r}");
        Ok(())
    }

    fn filters() -> ArrayD<f32> {
        ArrayD::from_shape_fn(IxDyn(&[201, 8]), |ix| if ix[0] / 25 == ix[1] { 0.05 } else { 0.0 })
    }

    #[test]
    fn window_features_equal_the_first_frames_of_the_30s_features() -> Result<()> {
        let fe = FrontEnd::whisper(&filters(), 1.0)?;
        assert_eq!((fe.frames(), fe.n_mels()), (100, 8));
        // a 0.6 s chirp-like clip
        let x: Vec<f32> = (0..9600).map(|i| ((i as f32 * 0.03) + (i as f32 * 1e-5).powi(2)).sin() * 0.3).collect();
        let short = fe.features(&x);
        let full = LogMel::whisper(&filters())?.features(&x);
        assert_eq!(full.shape(), &[8, 3000]);
        for m in 0..8 {
            for t in 0..100 {
                assert!((short[[m, t]] - full[[m, t]]).abs() < 1e-6, "mel {m} frame {t}");
            }
        }
        Ok(())
    }

    #[test]
    fn window_lengths_must_give_even_frame_counts() {
        for bad in [0.0, 0.01, 0.03, 30.02, -1.0, 0.015] {
            assert!(matches!(FrontEnd::whisper(&filters(), bad), Err(AudioDataError::InvalidConfig { .. })), "{bad}");
        }
        assert_eq!(FrontEnd::whisper(&filters(), 30.0).map(|f| f.frames()).ok(), Some(3000));
        assert_eq!(FrontEnd::whisper(&filters(), 0.64).map(|f| f.frames()).ok(), Some(64));
    }

    #[test]
    fn spec_augment_masks_bounded_bands_with_the_mean_and_is_seeded() {
        let base = Array2::from_shape_fn((20, 50), |(m, t)| (m * 50 + t) as f32);
        let mean = base.mean().unwrap_or(0.0);
        let aug = SpecAugment { freq_masks: 1, freq_width: 5, time_masks: 2, time_width: 8 };
        let mut a = base.clone();
        aug.apply(&mut a, &mut rand::rngs::StdRng::seed_from_u64(7));
        let mut b = base.clone();
        aug.apply(&mut b, &mut rand::rngs::StdRng::seed_from_u64(7));
        assert_eq!(a, b, "same seed, same masks");
        // every changed entry holds the mean; masked rows/cols are whole bands
        let changed: Vec<(usize, usize)> =
            a.indexed_iter().filter(|(ix, v)| **v != base[*ix]).map(|(ix, _)| ix).collect();
        assert!(changed.iter().all(|&ix| a[ix] == mean));
        let full_rows = (0..20).filter(|&m| (0..50).all(|t| a[[m, t]] == mean)).count();
        let full_cols = (0..50).filter(|&t| (0..20).all(|m| a[[m, t]] == mean)).count();
        assert!(full_rows <= 5 && full_cols <= 16, "rows {full_rows} cols {full_cols}");
        // over seeds the masks do hit something
        let hits = (0..20u64)
            .filter(|&s| {
                let mut c = base.clone();
                aug.apply(&mut c, &mut rand::rngs::StdRng::seed_from_u64(s));
                c != base
            })
            .count();
        assert!(hits >= 15, "{hits}/20 seeds masked anything");
        let none = SpecAugment { freq_masks: 0, freq_width: 5, time_masks: 0, time_width: 5 };
        let mut c = base.clone();
        none.apply(&mut c, &mut rand::rngs::StdRng::seed_from_u64(1));
        assert_eq!(c, base);
    }
}
