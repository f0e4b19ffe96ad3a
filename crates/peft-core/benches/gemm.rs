//! GEMM backend comparison: faer, gemm, matrixmultiply and `peft_core::backend::gemm` on square and LoRA-shaped
//! f32 products at 1 and 2 threads. Throughput is FLOPs (2·m·n·k) as `Throughput::Elements`.
//!
//! ```text
//! cargo bench -p peft-core --bench gemm                               # everything; matrixmultiply at 1 thread
//! MATMUL_NUM_THREADS=2 cargo bench -p peft-core --bench gemm -- matrixmultiply   # matrixmultiply at 2 threads
//! ```
//! matrixmultiply fixes its thread count per process from `MATMUL_NUM_THREADS`, so its 2-thread numbers need
//! a second run. `examples/gemm_table.rs` prints the same comparison as a Markdown table.

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

#[path = "support/gemm_backends.rs"]
mod support;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use std::time::Duration;
use support::{Backend, Problem};

fn gemm_backends(c: &mut Criterion) {
    support::default_matrixmultiply_threads();
    let mm_threads = support::matrixmultiply_threads();
    for shape in support::shapes() {
        let mut group = c.benchmark_group(format!("gemm/{}", shape.name));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(Throughput::Elements(shape.flops()));
        let mut problem = Problem::new(&shape);
        for threads in [1, 2] {
            let pool = support::pool(threads);
            for backend in Backend::ALL {
                if backend == Backend::MatrixMultiply && threads != mm_threads {
                    continue;
                }
                let id = BenchmarkId::new(backend.name(), format!("t{threads}"));
                group.bench_function(id, |b| b.iter(|| pool.install(|| problem.run(backend, threads))));
            }
        }
        group.finish();
    }
}

criterion_group!(benches, gemm_backends);
criterion_main!(benches);
