//! Audio front end: WAV reading (`hound`, feature `audio`), polyphase resampling matching `scipy.signal.resample_poly`, and the
//! Whisper log-mel spectrogram exactly as transformers' `WhisperFeatureExtractor` computes it.
//!
//! Everything here works in f64 internally and hands out f32, like the Python reference pipeline.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};

use peft_core::backend::{gemm, MatRef};

/// Errors of the audio front end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AudioError {
    /// The WAV file could not be opened or parsed.
    #[cfg(feature = "audio")]
    #[error("{}: {source}", path.display())]
    Wav {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: hound::Error,
    },
    /// A WAV sample format this reader does not decode.
    #[error("{}: unsupported WAV format {format} (supported: 8/16/24/32-bit integer PCM, 32-bit float PCM)", path.display())]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The format found, e.g. `"64-bit float"`.
        format: String,
    },
    /// A sample rate outside [`SAMPLE_RATES`] (a header saying 100 MHz would make the resampler's filter
    /// gigabytes long).
    #[error(
        "{}sample rate {rate} Hz is outside the supported {}..={} Hz",
        file_prefix(path.as_deref()),
        SAMPLE_RATES.start(),
        SAMPLE_RATES.end()
    )]
    SampleRate {
        /// The file, when the rate came from one.
        path: Option<PathBuf>,
        /// The rate found.
        rate: u32,
    },
    /// A resampling ratio the polyphase resampler refuses: a zero factor, a filter longer than
    /// `2 * MAX_HALF_LEN + 1` taps, or an output length that overflows.
    #[error("resample_poly: up {up} / down {down}: {reason}")]
    Resample {
        /// The (reduced) up factor.
        up: usize,
        /// The (reduced) down factor.
        down: usize,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Mel filters of a shape other than `[201, n_mels]`.
    #[error("LogMel: mel filters must be [201, n_mels], got {shape:?}")]
    MelFilters {
        /// The shape given.
        shape: Vec<usize>,
    },
}

/// The sample rates [`read_wav`] accepts and [`resample`] converts between: 1 kHz (below any speech corpus) to
/// 384 kHz (the highest rate audio interfaces record). The resampler's filter grows with the rates' reduced
/// ratio (`20 * max(up, down) + 1` taps), which this range keeps below ~8 million taps (64 MB).
pub const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 1_000..=384_000;

/// `"PATH: "` for messages about a file, `""` otherwise.
fn file_prefix(path: Option<&Path>) -> String {
    path.map(|p| format!("{}: ", p.display())).unwrap_or_default()
}

/// Fails with [`AudioError::SampleRate`] for a rate outside [`SAMPLE_RATES`].
fn check_rate(path: Option<&Path>, rate: u32) -> AudioResult<()> {
    if SAMPLE_RATES.contains(&rate) {
        Ok(())
    } else {
        Err(AudioError::SampleRate { path: path.map(Path::to_path_buf), rate })
    }
}

/// Result alias for the audio front end.
pub type AudioResult<T> = std::result::Result<T, AudioError>;

/// Decoded audio: mono samples in `[-1, 1]` and their sample rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Audio {
    /// Samples (multi-channel input is averaged to mono).
    pub samples: Vec<f32>,
    /// Sample rate in Hz.
    pub sample_rate: u32,
}

/// Reads a WAV file: 8/16/24/32-bit integer PCM (scaled by `2^(bits-1)`, so 16-bit gives `int16 / 32768` as
/// `scipy.io.wavfile` + division does) or 32-bit float PCM, any channel count (channels are averaged).
///
/// # Errors
/// [`AudioError::Wav`] for unreadable files; [`AudioError::UnsupportedFormat`] naming any other sample format;
/// [`AudioError::SampleRate`] for a rate outside [`SAMPLE_RATES`].
#[cfg(feature = "audio")]
pub fn read_wav(path: impl AsRef<Path>) -> AudioResult<Audio> {
    read_wav_prefix(path, None)
}

