//! Quantizing while loading never holds the dense model: a counting global allocator records the peak of live
//! heap bytes while a LLaMA is built through [`QuantizeOnLoad`] from a source that makes each tensor on request
//! (and holds nothing), and compares it with the dense load of the same model.
//!
//! One test in this binary, so no other test's allocations disturb the counter.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn};
use peft_core::nn::WeightSource;
use peft_models::llama::{Llama, LlamaSpec};
use peft_quant::load::QuantizeOnLoad;
use peft_quant::qlora::quantized_sites;
use peft_quant::QuantFormat;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::SeqCst) + by;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only the byte counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::SeqCst);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Makes every tensor on request from a hash of its name (holds none), and records the largest linear weight
/// handed out.
#[derive(Default)]
struct OnDemand {
    largest_linear: Mutex<usize>,
}

impl WeightSource for OnDemand {
    fn get(&self, name: &str, shape: &[usize]) -> peft_core::Result<ArrayD<f32>> {
        let mut h = DefaultHasher::new();
        name.hash(&mut h);
        let seed = h.finish();
        let n: usize = shape.iter().product();
        if shape.len() == 2 && !name.contains("embed") {
            let mut l = self.largest_linear.lock().unwrap();
            *l = (*l).max(4 * n);
        }
        let v = (0..n as u64)
            .map(|i| {
                let x = (seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        Ok(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }
    fn get_or(&self, name: &str, shape: &[usize], fill: f32) -> peft_core::Result<ArrayD<f32>> {
        if name.ends_with("norm.weight") {
            return Ok(ArrayD::from_elem(IxDyn(shape), fill));
        }
        self.get(name, shape)
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
}

/// Peak and retained heap bytes above the level before `f` ran.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    let (peak, live) = (PEAK.load(Ordering::SeqCst), LIVE.load(Ordering::SeqCst));
    (out, peak - base, live.saturating_sub(base))
}

#[test]
fn quantizing_while_loading_holds_at_most_one_dense_linear() {
    // 4 layers of q, k, v, o (256 x 256) and gate, up, down (1024 x 256): 16 MiB of dense linear weights, the
    // largest linear 1 MiB.
    let spec = LlamaSpec {
        vocab: 64,
        hidden: 256,
        intermediate: 1024,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        head_dim: 64,
        eps: 1e-5,
        rope_theta: 10_000.0,
        max_positions: 32,
        tie_embeddings: true,
        bos: None,
        eos: vec![],
    };
    let dense_linears = 4 * (4 * 256 * 256 + 3 * 1024 * 256) * 4;
    // Warm up the thread pool and any lazily built tables outside the measured region.
    let warm = OnDemand::default();
    drop(Llama::load(&spec, &QuantizeOnLoad::new(&warm, QuantFormat::default())).unwrap());
    drop(Llama::load(&spec, &warm).unwrap());

    let src = OnDemand::default();
    let (dense, dense_peak, dense_live) = measure(|| Llama::load(&spec, &src).unwrap());
    assert!(dense_live >= dense_linears, "the dense model holds {dense_live} bytes");
    assert!(dense_peak >= dense_linears);
    drop(dense);

    let src = OnDemand::default();
    let on_load = QuantizeOnLoad::new(&src, QuantFormat::default());
    let (m, peak, live) = measure(|| Llama::load(&spec, &on_load).unwrap());
    assert_eq!(quantized_sites(&m).len(), 4 * 7);
    let largest = *src.largest_linear.lock().unwrap();
    assert_eq!(largest, 1024 * 256 * 4);
    // What the model keeps: NF4-DQ codes (about an eighth of the dense bytes) plus embeddings and norms.
    assert!(live < dense_linears / 6, "quantized model holds {live} bytes");
    // Above that, the transient peak is one dense linear (plus the quantizer's small buffers): never two.
    let transient = peak - live;
    eprintln!(
        "dense load: peak {dense_peak} B, kept {dense_live} B; layer-by-layer: peak {peak} B, kept {live} B, \
         transient {transient} B, largest dense linear {largest} B"
    );
    // At the peak the last (largest) linear is alive dense while its own quantized form, part of `live`, is not
    // yet: the transient is one dense linear less its NF4-DQ size (about 13%).
    assert!(transient >= largest * 3 / 4, "the largest dense linear ({largest} B) was read whole");
    assert!(transient < largest + largest / 2, "transient {transient} B holds more than one dense linear");
    assert!(peak < dense_peak / 4);
}
