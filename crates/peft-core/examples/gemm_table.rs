//! Prints a Markdown table of f32 GEMM GFLOP/s per backend, shape and thread count (with % of this machine's
//! FMA peak), plus SVD timings, for docs/perf.md.
//!
//! ```text
//! python3 benches/baselines/torch_gemm.py > target/torch_gemm.json      # optional PyTorch column
//! cargo run --release -p peft-core --example gemm_table -- --torch target/torch_gemm.json
//! ```
//! Options: `--secs S` minimum timed seconds per cell (default 1), `--torch FILE` JSON lines from
//! `torch_gemm.py`. Each cell is the best of at least 3 timed runs (interference from other processes only ever
//! slows a run down). matrixmultiply fixes its thread count per process (`MATMUL_NUM_THREADS`), so its cells are
//! measured in child processes of this binary (`--mm-child`).
//!
//! The peak is `cores x MHz x flop/cycle` from /proc/cpuinfo, with 32 f32 flop/cycle/core for AVX2+FMA (two
//! 256-bit FMA pipes; also AMD Zen 4, whose AVX-512 is double-pumped) and 64 for Intel AVX-512 parts; override
//! with `PEFT_FLOPS_PER_CYCLE`. Under a hypervisor "cpu MHz" is the nominal clock, so boost clocks can show as
//! more than 100 %.

#[path = "../benches/support/gemm_backends.rs"]
mod support;

use std::collections::HashMap;
use std::time::Instant;
use support::{Backend, Problem, Shape};

const THREADS: [usize; 2] = [1, 2];

struct Cpu {
    model: String,
    mhz: f64,
    cores: usize,
    flops_per_cycle: f64,
    isa: String,
}

fn cpu() -> Cpu {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags: Vec<String> = field("flags").split_whitespace().map(String::from).collect();
    let has = |f: &str| flags.iter().any(|x| x == f);
    let intel = field("vendor_id") == "GenuineIntel";
    let (fpc, isa) = if has("avx512f") && intel {
        (64.0, "AVX-512 (2 FMA units)")
    } else if has("avx2") && has("fma") {
        (32.0, if has("avx512f") { "AVX2+FMA / AVX-512 (256-bit FMA pipes)" } else { "AVX2+FMA" })
    } else if has("avx") {
        (16.0, "AVX")
    } else {
        (8.0, "SSE")
    };
    let fpc = std::env::var("PEFT_FLOPS_PER_CYCLE").ok().and_then(|s| s.parse().ok()).unwrap_or(fpc);
    Cpu {
        model: format!("{} (family {}, model {})", field("model name"), field("cpu family"), field("model")),
        mhz: field("cpu MHz").parse().unwrap_or(0.0),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        flops_per_cycle: fpc,
        isa: isa.to_string(),
    }
}

impl Cpu {
    /// Peak GFLOP/s on `threads` cores.
    fn peak(&self, threads: usize) -> f64 {
        self.mhz * 1e-3 * self.flops_per_cycle * threads as f64
    }
}

/// `iters` x 12 independent 8-lane FMA chains (192 flop per iteration): enough chains to cover the FMA
/// latency on two pipes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc.iter().fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v)));
    out.iter().sum()
}

/// Measured AVX2-FMA throughput in GFLOP/s on `threads` busy threads (best of 5 runs of ~0.2 s), or None
/// without AVX2+FMA.
fn measured_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let iters = 50_000_000u64;
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        // SAFETY: AVX2 and FMA were detected above.
                        s.spawn(|| std::hint::black_box(unsafe { fma_chains(iters) }));
                    }
                });
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        return Some((iters * 192 * threads as u64) as f64 / best * 1e-9);
    }
    None
}

