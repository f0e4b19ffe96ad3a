//! What the 1 s window changes (peft-audio `features` module docs): for FSDD test clips, the Whisper tiny.en
//! encoder's hidden states on a 1 s window (100 frames, 50 positions) against the first 50 positions of the
//! same clip in Whisper's 30 s window, and the mean-pooled vectors (1 s mean vs 30 s mean over all 1500
//! positions, and vs the 30 s mean over the first 50). Prints cosine similarities.
//!
//! ```sh
//! cargo run --release -p peft-audio --example window_effect -- [--clips 8]
//! ```

use std::time::Instant;

use peft_audio::dataset::ClipSet;
use peft_audio::encoder::encode_window;
use peft_audio::features::FrontEnd;
use peft_core::io::{SafeTensorsFile, WhisperConfig};
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_core::{no_grad, Tensor};
use peft_models::whisper::WhisperEncoder;

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-30)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let clips: usize =
        args.iter().position(|a| a == "--clips").and_then(|i| args.get(i + 1)).map_or(Ok(8), |s| s.parse())?;
    let (Some(dir), Some(fsdd)) = (require_asset("models/whisper-tiny.en-encoder"), require_asset("data/fsdd")) else {
        return Err("assets not found".into());
    };
    let cfg = WhisperConfig::load(dir.join("config.json"))?;
    let enc = WhisperEncoder::load(&cfg, &SafeTensorsFile::open(dir.join("model.safetensors"))?)?;
    let (short, full) = (FrontEnd::load(&dir, 1.0)?, FrontEnd::load(&dir, 30.0)?);
    let set = ClipSet::fsdd(&fsdd)?;
    let test = set.split("test")?;
    let d = cfg.d_model;
    let (mut tok, mut pooled_all, mut pooled_first) = (Vec::new(), Vec::new(), Vec::new());
    let t0 = Instant::now();
    // every 30th test clip: spread over digits and speakers
    for &i in test.iter().step_by((test.len() / clips.max(1)).max(1)).take(clips) {
        let path = &set.clips[i].path;
        let (fs, ff) = (short.features_of_file(path)?, full.features_of_file(path)?);
        let (hs, hf) = no_grad(|| -> peft_core::Result<(Tensor, Tensor)> {
            let hs = encode_window(&enc, &Tensor::new(fs.insert_axis(ndarray::Axis(0)).into_dyn()), &Ctx::eval())?;
            let hf = enc.forward(&Tensor::new(ff.insert_axis(ndarray::Axis(0)).into_dyn()), &Ctx::eval())?;
            Ok((hs, hf))
        })?;
        let (hs, hf) = (hs.to_vec(), hf.to_vec());
        let p = hs.len() / d;
        let per_tok: Vec<f64> = (0..p).map(|t| cos(&hs[t * d..(t + 1) * d], &hf[t * d..(t + 1) * d])).collect();
        tok.push(per_tok.iter().sum::<f64>() / p as f64);
        let mean = |h: &[f32], n: usize| -> Vec<f32> {
            (0..d).map(|j| (0..n).map(|t| h[t * d + j]).sum::<f32>() / n as f32).collect()
        };
        let ms = mean(&hs, p);
        pooled_all.push(cos(&ms, &mean(&hf, hf.len() / d)));
        pooled_first.push(cos(&ms, &mean(&hf, p)));
        println!(
            "{}: per-position cosine (1 s vs first {p} of 30 s) mean {:.4} min {:.4}; pooled 1 s vs 30 s-all {:.4}, vs 30 s-first-{p} {:.4}",
            path.file_name().map_or_else(String::new, |f| f.to_string_lossy().to_string()),
            tok.last().copied().unwrap_or(0.0),
            per_tok.iter().copied().fold(f64::INFINITY, f64::min),
            pooled_all.last().copied().unwrap_or(0.0),
            pooled_first.last().copied().unwrap_or(0.0),
        );
    }
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{} clips: mean per-position cosine {:.4}; pooled cosine vs 30 s mean-over-1500 {:.4}, vs 30 s mean-over-first-50 {:.4} ({:.1} s)",
        tok.len(),
        avg(&tok),
        avg(&pooled_all),
        avg(&pooled_first),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
