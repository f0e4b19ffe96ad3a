//! GEMM backends and shape tables shared by `benches/gemm.rs` and `examples/gemm_table.rs`.
//!
//! Every backend computes `dst (row-major m x n) = lhs (m x k) · rhs (k x n)` on the same operands, with the
//! operand layouts the engine really uses (`linear` multiplies by a transposed weight view, the LoRA-A gradient
//! by a transposed activation-gradient view).

#![allow(dead_code)]

use peft_core::backend::{self, MatRef};

/// One GEMM problem: `m x k · k x n`, with optionally transposed (column-major) operand views.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Short scenario name used in bench ids and table rows.
    pub name: String,
    /// Rows of lhs and dst.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of rhs and dst.
    pub n: usize,
    /// lhs is stored as a row-major `k x m` matrix and viewed transposed.
    pub lhs_t: bool,
    /// rhs is stored as a row-major `n x k` matrix and viewed transposed.
    pub rhs_t: bool,
}

impl Shape {
    fn new(name: String, m: usize, k: usize, n: usize, lhs_t: bool, rhs_t: bool) -> Self {
        Shape { name, m, k, n, lhs_t, rhs_t }
    }

    /// Floating-point operations of one product (2·m·n·k).
    pub fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k) as u64
    }
}

/// The LoRA rank sweep.
pub const RANKS: [usize; 4] = [8, 16, 32, 64];

/// The shape table: square, skinny LoRA forward, LoRA-A gradient, and the B·A merge.
pub fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    for s in [512, 1024, 2048] {
        v.push(Shape::new(format!("square_{s}"), s, s, s, false, false));
    }
    // x (4096 tokens x 4096) · Aᵀ (4096 x r): the LoRA-A forward of `linear`, rhs is the [r, in] weight viewed
    // transposed.
    for r in RANKS {
        v.push(Shape::new(format!("x_At_r{r}"), 4096, 4096, r, false, true));
    }
    // dA = dhᵀ (r x 4096 tokens) · x (4096 tokens x 4096): the LoRA-A gradient, lhs is dh [tokens, r] viewed
    // transposed.
    for r in RANKS {
        v.push(Shape::new(format!("dht_x_r{r}"), r, 4096, 4096, true, false));
    }
    // ΔW = B (4096 x r) · A (r x 4096): merging an adapter.
    v.push(Shape::new("merge_B_A_r16".into(), 4096, 16, 4096, false, false));
    // BERT-base, 512 tokens: a 768 -> 768 projection, the FFN up-projection (both `linear`, weight viewed
    // transposed), the weight gradient dW = dyᵀ·x, and one head's attention scores q·kᵀ.
    v.push(Shape::new("bert_qkv".into(), 512, 768, 768, false, true));
    v.push(Shape::new("bert_ffn_up".into(), 512, 768, 3072, false, true));
    v.push(Shape::new("bert_dW".into(), 768, 512, 768, true, false));
    v.push(Shape::new("bert_attn_qk".into(), 128, 64, 128, false, true));
    v
}

/// Small square sizes for tuning the sequential/parallel threshold.
pub fn sweep_shapes() -> Vec<Shape> {
    [8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320]
        .into_iter()
        .map(|s| Shape::new(format!("square_{s}"), s, s, s, false, false))
        .collect()
}

/// A GEMM implementation under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `faer::linalg::matmul::matmul` with `Par::Seq` (1 thread) or `Par::rayon(t)`.
    Faer,
    /// `gemm::gemm` (0.19) with `Parallelism::None` or `Parallelism::Rayon(t)`.
    Gemm,
    /// `matrixmultiply::sgemm`; threads come from `MATMUL_NUM_THREADS`, fixed per process.
    MatrixMultiply,
    /// `peft_core::backend::gemm`, run inside a rayon pool of t threads.
    Peft,
}

impl Backend {
    /// All backends, in table order.
    pub const ALL: [Backend; 4] = [Backend::Peft, Backend::Gemm, Backend::Faer, Backend::MatrixMultiply];

    /// Column / bench-group name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Faer => "faer",
            Backend::Gemm => "gemm",
            Backend::MatrixMultiply => "matrixmultiply",
            Backend::Peft => "peft_core",
        }
    }
}

/// Threads matrixmultiply uses in this process (`MATMUL_NUM_THREADS`, read once by matrixmultiply at first use).
pub fn matrixmultiply_threads() -> usize {
    std::env::var("MATMUL_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1).clamp(1, 4)
}

/// Sets `MATMUL_NUM_THREADS=1` unless the caller set it; call before any matrixmultiply product.
pub fn default_matrixmultiply_threads() {
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Operands and output buffer for one shape.
pub struct Problem {
    /// The shape.
    pub shape: Shape,
    lhs: Vec<f32>,
    rhs: Vec<f32>,
    /// Row-major m x n output.
    pub dst: Vec<f32>,
}

impl Problem {
    /// Random operands for `shape`.
    pub fn new(shape: &Shape) -> Self {
        let (m, k, n) = (shape.m, shape.k, shape.n);
        Problem { shape: shape.clone(), lhs: fill(m * k, 1), rhs: fill(k * n, 2), dst: vec![0.0; m * n] }
    }

    fn lhs_view(&self) -> MatRef<'_, f32> {
        let s = &self.shape;
        if s.lhs_t {
            MatRef::row_major(&self.lhs, s.k, s.m).t()
        } else {
            MatRef::row_major(&self.lhs, s.m, s.k)
        }
    }

    fn rhs_view(&self) -> MatRef<'_, f32> {
        let s = &self.shape;
        if s.rhs_t {
            MatRef::row_major(&self.rhs, s.n, s.k).t()
        } else {
            MatRef::row_major(&self.rhs, s.k, s.n)
        }
    }

    /// One product with `backend` on `threads` threads. Call inside a rayon pool of `threads` threads.
    pub fn run(&mut self, backend: Backend, threads: usize) {
        let (m, k, n) = (self.shape.m, self.shape.k, self.shape.n);
        let mut dst = std::mem::take(&mut self.dst);
        let (a, b) = (self.lhs_view(), self.rhs_view());
        match backend {
            Backend::Peft => backend::gemm(&mut dst, a, b, false),
            Backend::Gemm => {
                let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
                // SAFETY: the views come from `MatRef::row_major` over slices of exactly the right size.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.data.as_ptr(),
                        a.cs,
                        a.rs,
                        b.data.as_ptr(),
                        b.cs,
                        b.rs,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                }
            }
            Backend::Faer => {
                let fa = if self.shape.lhs_t {
                    faer::MatRef::from_row_major_slice(a.data, k, m).transpose()
                } else {
                    faer::MatRef::from_row_major_slice(a.data, m, k)
                };
                let fb = if self.shape.rhs_t {
                    faer::MatRef::from_row_major_slice(b.data, n, k).transpose()
                } else {
                    faer::MatRef::from_row_major_slice(b.data, k, n)
                };
                let fd = faer::MatMut::from_row_major_slice_mut(&mut dst, m, n);
                let par = if threads > 1 { faer::Par::rayon(threads) } else { faer::Par::Seq };
                faer::linalg::matmul::matmul(fd, faer::Accum::Replace, fa, fb, 1.0f32, par);
            }
            Backend::MatrixMultiply => {
                // SAFETY: as for gemm.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.data.as_ptr(),
                        a.rs,
                        a.cs,
                        b.data.as_ptr(),
                        b.rs,
                        b.cs,
                        0.0,
                        dst.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            }
        }
        self.dst = dst;
    }
}

/// A rayon pool with exactly `threads` threads.
pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon pool")
}