/// [`read_wav`] reading only the first `max_seconds` of the file (all of it for `None`): a one-hour file costs
/// no more than the window a model uses (Whisper: 30 s).
///
/// # Errors
/// As [`read_wav`].
#[cfg(feature = "audio")]
pub fn read_wav_prefix(path: impl AsRef<Path>, max_seconds: Option<f64>) -> AudioResult<Audio> {
    let path = path.as_ref();
    let wav = |source| AudioError::Wav { path: path.to_path_buf(), source };
    let mut reader = match hound::WavReader::open(path) {
        Ok(r) => r,
        Err(e) => {
            // hound refuses some formats while parsing the header; name them from the fmt chunk ourselves (the
            // header is at the start: read at most 64 KiB, never the whole file)
            let described = head_bytes(path, 1 << 16).and_then(|b| describe_fmt(&b));
            return Err(match described {
                Some((format, false)) => AudioError::UnsupportedFormat { path: path.to_path_buf(), format },
                _ => wav(e),
            });
        }
    };
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    if channels == 0 {
        return Err(AudioError::UnsupportedFormat { path: path.to_path_buf(), format: "0 channels".into() });
    }
    check_rate(Some(path), spec.sample_rate)?;
    // Interleaved samples to read: whole frames, at most `max_seconds` of them.
    let limit = match max_seconds {
        Some(secs) => ((secs.max(0.0) * f64::from(spec.sample_rate)).ceil() as usize).saturating_mul(channels),
        None => usize::MAX,
    };
    let interleaved: Vec<f64> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = f64::from(1u32 << (bits - 1));
            reader
                .samples::<i32>()
                .take(limit)
                .map(|s| s.map(|v| f64::from(v) / scale))
                .collect::<Result<_, _>>()
                .map_err(wav)?
        }
        (hound::SampleFormat::Float, 32) => {
            reader.samples::<f32>().take(limit).map(|s| s.map(f64::from)).collect::<Result<_, _>>().map_err(wav)?
        }
        (fmt, bits) => {
            let kind = if fmt == hound::SampleFormat::Int { "integer" } else { "float" };
            return Err(AudioError::UnsupportedFormat {
                path: path.to_path_buf(),
                format: format!("{bits}-bit {kind} PCM"),
            });
        }
    };
    let samples = interleaved.chunks(channels).map(|c| (c.iter().sum::<f64>() / c.len() as f64) as f32).collect();
    Ok(Audio { samples, sample_rate: spec.sample_rate })
}

/// The first `n` bytes of the file at `path` (fewer for a shorter file); `None` when it cannot be read.
#[cfg(feature = "audio")]
fn head_bytes(path: &Path, n: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    std::fs::File::open(path).ok()?.take(n).read_to_end(&mut v).ok()?;
    Some(v)
}

