//! Whisper tiny.en encoder forward throughput (seconds of audio encoded per wall-clock second), for docs/perf.md.
//! Each input is one 30 s window (`[B, 80, 3000]` log-mel of an FSDD clip, padded like Whisper pads).
//!
//! ```sh
//! cargo run --release -p peft-core --example whisper_bench -- [--batch 1,4] [--iters 3]
//! python3 benches/baselines/torch_whisper.py --batch 1,4 --iters 3     # PyTorch column, same inputs
//! ```
//! Prints one JSON line per batch size: `{"impl":"peft-rs","batch":B,"seconds":best,"audio_s_per_s":...}`; the
//! log-mel front end is timed separately (`"stage":"log_mel"`).

use std::time::Instant;

use ndarray::{Array3, Axis, Ix2};
use peft_core::io::{SafeTensorsFile, WhisperConfig};
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_core::{no_grad, Tensor};
use peft_models::audio::{read_wav, resample, LogMel};
use peft_models::whisper::WhisperEncoder;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batches: Vec<usize> = arg("--batch", "1,4").split(',').map(str::parse).collect::<Result<_, _>>()?;
    let iters: usize = arg("--iters", "3").parse()?;
    let (Some(dir), Some(wav)) =
        (require_asset("models/whisper-tiny.en-encoder"), require_asset("data/fsdd/recordings/7_theo_0.wav"))
    else {
        return Err("assets not found".into());
    };
    let cfg = WhisperConfig::load(dir.join("config.json"))?;
    let enc = WhisperEncoder::load(&cfg, &SafeTensorsFile::open(dir.join("model.safetensors"))?)?;
    let mel = LogMel::whisper(&SafeTensorsFile::open(dir.join("mel_filters.safetensors"))?.get("mel_filters")?)?;
    let a = read_wav(wav)?;
    let x = resample(&a.samples, a.sample_rate, 16_000)?;
    let t = Instant::now();
    let f = mel.features(&x).into_dimensionality::<Ix2>()?;
    let mel_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"impl\":\"peft-rs\",\"stage\":\"log_mel\",\"seconds\":{mel_s:.4},\"audio_s_per_s\":{:.1}}}",
        30.0 / mel_s
    );
    for &b in &batches {
        let mut feats = Array3::<f32>::zeros((b, f.nrows(), f.ncols()));
        for mut row in feats.axis_iter_mut(Axis(0)) {
            row.assign(&f);
        }
        let input = Tensor::new(feats.into_dyn());
        let mut best = f64::INFINITY;
        for _ in 0..iters + 1 {
            let t = Instant::now();
            let y = no_grad(|| enc.forward(&input, &Ctx::eval()))?;
            std::hint::black_box(y);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{{\"impl\":\"peft-rs\",\"stage\":\"encoder\",\"batch\":{b},\"seconds\":{best:.4},\"audio_s_per_s\":{:.2}}}",
            30.0 * b as f64 / best
        );
    }
    Ok(())
}