/// Best and median seconds of `f` over at least 3 runs and `secs` seconds, after one warm-up run.
fn time(secs: f64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < 3 || (start.elapsed().as_secs_f64() < secs && runs.len() < 500) {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    (runs[0], runs[runs.len() / 2])
}

/// Panics when `out` differs from the first backend's result (`reference`, set on first call).
fn check(reference: &mut Option<Vec<f32>>, out: &[f32], backend: Backend, shape: &Shape) {
    let r = reference.get_or_insert_with(|| out.to_vec());
    let scale = r.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = r.iter().zip(out).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * scale, "{} disagrees on {}: max diff {diff} (scale {scale})", backend.name(), shape.name);
}

fn gflops(shape: &Shape, secs: f64) -> f64 {
    shape.flops() as f64 / secs * 1e-9
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Child mode: matrixmultiply at `MATMUL_NUM_THREADS` threads, one `name\tbest_gflops` line per shape.
fn mm_child(secs: f64) {
    for shape in support::shapes() {
        let mut p = Problem::new(&shape);
        p.run(Backend::Gemm, 1);
        let mut reference = Some(p.dst.clone());
        let (best, _) = time(secs, || p.run(Backend::MatrixMultiply, support::matrixmultiply_threads()));
        check(&mut reference, &p.dst, Backend::MatrixMultiply, &shape);
        println!("{}\t{}", shape.name, gflops(&shape, best));
    }
}

fn mm_results(secs: f64, threads: usize) -> HashMap<String, f64> {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args(["--mm-child", "--secs", &secs.to_string()])
        .env("MATMUL_NUM_THREADS", threads.to_string())
        .output()
        .expect("spawn matrixmultiply child");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// `(shape or matrix name, threads) -> value`.
type Results = HashMap<(String, usize), f64>;

/// `(name, threads) -> GFLOP/s` and `(svd name, threads) -> seconds` from torch_gemm.py's JSON lines.
fn torch_results(path: &str) -> (Results, Results, String) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let (mut gemm, mut svd, mut meta) = (HashMap::new(), HashMap::new(), String::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}: {e}: {line}"));
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let threads = v["threads"].as_u64().unwrap_or(0) as usize;
        match v["kind"].as_str() {
            Some("gemm") => drop(gemm.insert((name, threads), v["gflops"].as_f64().unwrap_or(f64::NAN))),
            Some("svd") => drop(svd.insert((name, threads), v["seconds"].as_f64().unwrap_or(f64::NAN))),
            Some("meta") => meta = v["torch"].as_str().unwrap_or_default().to_string(),
            _ => {}
        }
    }
    (gemm, svd, meta)
}

fn cell(g: Option<f64>, peak: f64) -> String {
    match g {
        Some(g) if g.is_finite() => format!("{g:.1} ({:.0}%)", 100.0 * g / peak),
        _ => "–".into(),
    }
}