/// The sample format named by a RIFF/WAVE file's `fmt ` chunk, and whether [`read_wav`] supports it.
#[cfg(feature = "audio")]
fn describe_fmt(bytes: &[u8]) -> Option<(String, bool)> {
    let u16_at = |i: usize| bytes.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |i: usize| bytes.get(i..i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if bytes.get(0..4)? != b"RIFF" || bytes.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut pos = 12usize;
    while pos + 8 <= bytes.len() {
        let size = u32_at(pos + 4)? as usize;
        if bytes.get(pos..pos + 4)? == b"fmt " {
            let body = pos + 8;
            let mut tag = u16_at(body)?;
            let bits = u16_at(body + 14)?;
            if tag == 0xFFFE && size >= 40 {
                tag = u16_at(body + 24)?;
            }
            return Some(match tag {
                1 => (format!("{bits}-bit integer PCM"), matches!(bits, 8 | 16 | 24 | 32)),
                3 => (format!("{bits}-bit float PCM"), bits == 32),
                2 => ("MS ADPCM".into(), false),
                6 => ("A-law".into(), false),
                7 => ("mu-law".into(), false),
                0x11 => ("IMA ADPCM".into(), false),
                t => (format!("format tag 0x{t:04x}"), false),
            });
        }
        pos = pos.checked_add(8 + size + (size & 1))?;
    }
    None
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Modified Bessel function of the first kind, order 0 (power series; converges for all the arguments a Kaiser
/// window uses).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, q) = (1.0, 1.0, x * x / 4.0);
    for k in 1..200 {
        term *= q / (k * k) as f64;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum
}

/// The low-pass FIR `scipy.signal.firwin(numtaps, cutoff, window=("kaiser", beta))` (cutoff relative to Nyquist,
/// symmetric window, scaled to unit DC gain).
pub fn firwin_kaiser(numtaps: usize, cutoff: f64, beta: f64) -> Vec<f64> {
    let alpha = 0.5 * (numtaps as f64 - 1.0);
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x) };
    let i0b = bessel_i0(beta);
    let mut h: Vec<f64> = (0..numtaps)
        .map(|n| {
            let m = n as f64 - alpha;
            let r = if numtaps > 1 { 2.0 * n as f64 / (numtaps as f64 - 1.0) - 1.0 } else { 0.0 };
            let w = bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / i0b;
            cutoff * sinc(cutoff * m) * w
        })
        .collect();
    let s: f64 = h.iter().sum();
    h.iter_mut().for_each(|v| *v /= s);
    h
}

/// The longest filter half-length [`resample_poly`] builds: `10 * max(up, down)` for any pair of rates in
/// [`SAMPLE_RATES`] (a 64 MB filter at most).
pub const MAX_HALF_LEN: usize = 10 * 384_000;

/// `scipy.signal.resample_poly(x, up, down)` with its default window `("kaiser", 5.0)` and zero padding: a
/// polyphase FIR of half-length `10 * max(up, down)` (after dividing `up`, `down` by their gcd), output length
/// `ceil(len * up / down)`.
///
/// # Errors
/// [`AudioError::Resample`] when `up` or `down` is zero, when the filter would be longer than
/// `2 * MAX_HALF_LEN + 1` taps, or when the output length overflows.
pub fn resample_poly(x: &[f64], up: usize, down: usize) -> AudioResult<Vec<f64>> {
    if up == 0 || down == 0 {
        return Err(AudioError::Resample { up, down, reason: "both factors must be > 0" });
    }
    let g = gcd(up, down);
    let (up, down) = (up / g, down / g);
    if up == 1 && down == 1 {
        return Ok(x.to_vec());
    }
    let n_in = x.len();
    let too_big = || AudioError::Resample { up, down, reason: "the output length overflows" };
    let n_out = n_in.checked_mul(up).ok_or_else(too_big)?.div_ceil(down);
    let max_rate = up.max(down);
    let half_len = max_rate.checked_mul(10).filter(|h| *h <= MAX_HALF_LEN).ok_or(AudioError::Resample {
        up,
        down,
        reason: "the filter would exceed 2 * MAX_HALF_LEN + 1 taps",
    })?;
    let mut h = firwin_kaiser(2 * half_len + 1, 1.0 / max_rate as f64, 5.0);
    h.iter_mut().for_each(|v| *v *= up as f64);
    // scipy prepends `n_pre_pad` zeros to h and drops the first `n_pre_remove` outputs of upfirdn.
    let n_pre_pad = down - half_len % down;
    let n_pre_remove = (half_len + n_pre_pad) / down;
    let out = (0..n_out)
        .map(|k| {
            // upfirdn output index (on the padded filter) n = (k + n_pre_remove) * down; padded index j' = j + pre.
            let n = ((k + n_pre_remove) * down) as isize - n_pre_pad as isize;
            // y = Σ_j h[j] xu[n - j], xu[m] = x[m / up] when m % up == 0.
            let mut acc = 0.0;
            let j0 = n.rem_euclid(up as isize) as usize;
            let mut j = j0;
            while j < h.len() {
                let m = n - j as isize;
                if m < 0 {
                    break;
                }
                let i = (m as usize) / up;
                if i < n_in {
                    acc += h[j] * x[i];
                }
                j += up;
            }
            acc
        })
        .collect();
    Ok(out)
}

/// Resamples `x` from `from` Hz to `to` Hz with [`resample_poly`] (`up = to / g`, `down = from / g`).
///
/// # Errors
/// [`AudioError::SampleRate`] for a rate outside [`SAMPLE_RATES`] (checked before any filter is built).
pub fn resample(x: &[f32], from: u32, to: u32) -> AudioResult<Vec<f32>> {
    check_rate(None, from)?;
    check_rate(None, to)?;
    if from == to {
        return Ok(x.to_vec());
    }
    let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    Ok(resample_poly(&xd, to as usize, from as usize)?.into_iter().map(|v| v as f32).collect())
}

/// Whisper's log-mel front end (`WhisperFeatureExtractor`, numpy path).
#[derive(Clone, Debug)]
pub struct LogMel {
    /// Mel filterbank `[n_fft / 2 + 1, n_mels]` (frequency bins x mels).
    pub filters: Array2<f64>,
    /// FFT size (400).
    pub n_fft: usize,
    /// Hop length (160).
    pub hop: usize,
    /// Samples per chunk (480000 = 30 s at 16 kHz); input is zero-padded or trimmed to it.
    pub n_samples: usize,
}

impl LogMel {
    /// Whisper's settings (n_fft 400, hop 160, 30 s chunks) with the given filterbank `[201, n_mels]`.
    ///
    /// # Errors
    /// [`AudioError::MelFilters`] when `filters` is not `[201, n_mels]`.
    pub fn whisper(filters: &ArrayD<f32>) -> AudioResult<Self> {
        let s = filters.shape();
        if s.len() != 2 || s[0] != 201 || s[1] == 0 {
            return Err(AudioError::MelFilters { shape: s.to_vec() });
        }
        let filters = Array2::from_shape_fn((s[0], s[1]), |(i, j)| f64::from(filters[[i, j]]));
        Ok(LogMel { filters, n_fft: 400, hop: 160, n_samples: 480_000 })
    }

    /// Number of mel bins.
    pub fn n_mels(&self) -> usize {
        self.filters.ncols()
    }

    /// Number of output frames (`n_samples / hop`, the last STFT frame dropped).
    pub fn n_frames(&self) -> usize {
        self.n_samples / self.hop
    }

    /// The `[n_mels, n_frames]` features of a 16 kHz waveform: zero-pad/trim to `n_samples`; STFT with a periodic
    /// Hann window, `center=True` with reflect padding; power; mel projection; `log10(max(mel, 1e-10))`; drop the
    /// last frame; clamp at `max - 8`; `(x + 4) / 4`.
    pub fn features(&self, waveform: &[f32]) -> ArrayD<f32> {
        let (n_fft, hop, half) = (self.n_fft, self.hop, self.n_fft / 2);
        let bins = n_fft / 2 + 1;
        let mut x = vec![0.0f64; self.n_samples];
        for (d, &s) in x.iter_mut().zip(waveform) {
            *d = f64::from(s);
        }
        // reflect padding (numpy "reflect": the edge sample is not repeated)
        let n = x.len();
        let padded: Vec<f64> = (0..n + 2 * half)
            .map(|i| {
                let j = i as isize - half as isize;
                let j = if j < 0 {
                    -j
                } else if j >= n as isize {
                    2 * (n as isize - 1) - j
                } else {
                    j
                };
                x[j as usize]
            })
            .collect();
        let n_frames = 1 + (padded.len() - n_fft) / hop;
        let window: Vec<f64> =
            (0..n_fft).map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n_fft as f64).cos()).collect();
        // Only frames touching the signal can be non-zero; the rest stay at power 0.
        let used = waveform.len().min(self.n_samples);
        let live = if used + half >= n { n_frames } else { n_frames.min((used + half).div_ceil(hop) + 1) };
        let mut frames = vec![0.0f64; live * n_fft];
        for (t, row) in frames.chunks_mut(n_fft).enumerate() {
            for (k, r) in row.iter_mut().enumerate() {
                *r = padded[t * hop + k] * window[k];
            }
        }
        // DFT as one GEMM against [cos | sin] twiddles (n_fft is not a power of two).
        let mut tw = vec![0.0f64; n_fft * 2 * bins];
        for k in 0..n_fft {
            for f in 0..bins {
                let ang = 2.0 * std::f64::consts::PI * ((k * f) % n_fft) as f64 / n_fft as f64;
                tw[k * 2 * bins + f] = ang.cos();
                tw[k * 2 * bins + bins + f] = ang.sin();
            }
        }
        let mut spec = vec![0.0f64; live * 2 * bins];
        gemm(&mut spec, MatRef::row_major(&frames, live, n_fft), MatRef::row_major(&tw, n_fft, 2 * bins), false);
        let power: Vec<f64> = spec
            .chunks(2 * bins)
            .flat_map(|r| (0..bins).map(move |f| r[f] * r[f] + r[bins + f] * r[bins + f]))
            .collect();
        let n_mels = self.n_mels();
        let filt = self.filters.as_standard_layout();
        let filt = filt.as_slice().expect("peft-rs bug: standard layout is contiguous");
        let mut mel = vec![0.0f64; live * n_mels];
        gemm(&mut mel, MatRef::row_major(&power, live, bins), MatRef::row_major(filt, bins, n_mels), false);
        let out_frames = n_frames - 1;
        let floor = 1e-10f64.log10();
        let mut logmel = vec![floor; n_mels * out_frames];
        for t in 0..live.min(out_frames) {
            for m in 0..n_mels {
                logmel[m * out_frames + t] = mel[t * n_mels + m].max(1e-10).log10();
            }
        }
        let max = logmel.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let out: Vec<f32> = logmel.iter().map(|&v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32).collect();
        ArrayD::from_shape_vec(IxDyn(&[n_mels, out_frames]), out).expect("peft-rs bug: log-mel size")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firwin_matches_scipy_values() {
        // scipy.signal.firwin(5, 0.5, window=("kaiser", 5.0))
        let h = firwin_kaiser(5, 0.5, 5.0);
        let want =
            [8.398632348489337e-19, 0.2065577423269086, 0.5868845153461828, 0.2065577423269086, 8.398632348489337e-19];
        // the end taps are sinc zeros (cutoff 0.5, offset 2)
        for (a, b) in h.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{h:?}");
        }
        assert!((h.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn resample_poly_keeps_length_and_low_frequencies() -> AudioResult<()> {
        let x: Vec<f64> = (0..400).map(|i| (2.0 * std::f64::consts::PI * 0.02 * i as f64).sin()).collect();
        let y = resample_poly(&x, 2, 1)?;
        assert_eq!(y.len(), 800);
        // interior samples: the interpolated sine at half the frequency per output sample
        for (k, v) in y.iter().enumerate().take(700).skip(100) {
            let want = (2.0 * std::f64::consts::PI * 0.01 * k as f64).sin();
            assert!((v - want).abs() < 2e-3, "k {k}: {v} vs {want}");
        }
        // values from scipy.signal.resample_poly (scipy 1.17.1)
        for (k, want) in [(1, 0.051001153536473685), (2, 0.12539808982738296), (401, 0.06280571263365281)] {
            assert!((y[k] - want).abs() < 1e-12, "2/1 k {k}: {} vs {want}", y[k]);
        }
        let z = resample_poly(&x, 3, 2)?;
        assert_eq!(z.len(), 600);
        for (k, want) in [(1, 0.07473543807182573), (2, 0.1717286879623301), (301, 0.08350233258006935)] {
            assert!((z[k] - want).abs() < 1e-12, "3/2 k {k}: {} vs {want}", z[k]);
        }
        assert_eq!(resample_poly(&x, 4, 4)?, x);
        assert!(resample_poly(&x, 0, 1).is_err());
        Ok(())
    }

    #[test]
    fn log_mel_of_silence_is_constant_and_shaped() -> AudioResult<()> {
        let filters = ArrayD::from_shape_fn(IxDyn(&[201, 4]), |ix| if ix[0] / 50 == ix[1] { 0.1 } else { 0.0 });
        let lm = LogMel::whisper(&filters)?;
        let f = lm.features(&[]);
        assert_eq!(f.shape(), &[4, 3000]);
        assert!(f.iter().all(|&v| (v - (-1.5)).abs() < 1e-6));
        assert!(LogMel::whisper(&ArrayD::zeros(IxDyn(&[200, 4]))).is_err());
        Ok(())
    }

    #[test]
    fn log_mel_puts_a_tone_in_its_band_and_clamps_at_max_minus_8() -> AudioResult<()> {
        // 4 bands of 50 bins each (40 Hz per bin): a 1 kHz tone (bin 25) lands in band 0
        let filters = ArrayD::from_shape_fn(IxDyn(&[201, 4]), |ix| if ix[0] / 50 == ix[1] { 1.0 } else { 0.0 });
        let lm = LogMel::whisper(&filters)?;
        let x: Vec<f32> =
            (0..16000).map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16000.0).sin()).collect();
        let f = lm.features(&x);
        let max = f.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = f.iter().copied().fold(f32::INFINITY, f32::min);
        assert!((max - min - 2.0).abs() < 1e-5, "range {min}..{max} should be 8/4");
        assert!((f[[0, 50]] - max).abs() < 0.1);
        assert!(f[[3, 50]] < f[[0, 50]] - 1.0);
        Ok(())
    }
}

