//! `y = x · Wᵀ` with a pruned weight: peft-core's dense `linear` (the `Linear` forward, no grad) against the
//! CSR kernel of `peft_sparse::csr`, on MiniLM's FFN shapes (`[1536, 384]` up, `[384, 1536]` down) at 0%, 50%,
//! 75%, 90% and 95% unstructured sparsity (magnitude-free: random positions), batch 1, 8 and 128 rows.
//!
//! `cargo bench -p peft-sparse --bench sparse_gemm -- --warm-up-time 1 --measurement-time 3`.

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::{no_grad, Tensor};
use peft_sparse::csr::CsrMatrix;
use rand::{Rng, SeedableRng};

/// `[out, in]` weights with `sparsity` of the entries zero.
fn weight(out: usize, inp: usize, sparsity: f64, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..out * inp).map(|_| if rng.gen::<f64>() < sparsity { 0.0 } else { rng.gen_range(-1.0f32..1.0) }).collect()
}

fn sparse_gemm(c: &mut Criterion) {
    for (out, inp) in [(1536usize, 384usize), (384, 1536)] {
        let mut g = c.benchmark_group(format!("ffn_{out}x{inp}"));
        for batch in [1usize, 8, 128] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let x = Array2::from_shape_fn((batch, inp), |_| rng.gen_range(-1.0f32..1.0));
            let xt = Tensor::new(x.clone().into_dyn());
            for sparsity in [0.0, 0.5, 0.75, 0.9, 0.95] {
                let w = weight(out, inp, sparsity, 3);
                let pct = (sparsity * 100.0).round() as u32;
                let id = format!("b{batch}_s{pct}");
                let wt = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[out, inp]), w.clone()).expect("shape"));
                g.bench_function(BenchmarkId::new("dense", &id), |b| {
                    b.iter(|| no_grad(|| black_box(&xt).linear(black_box(&wt), None)).expect("dense"))
                });
                let csr = CsrMatrix::from_dense(&w, out, inp).expect("csr");
                g.bench_function(BenchmarkId::new("csr", &id), |b| {
                    b.iter(|| black_box(&csr).matmul_t(black_box(x.view())).expect("csr"))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, sparse_gemm);
criterion_main!(benches);
