//! Encoder benchmarks for the GLUE setting (compare with `benches/baselines/torch_encoder.py`):
//! (a) one training step (forward + backward) of a BERT-sized encoder layer (batch 32, seq 128, hidden 384,
//! 12 heads, FFN 1536) with frozen weights, a trainable input (so the gradient flows through the whole layer, as
//! with adapters in lower layers) and a trainable 2-class head on the mean-pooled output;
//! (b) MiniLM-L6 (all-MiniLM-L6-v2 shapes, random weights) forward throughput, batch 32 x seq 128.
//!
//! ```text
//! cargo bench -p peft-core --bench encoder_step
//! RAYON_NUM_THREADS=2 cargo bench -p peft-core --bench encoder_step   # pin the thread count
//! ```

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ndarray::{ArrayD, IxDyn};
use peft_core::io::BertConfig;
use peft_core::nn::{Activation, Ctx, EncoderConfig, EncoderLayer, EncoderNames, NormPlacement, RandomInit};
use peft_core::{no_grad, Tensor};
use peft_models::bert::BertModel;
use peft_models::tokenizer::Batch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const B: usize = 32;
const L: usize = 128;
const H: usize = 384;

fn minilm_config() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: H,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        ..BertConfig::default()
    }
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.gen_range(-1.0f32..1.0))
}

fn encoder_layer_step(c: &mut Criterion) {
    let cfg = EncoderConfig {
        hidden: H,
        heads: 12,
        intermediate: 1536,
        act: Activation::Gelu,
        eps: 1e-12,
        norm: NormPlacement::Post,
        k_bias: true,
        dropout: 0.0,
    };
    let layer = EncoderLayer::load("encoder.layer.0", &EncoderNames::BERT, &cfg, &RandomInit::new(0, 0.02)).unwrap();
    let x = Tensor::var(random(&[B, L, H], 1));
    let head = Tensor::var(random(&[2, H], 2).mapv(|v| v * 0.02));
    let labels: Vec<i64> = (0..B as i64).map(|i| i % 2).collect();
    let ctx = Ctx::eval();
    let mut g = c.benchmark_group("encoder_layer_train_step");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3)).throughput(Throughput::Elements((B * L) as u64));
    g.bench_function("b32_l128_h384", |b| {
        b.iter(|| {
            let h = layer.forward(&x, None, &ctx).unwrap();
            let pooled = h.mean(&[1], false).unwrap();
            let loss = pooled.linear(&head, None).unwrap().cross_entropy(&labels, None, 0.0).unwrap();
            loss.backward().unwrap()
        })
    });
    g.finish();
}

fn minilm_forward(c: &mut Criterion) {
    let model = BertModel::from_source(&minilm_config(), &RandomInit::new(0, 0.02)).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let rows: Vec<Vec<usize>> = (0..B).map(|_| (0..L).map(|_| rng.gen_range(1000..30000)).collect()).collect();
    let batch = Batch::from_rows(&rows).unwrap();
    let ctx = Ctx::eval();
    let mut g = c.benchmark_group("minilm_forward");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements((B * L) as u64));
    g.bench_function("b32_l128", |b| b.iter(|| no_grad(|| model.forward(&batch, &ctx).unwrap())));
    g.finish();
}

criterion_group!(benches, encoder_layer_step, minilm_forward);
criterion_main!(benches);