/// Threshold sweep: small square products, each backend forced sequential (1-thread pool) vs on 2 threads.
fn sweep(secs: f64) {
    let backends = [Backend::Gemm, Backend::Faer, Backend::Peft];
    print!("| n | m·n·k |");
    for b in backends {
        print!(" {} t1 | {} t2 |", b.name(), b.name());
    }
    println!("\n|---:|---:|{}", "---:|".repeat(2 * backends.len()));
    for shape in support::sweep_shapes() {
        let mut p = Problem::new(&shape);
        print!("| {} | {} |", shape.m, shape.m * shape.n * shape.k);
        for b in backends {
            for t in THREADS {
                let (best, _) = support::pool(t).install(|| time(secs, || p.run(b, t)));
                print!(" {:.1} |", gflops(&shape, best));
            }
        }
        println!();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let secs: f64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(1.0);
    if args.iter().any(|a| a == "--mm-child") {
        mm_child(secs);
        return;
    }
    if args.iter().any(|a| a == "--sweep") {
        sweep(secs);
        return;
    }
    let torch = arg("--torch").map(|p| torch_results(&p));
    let cpu = cpu();
    let load_before = load();

    println!("Machine: {}, {} cores, {:.0} MHz, {}.", cpu.model, cpu.cores, cpu.mhz, cpu.isa);
    println!(
        "Nominal FMA peak: {:.0} flop/cycle/core x {:.3} GHz = {:.1} GFLOP/s per core, {:.1} on 2 cores.",
        cpu.flops_per_cycle,
        cpu.mhz * 1e-3,
        cpu.peak(1),
        cpu.peak(2)
    );
    let measured: HashMap<usize, f64> = THREADS.iter().filter_map(|&t| Some((t, measured_peak(t)?))).collect();
    let peak = |t: usize| measured.get(&t).copied().unwrap_or_else(|| cpu.peak(t));
    if let (Some(m1), Some(m2)) = (measured.get(&1), measured.get(&2)) {
        println!(
            "Measured AVX2-FMA throughput: {m1:.1} GFLOP/s on 1 thread ({:.2} GHz effective), {m2:.1} on 2 \
             ({:.2} GHz); percentages below are of this measured peak.",
            m1 / cpu.flops_per_cycle,
            m2 / (2.0 * cpu.flops_per_cycle)
        );
    }
    println!();

    let mm: HashMap<usize, HashMap<String, f64>> = THREADS.iter().map(|&t| (t, mm_results(secs, t))).collect();
    let mut header =
        "| shape | m·k·n | threads | peft_core::backend::gemm | gemm 0.19 | faer 0.24 | matrixmultiply |".to_string();
    let mut rule = "|---|---|---:|---:|---:|---:|---:|".to_string();
    if torch.is_some() {
        header.push_str(" torch.matmul |");
        rule.push_str("---:|");
    }
    println!("GFLOP/s, best of ≥3 runs (% of the FMA peak at that thread count):\n\n{header}\n{rule}");
    for shape in support::shapes() {
        let mut p = Problem::new(&shape);
        for threads in THREADS {
            let pool = support::pool(threads);
            let peak = peak(threads);
            let mut row = format!("| {} | {}·{}·{} | {threads} |", shape.name, shape.m, shape.k, shape.n);
            let mut reference: Option<Vec<f32>> = None;
            for backend in [Backend::Peft, Backend::Gemm, Backend::Faer] {
                let (best, _) = pool.install(|| time(secs, || p.run(backend, threads)));
                check(&mut reference, &p.dst, backend, &shape);
                row.push_str(&format!(" {} |", cell(Some(gflops(&shape, best)), peak)));
            }
            row.push_str(&format!(" {} |", cell(mm[&threads].get(&shape.name).copied(), peak)));
            if let Some((tg, _, _)) = &torch {
                row.push_str(&format!(" {} |", cell(tg.get(&(shape.name.clone(), threads)).copied(), peak)));
            }
            println!("{row}");
        }
    }

    let mut header = "| matrix | threads | peft_core::linalg::svd (faer, thin) |".to_string();
    let mut rule = "|---|---:|---:|".to_string();
    if torch.is_some() {
        header.push_str(" torch.linalg.svd (full_matrices=False) |");
        rule.push_str("---:|");
    }
    println!("\nThin SVD of a random f32 matrix, seconds (best of ≥3 runs):\n\n{header}\n{rule}");
    for (m, n) in [(768, 768), (384, 1536)] {
        let a = ndarray::Array2::from_shape_vec((m, n), support::fill(m * n, 7)).expect("shape");
        for threads in THREADS {
            let pool = support::pool(threads);
            let (best, _) = pool.install(|| time(secs, || drop(peft_core::linalg::svd(&a).expect("svd"))));
            let mut row = format!("| {m}x{n} | {threads} | {best:.3} |");
            if let Some((_, ts, _)) = &torch {
                match ts.get(&(format!("{m}x{n}"), threads)) {
                    Some(s) => row.push_str(&format!(" {s:.3} |")),
                    None => row.push_str(" – |"),
                }
            }
            println!("{row}");
        }
    }
    if let Some((_, _, meta)) = &torch {
        println!("\nPyTorch: {meta} (measured by benches/baselines/torch_gemm.py).");
    }
    println!("\nLoad average (1/5/15 min) before: {load_before}; after: {}.", load());
}
