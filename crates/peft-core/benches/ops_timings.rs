//! Timings of the fused attention kernel and the convolution front ends, each next to a baseline measured in the
//! same run (formerly the `#[ignore]` tests `attention_timings` and `conv_front_end_timings`):
//! - scaled-dot-product attention forward and forward+backward vs the same attention composed from
//!   matmul / softmax primitives, for a BERT-base shape and a LLaMA-ish causal GQA shape;
//! - DINOv2's 14x14/14 patch embedding and Whisper-tiny's two 1-d convolutions vs one GEMM of the same size;
//! - GELU's derivative over a MiniLM FFN activation (16 x 32 tokens x 1536) with `Elem::exp_fast` (what the
//!   backward uses) vs the same loop with libm's `exp`, and the whole GELU forward+backward.
//!
//! ```text
//! cargo bench -p peft-core --bench ops_timings
//! RAYON_NUM_THREADS=2 cargo bench -p peft-core --bench ops_timings -- attention   # one group, pinned threads
//! ```

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};
use ndarray::{ArrayD, Dimension, IxDyn};
use peft_core::{Result, Tensor};

/// The attention of `q [B, H, Lq, D]` over `k, v [B, Hkv, Lk, D]` composed from primitives (GQA by repeating
/// heads, causal mask as an additive bias, max-subtracted softmax).
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let (b, h, lq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (hkv, lk) = (k.shape()[1], k.shape()[2]);
    let map: Vec<usize> = (0..h).map(|x| x / (h / hkv)).collect();
    let (kr, vr) = (k.index_select(1, &map)?, v.index_select(1, &map)?);
    let bias = ArrayD::from_shape_fn(IxDyn(&[b, 1, lq, lk]), |ix| {
        if !causal || ix[3] as isize <= ix[2] as isize + lk as isize - lq as isize {
            0.0
        } else {
            -1e30
        }
    });
    let s = q.matmul_nt(&kr)?.mul_scalar(1.0 / (d as f32).sqrt()).add(&Tensor::new(bias))?;
    let e = s.sub(&s.max(3, true)?.detach())?.exp();
    e.div(&e.sum(&[3], true)?)?.matmul(&vr)
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
}

fn attention(c: &mut Criterion) {
    let rnd = |s: &[usize]| {
        Tensor::<f32>::var(ArrayD::from_shape_fn(IxDyn(s), |ix| ((ix[2] * 13 + ix[3] * 7 + ix[1]) % 17) as f32 * 0.05))
    };
    let mut g = c.benchmark_group("attention");
    configure(&mut g);
    for (name, b, h, hkv, l, d, causal) in
        [("bert_8x12x128x64", 8, 12, 12, 128, 64, false), ("llama_gqa_1x32of8x512x64_causal", 1, 32, 8, 512, 64, true)]
    {
        let (q, k, v) = (rnd(&[b, h, l, d]), rnd(&[b, hkv, l, d]), rnd(&[b, hkv, l, d]));
        g.bench_function(format!("{name}/fused_fwd"), |bch| {
            bch.iter(|| peft_core::no_grad(|| q.scaled_dot_product_attention(&k, &v, None, causal, None).unwrap()))
        });
        g.bench_function(format!("{name}/composed_fwd"), |bch| {
            bch.iter(|| peft_core::no_grad(|| composed(&q, &k, &v, causal).unwrap()))
        });
        g.bench_function(format!("{name}/fused_fwd_bwd"), |bch| {
            bch.iter(|| {
                let y = q.scaled_dot_product_attention(&k, &v, None, causal, None).unwrap();
                y.sum_all().backward().unwrap()
            })
        });
        g.bench_function(format!("{name}/composed_fwd_bwd"), |bch| {
            bch.iter(|| composed(&q, &k, &v, causal).unwrap().sum_all().backward().unwrap())
        });
    }
    g.finish();
}

