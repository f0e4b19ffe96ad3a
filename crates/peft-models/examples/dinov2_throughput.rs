//! Forward throughput (images/s) of the DINOv2-small backbone on random 224x224 pixels, no autograd, f32.
//!
//! `cargo run --release -p peft-core --example dinov2_throughput -- [threads] [batch] [secs]` prints one JSON
//! line; `benches/baselines/torch_dinov2.py` measures transformers' `Dinov2Model` the same way (same weights,
//! batch, timing rule: best of >= 3 timed runs after one warm-up, >= `secs` seconds).

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use peft_core::io::hf_config::Dinov2Config;
use peft_core::io::SafeTensorsFile;
use peft_core::nn::{Ctx, RandomInit};
use peft_core::testing::require_asset;
use peft_core::{no_grad, Tensor};
use peft_models::vit::Dinov2;
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let threads = args.first().copied().unwrap_or(1);
    let batch = args.get(1).copied().unwrap_or(8);
    let secs = args.get(2).copied().unwrap_or(3) as f64;
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let model = match require_asset("models/dinov2-small") {
        Some(dir) => {
            let cfg = Dinov2Config::load(dir.join("config.json"))?;
            Dinov2::load(&cfg, &SafeTensorsFile::open(dir.join("model.safetensors"))?)?
        }
        None => {
            let cfg = Dinov2Config::from_json(
                r#"{"hidden_size":384,"num_attention_heads":6,"image_size":518,"use_mask_token":false}"#,
            )?;
            Dinov2::load(&cfg, &RandomInit::new(0, 0.02))?
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let pixels = Tensor::new(ArrayD::from_shape_fn(IxDyn(&[batch, 3, 224, 224]), |_| rng.gen_range(-2.0f32..2.0)));
    let ctx = Ctx::eval();
    let run = || no_grad(|| model.forward(&pixels, &ctx)).map(|o| o.cls.as_slice()[0]);
    run()?;
    let (mut best, mut runs, start) = (f64::INFINITY, 0, Instant::now());
    while runs < 3 || (start.elapsed().as_secs_f64() < secs && runs < 100) {
        let t = Instant::now();
        std::hint::black_box(run()?);
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    println!(
        "{{\"impl\":\"peft-rs\",\"threads\":{threads},\"batch\":{batch},\"runs\":{runs},\"best_s\":{best:.4},\"images_per_s\":{:.2}}}",
        batch as f64 / best
    );
    Ok(())
}