#[cfg(all(test, feature = "audio"))]
mod wav_tests {
    use super::*;

    fn write_wav(
        path: &Path,
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<std::io::BufWriter<std::fs::File>>),
    ) {
        let mut w = hound::WavWriter::create(path, spec).expect("create wav");
        write(&mut w);
        w.finalize().expect("finalize wav");
    }

    fn spec(channels: u16, bits: u16, fmt: hound::SampleFormat) -> hound::WavSpec {
        hound::WavSpec { channels, sample_rate: 8000, bits_per_sample: bits, sample_format: fmt }
    }

    #[test]
    fn int_pcm_is_scaled_by_full_scale_and_stereo_averaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p16 = dir.path().join("a16.wav");
        write_wav(&p16, spec(2, 16, hound::SampleFormat::Int), |w| {
            for s in [16384i16, -16384, 8192, 8192] {
                w.write_sample(s).expect("write");
            }
        });
        let a = read_wav(&p16).expect("read");
        assert_eq!(a.sample_rate, 8000);
        assert_eq!(a.samples, vec![0.0, 0.25]);
        for (bits, v) in [(8u16, 64i32), (24, 1 << 22), (32, 1 << 30)] {
            let p = dir.path().join(format!("m{bits}.wav"));
            write_wav(&p, spec(1, bits, hound::SampleFormat::Int), |w| {
                if bits == 8 {
                    w.write_sample(v as i8).expect("write");
                } else {
                    w.write_sample(v).expect("write");
                }
            });
            assert_eq!(read_wav(&p).expect("read").samples, vec![0.5], "{bits}-bit");
        }
        let pf = dir.path().join("f.wav");
        write_wav(&pf, spec(1, 32, hound::SampleFormat::Float), |w| w.write_sample(-0.375f32).expect("write"));
        assert_eq!(read_wav(&pf).expect("read").samples, vec![-0.375]);
    }

    /// A minimal RIFF/WAVE file with one `fmt ` chunk (16 bytes) and `data`.
    fn raw_wav(tag: u16, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(b"RIFF");
        v.extend((36 + data.len() as u32).to_le_bytes());
        v.extend(b"WAVEfmt ");
        v.extend(16u32.to_le_bytes());
        v.extend(tag.to_le_bytes());
        v.extend(1u16.to_le_bytes());
        v.extend(8000u32.to_le_bytes());
        v.extend((8000 * u32::from(bits / 8)).to_le_bytes());
        v.extend((bits / 8).to_le_bytes());
        v.extend(bits.to_le_bytes());
        v.extend(b"data");
        v.extend((data.len() as u32).to_le_bytes());
        v.extend(data);
        v
    }

    /// Issue 14 item 2: a header rate outside [`SAMPLE_RATES`] is refused before any filter is built (100 MHz
    /// made `resample` build a 16 GB filter), and `read_wav_prefix` reads only the samples asked for.
    #[test]
    fn absurd_sample_rates_are_refused_and_prefix_reads_stop_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fast.wav");
        let mut bytes = raw_wav(1, 16, &[0u8; 64]);
        bytes[24..28].copy_from_slice(&100_000_007u32.to_le_bytes());
        bytes[28..32].copy_from_slice(&200_000_014u32.to_le_bytes()); // byte rate = rate x block align
        std::fs::write(&p, &bytes).expect("write");
        let e = read_wav(&p).unwrap_err();
        assert!(matches!(e, AudioError::SampleRate { rate: 100_000_007, .. }), "{e}");
        assert!(e.to_string().contains("fast.wav") && e.to_string().contains("100000007 Hz"), "{e}");
        let e = resample(&[0.0; 16], 100_000_007, 16_000).unwrap_err();
        assert!(matches!(e, AudioError::SampleRate { rate: 100_000_007, path: None }), "{e}");
        assert!(matches!(resample(&[0.0; 16], 16_000, 0), Err(AudioError::SampleRate { rate: 0, .. })));
        assert!(resample_poly(&[0.0; 4], 100_000_007, 1).is_err(), "the filter length is capped");
        // 3 s of stereo at 8 kHz: a 1 s prefix reads 8000 frames
        let long = dir.path().join("long.wav");
        write_wav(&long, spec(2, 16, hound::SampleFormat::Int), |w| {
            for i in 0..48_000 {
                w.write_sample((i % 100) as i16).expect("write");
            }
        });
        assert_eq!(read_wav_prefix(&long, Some(1.0)).expect("read").samples.len(), 8_000);
        assert_eq!(read_wav_prefix(&long, None).expect("read").samples.len(), 24_000);
    }

    #[test]
    fn unsupported_format_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (tag, bits, name) in [(3u16, 64u16, "64-bit float PCM"), (6, 8, "A-law"), (7, 8, "mu-law")] {
            let p = dir.path().join(format!("t{tag}.wav"));
            std::fs::write(&p, raw_wav(tag, bits, &[0u8; 16])).expect("write");
            match read_wav(&p) {
                Err(AudioError::UnsupportedFormat { format, .. }) => assert_eq!(format, name),
                other => panic!("expected UnsupportedFormat for {name}, got {other:?}"),
            }
        }
        let ok = dir.path().join("ok.wav");
        std::fs::write(&ok, raw_wav(1, 16, &[0, 64, 0, 192])).expect("write");
        assert_eq!(read_wav(&ok).expect("read").samples, vec![0.5, -0.5]);
        assert!(matches!(read_wav(dir.path().join("missing.wav")), Err(AudioError::Wav { .. })));
    }
}