fn conv_front_ends(c: &mut Criterion) {
    let rnd = |s: &[usize]| {
        Tensor::<f32>::new(ArrayD::from_shape_fn(IxDyn(s), |ix| (ix.as_array_view().sum() % 7) as f32 * 0.1))
    };
    let mut g = c.benchmark_group("conv_front_end");
    configure(&mut g);
    // ViT-B/16-style patch embedding at 14x14 (ViT-S/14 and DINOv2 use this), batch 8
    let (x, w, b) = (rnd(&[8, 3, 224, 224]), rnd(&[768, 3, 14, 14]), rnd(&[768]));
    g.bench_function("vit_patch14_fwd_8x3x224x224", |bch| {
        bch.iter(|| x.conv2d(&w, Some(&b), (14, 14), (0, 0)).unwrap())
    });
    // baseline: one GEMM of the same size ([768, 588] x [8, 588, 256])
    let (w2, cm) = (rnd(&[768, 588]), rnd(&[8, 588, 256]));
    g.bench_function("vit_patch14_baseline_gemm_768x588x(8x256)", |bch| bch.iter(|| w2.matmul(&cm).unwrap()));
    let (xv, wv) = (Tensor::var(x.data().to_owned()), Tensor::var(w.data().to_owned()));
    g.bench_function("vit_patch14_fwd_bwd", |bch| {
        bch.iter(|| xv.conv2d(&wv, Some(&b), (14, 14), (0, 0)).unwrap().sum_all().backward().unwrap())
    });
    // Whisper tiny front end: 80 -> 384, k3 p1; 384 -> 384, k3 s2 p1 over 3000 frames
    let (m, w1, w3, b1) = (rnd(&[1, 80, 3000]), rnd(&[384, 80, 3]), rnd(&[384, 384, 3]), rnd(&[384]));
    g.bench_function("whisper_conv1_fwd_1x80x3000", |bch| bch.iter(|| m.conv1d(&w1, Some(&b1), 1, 1).unwrap()));
    let (wa, ca) = (rnd(&[384, 240]), rnd(&[240, 3000]));
    g.bench_function("whisper_conv1_baseline_gemm_384x240x3000", |bch| bch.iter(|| wa.matmul(&ca).unwrap()));
    let h = m.conv1d(&w1, Some(&b1), 1, 1).unwrap();
    g.bench_function("whisper_conv2_fwd_1x384x3000", |bch| bch.iter(|| h.conv1d(&w3, Some(&b1), 2, 1).unwrap()));
    let (wb, cb) = (rnd(&[384, 1152]), rnd(&[1152, 1500]));
    g.bench_function("whisper_conv2_baseline_gemm_384x1152x1500", |bch| bch.iter(|| wb.matmul(&cb).unwrap()));
    let hv = Tensor::var(h.data().to_owned());
    g.bench_function("whisper_conv2_fwd_bwd_dx", |bch| {
        bch.iter(|| hv.conv1d(&w3, Some(&b1), 2, 1).unwrap().sum_all().backward().unwrap())
    });
    g.finish();
}

/// `d/dx GELU(x) = Φ(x) + x·φ(x)` over a slice, with `exp` as given.
#[inline(always)]
fn gelu_grad(x: &[f32], out: &mut [f32], exp: impl Fn(f32) -> f32) {
    use peft_core::Elem;
    let c = (1.0 / (2.0 * std::f64::consts::PI).sqrt()) as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + Elem::erf(v * std::f32::consts::FRAC_1_SQRT_2));
        *o = cdf + v * exp(-0.5 * v * v) * c;
    }
}

fn gelu(c: &mut Criterion) {
    use peft_core::Elem;
    let n = 16 * 32 * 1536;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 * 4e-3 - 4.0).collect();
    let mut out = vec![0f32; n];
    let mut g = c.benchmark_group("gelu");
    configure(&mut g);
    g.bench_function("grad_exp_fast_512x1536", |b| b.iter(|| gelu_grad(&x, &mut out, Elem::exp_fast)));
    g.bench_function("grad_baseline_libm_exp_512x1536", |b| b.iter(|| gelu_grad(&x, &mut out, f32::exp)));
    // The same exp_fast loop compiled for AVX2 + FMA through `backend::wide` (8 lanes instead of SSE2's 4).
    g.bench_function("grad_exp_fast_wide_512x1536", |b| {
        b.iter(|| peft_core::backend::wide(|| gelu_grad(&x, &mut out, Elem::exp_fast)))
    });
    let t = Tensor::var(ArrayD::from_shape_vec(IxDyn(&[512, 1536]), x.clone()).unwrap());
    g.bench_function("tensor_gelu_fwd_bwd_512x1536", |b| b.iter(|| t.gelu().sum_all().backward().unwrap()));
    g.finish();
}

criterion_group!(benches, attention, conv_front_ends, gelu);
criterion_main!(benches);
