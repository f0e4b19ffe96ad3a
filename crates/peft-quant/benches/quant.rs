//! Throughput of bitsandbytes-layout 4-bit quantisation and of the quantized linear base.
//!
//! `cargo bench -p peft-quant --bench quant`. Quantize/dequantize throughput is reported in bytes of f32 data
//! (4 bytes per weight) per second; the linear benchmarks compare `QuantLinear` (NF4 + double quant, bs 64,
//! tiles dequantised on the fly) with the dense f32 base on a 4096 x 4096 weight.

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{ArrayD, IxDyn};
use peft_core::nn::{Dense, LinearBase};
use peft_core::{Param, Tensor};
use peft_quant::{Quant4, Quant4Config, QuantFormat, QuantLinear, QuantType};
use rand::{Rng, SeedableRng};

const N: usize = 4096;

fn weights() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..N * N).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn cfg(double_quant: bool) -> Quant4Config {
    Quant4Config { quant_type: QuantType::Nf4, blocksize: 64, double_quant }
}

fn quantize(c: &mut Criterion) {
    let w = weights();
    let mut g = c.benchmark_group("nf4_bs64_4096x4096");
    g.throughput(Throughput::Bytes((N * N * 4) as u64));
    for dq in [false, true] {
        let name = if dq { "dq" } else { "plain" };
        g.bench_function(BenchmarkId::new("quantize", name), |b| {
            b.iter(|| Quant4::quantize(black_box(&w), &[N, N], &cfg(dq)).unwrap())
        });
        let q = Quant4::quantize(&w, &[N, N], &cfg(dq)).unwrap();
        g.bench_function(BenchmarkId::new("dequantize", name), |b| b.iter(|| black_box(&q).dequantize()));
        let mut out = vec![0f32; N * N];
        g.bench_function(BenchmarkId::new("dequantize_into", name), |b| {
            b.iter(|| black_box(&q).dequantize_into(&mut out))
        });
    }
    g.finish();
}

fn linear(c: &mut Criterion) {
    let w = weights();
    let dense = Dense {
        weight: Param::new("w", ArrayD::from_shape_vec(IxDyn(&[N, N]), w.clone()).unwrap(), false),
        bias: None,
    };
    let quant = QuantLinear::quantize(&w, N, N, None, &QuantFormat::Block4(cfg(true))).unwrap();
    let mut g = c.benchmark_group("linear_4096x4096");
    for batch in [1usize, 32] {
        let x = Tensor::new(ArrayD::from_shape_fn(IxDyn(&[batch, N]), |ix| ((ix[1] % 13) as f32 - 6.0) * 0.1));
        g.throughput(Throughput::Elements((batch * N * N) as u64));
        g.bench_function(BenchmarkId::new("dense_f32", batch), |b| b.iter(|| dense.forward(black_box(&x)).unwrap()));
        g.bench_function(BenchmarkId::new("nf4_dq", batch), |b| b.iter(|| quant.forward(black_box(&x)).unwrap()));
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = quantize, linear }
criterion_main!(benches);
