//! Whisper tiny.en encoder parity against transformers (`reference/whisper_tiny_en_encoder.*`): the log-mel
//! front end from `waveform_16k`, the encoder from `input_features`, and the WAV -> 16 kHz resampling path.

use ndarray::{ArrayD, Axis};
use peft_core::io::{SafeTensorsFile, WhisperConfig};
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_core::{no_grad, Tensor};
use peft_models::audio::{read_wav, resample, LogMel};
use peft_models::whisper::WhisperEncoder;

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

struct Assets {
    reference: SafeTensorsFile,
    model_dir: std::path::PathBuf,
}

fn assets() -> Option<Assets> {
    let reference = require_asset("reference/whisper_tiny_en_encoder.safetensors")?;
    let model_dir = require_asset("models/whisper-tiny.en-encoder")?;
    Some(Assets { reference: SafeTensorsFile::open(reference).expect("open reference"), model_dir })
}

fn log_mel(model_dir: &std::path::Path) -> LogMel {
    let filters = SafeTensorsFile::open(model_dir.join("mel_filters.safetensors"))
        .expect("open mel filters")
        .get("mel_filters")
        .expect("mel_filters tensor");
    LogMel::whisper(&filters).expect("filters shape")
}

#[test]
fn log_mel_from_waveform_matches_feature_extractor() {
    let Some(a) = assets() else { return };
    let wave = a.reference.get("waveform_16k").expect("waveform_16k");
    let want = a.reference.get("input_features").expect("input_features");
    let got = log_mel(&a.model_dir).features(wave.as_slice().expect("contiguous"));
    assert_eq!(got.shape(), want.shape());
    let err = max_abs(got.as_slice().expect("contiguous"), want.as_slice().expect("contiguous"));
    println!("log-mel vs input_features: max abs diff {err:.3e}");
    assert!(err <= 1e-4, "log-mel max abs diff {err}");
}

#[test]
fn wav_resampled_to_16k_matches_scipy_waveform() {
    let Some(a) = assets() else { return };
    let Some(wav) = require_asset("data/fsdd/recordings/7_theo_0.wav") else { return };
    let audio = read_wav(wav).expect("read wav");
    assert_eq!(audio.sample_rate, 8000);
    assert_eq!(audio.samples.len(), 3428);
    let got = resample(&audio.samples, audio.sample_rate, 16_000).expect("resample");
    let want = a.reference.get("waveform_16k").expect("waveform_16k");
    let err = max_abs(&got, want.as_slice().expect("contiguous"));
    println!("WAV -> resample_poly(2,1) vs waveform_16k: max abs diff {err:.3e}");
    assert!(err <= 1e-6, "resampled waveform max abs diff {err}");
    // and end to end through the log-mel front end
    let want_f = a.reference.get("input_features").expect("input_features");
    let got_f = log_mel(&a.model_dir).features(&got);
    let err_f = max_abs(got_f.as_slice().expect("contiguous"), want_f.as_slice().expect("contiguous"));
    println!("WAV -> log-mel vs input_features: max abs diff {err_f:.3e}");
    assert!(err_f <= 1e-4, "end-to-end log-mel max abs diff {err_f}");
}

#[test]
fn encoder_matches_transformers() {
    let Some(a) = assets() else { return };
    let cfg = WhisperConfig::load(a.model_dir.join("config.json")).expect("config");
    let weights = SafeTensorsFile::open(a.model_dir.join("model.safetensors")).expect("open model");
    let enc = WhisperEncoder::load(&cfg, &weights).expect("load encoder");
    assert_eq!(enc.prefix, "");
    let feats = a.reference.get("input_features").expect("input_features").insert_axis(Axis(0));
    let t0 = std::time::Instant::now();
    let out = no_grad(|| enc.forward(&Tensor::new(feats), &Ctx::eval())).expect("forward");
    println!("encoder forward (1 x 30 s): {:.2} s", t0.elapsed().as_secs_f64());
    assert_eq!(out.shape(), &[1, 1500, 384]);
    let out: ArrayD<f32> = out.data().to_owned();
    let first20: Vec<f32> = out.slice(ndarray::s![0, ..20, ..]).iter().copied().collect();
    let mean: Vec<f32> = out.index_axis(Axis(0), 0).mean_axis(Axis(0)).expect("mean").iter().copied().collect();
    let want20 = a.reference.get("encoder_output_first20").expect("first20");
    let want_mean = a.reference.get("encoder_output_mean").expect("mean");
    let e20 = max_abs(&first20, want20.as_slice().expect("contiguous"));
    let em = max_abs(&mean, want_mean.as_slice().expect("contiguous"));
    println!("encoder first 20 frames: max abs diff {e20:.3e}; frame mean: max abs diff {em:.3e}");
    assert!(e20 <= 1e-3 && em <= 1e-3, "encoder diffs {e20} / {em}");
}
