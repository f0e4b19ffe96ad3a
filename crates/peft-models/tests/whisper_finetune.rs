//! Head-only fine-tuning smoke test: a fresh `classifier` on the frozen Whisper tiny.en encoder, trained on 8 FSDD
//! training clips (WAV -> 16 kHz -> log-mel), lowers the training loss. The frozen encoder runs once (no grad) and
//! its pooled output is cached, which is exactly what head-only training needs.

use ndarray::{Array3, Axis};
use peft_core::io::{SafeTensorsFile, WhisperConfig};
use peft_core::nn::{named_params, Ctx};
use peft_core::optim::Optimizer;
use peft_core::testing::require_asset;
use peft_core::{no_grad, AdamW, Tensor};
use peft_models::audio::{read_wav, resample, LogMel};
use peft_models::whisper::{WhisperClassifier, WhisperEncoder};

#[test]
fn head_only_training_lowers_loss_on_fsdd_clips() {
    let (Some(model_dir), Some(fsdd)) = (require_asset("models/whisper-tiny.en-encoder"), require_asset("data/fsdd"))
    else {
        return;
    };
    let t0 = std::time::Instant::now();
    let split = std::fs::read_to_string(fsdd.join("split.csv")).expect("split.csv");
    // 8 training clips: digits 0-3, speakers george and theo, take 5
    let clips: Vec<(String, i64)> = split
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let label: i64 = f.get(1)?.parse().ok()?;
            let keep =
                f.get(4) == Some(&"train") && f.get(3) == Some(&"5") && label < 4 && matches!(f[2], "george" | "theo");
            keep.then(|| (f[0].to_string(), label))
        })
        .collect();
    assert_eq!(clips.len(), 8);
    let filters = SafeTensorsFile::open(model_dir.join("mel_filters.safetensors"))
        .and_then(|f| f.get("mel_filters"))
        .expect("mel filters");
    let mel = LogMel::whisper(&filters).expect("log-mel");
    let mut feats = Array3::<f32>::zeros((clips.len(), mel.n_mels(), mel.n_frames()));
    for (i, (path, _)) in clips.iter().enumerate() {
        let a = read_wav(fsdd.join(path)).expect("read wav");
        let x = resample(&a.samples, a.sample_rate, 16_000).expect("resample");
        feats.index_axis_mut(Axis(0), i).assign(&mel.features(&x).into_dimensionality::<ndarray::Ix2>().expect("2-d"));
    }
    let labels: Vec<i64> = clips.iter().map(|c| c.1).collect();

    let cfg = WhisperConfig::load(model_dir.join("config.json")).expect("config");
    let weights = SafeTensorsFile::open(model_dir.join("model.safetensors")).expect("weights");
    let model = WhisperClassifier::new(WhisperEncoder::load(&cfg, &weights).expect("encoder"), 10, 0).expect("head");
    let trainable: Vec<_> = named_params(&model).into_iter().filter(|p| p.trainable()).collect();
    assert_eq!(trainable.len(), 2);
    let pooled = no_grad(|| model.encoder.pooled(&Tensor::new(feats.into_dyn()), &Ctx::eval())).expect("encoder");
    let t_enc = t0.elapsed().as_secs_f64();

    let mut opt = AdamW::with_lr(trainable, 1e-2, 0.0).expect("optimizer");
    let ctx = Ctx::train(0);
    let mut losses = Vec::new();
    for _ in 0..30 {
        let loss = model.head(&pooled, &ctx).and_then(|l| l.cross_entropy(&labels, None, 0.0)).expect("loss");
        losses.push(loss.as_slice()[0]);
        let grads = loss.backward().expect("backward");
        opt.step(&grads).expect("step");
    }
    let (first, last) = (losses[0], *losses.last().expect("losses"));
    println!(
        "whisper head-only: loss {first:.4} -> {last:.4} over 30 steps; features+encoder {t_enc:.1} s, total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}
