//! Byte identity with bitsandbytes 0.50.2's CPU backend on shapes whose element count is a multiple of neither
//! the blocksize nor 256 (the nested block): NF4 and FP4, blocksizes 32..4096, double quantisation off and on.
//!
//! The oracle is `tests/fixtures/identity/*.safetensors`, written by `tests/fixtures/identity/gen_bnb_identity.py`
//! (its docstring lists the pip versions). Every case must match exactly: packed 4-bit codes byte for byte, plain
//! absmax bit for bit, the double-quant offset, nested 8-bit codes and nested absmax, the resolved scales, and the
//! dequantized tensor bit for bit (full tensors for the small shapes, an FNV-1a 64 digest of the f32 bytes for all).
//! Run with `--nocapture` to see the per-case table.

use std::collections::HashMap;
use std::path::PathBuf;

use peft_quant::{Absmax, Quant4, Quant4Config, QuantType};
use safetensors::SafeTensors;

const SHAPES: [(usize, usize); 6] = [(3, 7), (5, 13), (33, 65), (1000, 17), (21, 34), (37, 48)];
const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
const TYPES: [QuantType; 2] = [QuantType::Nf4, QuantType::Fp4];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/identity")
}

/// One fixture file: its bytes, parsed on demand.
struct File {
    bytes: Vec<u8>,
}

impl File {
    fn open(name: &str) -> Self {
        let path = dir().join(name);
        File { bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture is valid safetensors")
    }

    fn raw(&self, name: &str) -> Vec<u8> {
        self.st().tensor(name).unwrap_or_else(|e| panic!("{name}: {e}")).data().to_vec()
    }

    fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.raw(name).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).expect("fixture header");
        meta.metadata().clone().unwrap_or_default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// FNV-1a 64 of the little-endian f32 bytes (the generator's digest).
fn fnv1a64(v: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.iter().flat_map(|x| x.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn count_diff<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

fn quantize(x: &[f32], shape: (usize, usize), qt: QuantType, bs: usize, dq: bool) -> Quant4 {
    let cfg = Quant4Config { quant_type: qt, blocksize: bs, double_quant: dq };
    Quant4::quantize(x, &[shape.0, shape.1], &cfg).unwrap()
}

/// Compares one (type, blocksize, shape, double quant) case; returns the names of whatever differs.
fn compare_case(
    file: &File,
    meta: &HashMap<String, String>,
    x: &[f32],
    case: (QuantType, usize, (usize, usize), bool),
) -> Vec<String> {
    let (qt, bs, shape, dq) = case;
    let s = format!("{}x{}", shape.0, shape.1);
    let tag = if dq { ".dq" } else { "" };
    let q = quantize(x, shape, qt, bs, dq);
    let mut bad = Vec::new();
    let n = count_diff(q.packed(), &file.raw(&format!("{s}.packed")));
    if n > 0 {
        bad.push(format!("packed ({n} bytes)"));
    }
    match q.absmax() {
        Absmax::Plain(a) => {
            let n = count_diff(&bits(a), &bits(&file.f32s(&format!("{s}.absmax"))));
            if n > 0 {
                bad.push(format!("absmax ({n})"));
            }
        }
        Absmax::Double { q: nested, offset } => {
            let bnb_offset = file.f32s(&format!("{s}.dq.offset"))[0];
            if offset.to_bits() != bnb_offset.to_bits() {
                bad.push(format!("offset ({offset:e} vs {bnb_offset:e})"));
            }
            let n = count_diff(nested.codes(), &file.raw(&format!("{s}.dq.codes")));
            if n > 0 {
                bad.push(format!("nested codes ({n} of {})", nested.codes().len()));
            }
            let n = count_diff(&bits(nested.absmax()), &bits(&file.f32s(&format!("{s}.dq.absmax2"))));
            if n > 0 {
                bad.push(format!("nested absmax ({n})"));
            }
            let n = count_diff(&bits(&q.scales()), &bits(&file.f32s(&format!("{s}.dq.scales"))));
            if n > 0 {
                bad.push(format!("scales ({n})"));
            }
        }
    }
    let deq = q.dequantize();
    if fnv1a64(&deq) != meta[&format!("{s}{tag}.deq.fnv1a64")] {
        bad.push("dequantized (digest)".into());
    }
    let full = format!("{s}{tag}.deq");
    if file.has(&full) {
        let n = count_diff(&bits(&deq), &bits(&file.f32s(&full)));
        if n > 0 {
            bad.push(format!("dequantized ({n} values)"));
        }
    }
    bad
}

/// Every case of the matrix: 2 types x 8 blocksizes x 6 shapes x double quant off/on = 192 cases.
#[test]
fn quantize_and_dequantize_are_byte_identical_to_bnb_cpu_on_every_case() {
    let inputs = File::open("inputs.safetensors");
    let mut failures = Vec::new();
    let mut cases = 0;
    eprintln!("{:<4} {:>5} {:>8} {:>3}  result", "type", "bs", "shape", "dq");
    for qt in TYPES {
        for bs in BLOCKSIZES {
            let file = File::open(&format!("bnb_{}_bs{bs}.safetensors", qt.name()));
            let meta = file.metadata();
            assert_eq!(meta["bitsandbytes"], "0.50.2");
            for shape in SHAPES {
                let x = inputs.f32s(&format!("x_{}x{}", shape.0, shape.1));
                for dq in [false, true] {
                    cases += 1;
                    let bad = compare_case(&file, &meta, &x, (qt, bs, shape, dq));
                    let result = if bad.is_empty() { "identical".to_string() } else { bad.join(", ") };
                    eprintln!(
                        "{:<4} {bs:>5} {:>8} {:>3}  {result}",
                        qt.name(),
                        format!("{}x{}", shape.0, shape.1),
                        if dq { "on" } else { "off" }
                    );
                    if !bad.is_empty() {
                        failures.push(format!("{} bs{bs} {}x{} dq={dq}: {result}", qt.name(), shape.0, shape.1));
                    }
                }
            }
        }
    }
    assert_eq!(cases, 192);
    assert!(
        failures.is_empty(),
        "{} of {cases} cases differ from bitsandbytes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The code tables and the bucket boundaries of bnb's CPU quantizer (`_get_4bit_quantize_bounds`: f32 midpoints
/// of the sorted table, searched with `torch.bucketize`), and the FP4 sort order that maps buckets back to codes.
#[test]
fn code_tables_and_bucket_bounds_match_bnb() {
    let t = File::open("tables.safetensors");
    assert_eq!(bits(&t.f32s("nf4")), bits(&peft_quant::codes::NF4));
    assert_eq!(bits(&t.f32s("fp4")), bits(&peft_quant::codes::FP4));
    assert_eq!(bits(&t.f32s("dynamic")), bits(&peft_quant::codes::dynamic_map()));
    assert_eq!(bits(&t.f32s("nf4_bounds")), bits(&peft_quant::codes::NF4_THRESHOLDS));
    let order: Vec<i32> =
        t.raw("fp4_order").chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let bounds = t.f32s("fp4_bounds");
    // The nearest-code rule these imply: code = order[#{bounds < x}] (ties to the lower bucket). Check it against
    // the crate's FP4 code for every bound, its neighbours and values in between.
    let mut probes = vec![0.0f32, -0.0, 1.0, -1.0, 1e-30, -1e-30];
    for &b in &bounds {
        probes.extend([b, b.next_up(), b.next_down()]);
    }
    for &x in &probes {
        let bucket = bounds.iter().filter(|&&b| b < x).count();
        let expected = u8::try_from(order[bucket]).unwrap();
        assert_eq!(QuantType::Fp4.code(x), expected, "fp4 code of {x:e}");
        let nf4_bucket = peft_quant::codes::NF4_THRESHOLDS.iter().filter(|&&b| b < x).count();
        assert_eq!(usize::from(QuantType::Nf4.code(x)), nf4_bucket, "nf4 code of {x:e}");
    }
}

/// What `bitsandbytes.functional.dequantize_4bit` returned on the generating machine (an AVX-512 CPU) versus bnb's
/// pure-torch reference that [`Quant4::dequantize`] matches. They differ in 36 of the 192 cases, for two reasons
/// in bnb's native CPU kernel (`dequantizeBlockwise4bitCpu`, csrc/cpu_ops.cpp), both reproduced here exactly:
///
/// * Its AVX-512 branch (taken when the last dimension and the blocksize are multiples of 16) indexes the scales
///   per row, `absmax[row * (cols / blocksize) + col / blocksize]`, which is only right when the blocksize divides
///   the row length; bnb's blocks run across rows, so for 37x48 at blocksize < 2048 it applies wrong scales (a bnb
///   bug: its NEON branch guards `n % blocksize == 0`, the AVX-512 one does not).
/// * Its scalar branch (even last dimension not a multiple of 16) uses its own FP4 table with `-0.0f` for code
///   0b1000, where `get_4bit_type("fp4")` (the table the checkpoint stores and the reference uses) has `+0.0`.
///
/// Odd last dimensions and blocksizes >= 2048 (on AVX-512) take the reference path, which is matched bit for bit.
#[test]
fn bnb_native_cpu_dequantize_differs_only_as_its_kernel_explains() {
    let inputs = File::open("inputs.safetensors");
    let mut differing = 0;
    for qt in TYPES {
        for bs in BLOCKSIZES {
            let file = File::open(&format!("bnb_{}_bs{bs}.safetensors", qt.name()));
            let meta = file.metadata();
            assert_eq!(meta["cpu_capability"], "AVX512", "the model below is for the AVX-512 dispatch");
            for (r, c) in SHAPES {
                let x = inputs.f32s(&format!("x_{r}x{c}"));
                for dq in [false, true] {
                    let q = quantize(&x, (r, c), qt, bs, dq);
                    let scales = q.scales();
                    let n = r * c;
                    let model: Vec<f32> = if c % 2 == 1 || bs >= 2048 {
                        q.dequantize()
                    } else if c % 16 == 0 {
                        (0..n)
                            .map(|i| qt.table()[usize::from(q.code(i))] * scales[(i / c) * (c / bs) + (i % c) / bs])
                            .collect()
                    } else {
                        let mut table = *qt.table();
                        if qt == QuantType::Fp4 {
                            table[8] = -0.0;
                        }
                        (0..n).map(|i| table[usize::from(q.code(i))] * scales[i / bs]).collect()
                    };
                    let tag = if dq { ".dq" } else { "" };
                    let native = &meta[&format!("{r}x{c}{tag}.deq_native.fnv1a64")];
                    assert_eq!(&fnv1a64(&model), native, "{} bs{bs} {r}x{c} dq={dq}", qt.name());
                    differing += usize::from(native != &meta[&format!("{r}x{c}{tag}.deq.fnv1a64")]);
                }
            }
        }
    }
    assert_eq!(differing, 36, "native kernel vs reference: cases that differ");
}

/// The double-quant offset is `absmax.mean()` in torch: its CPU cascade sum in f32, then `/ n`. Checked against
/// torch 2.15 (one thread: the serial order; below 32768 values torch reduces serially at any thread count) for
/// lengths 1..79 and around every power-of-two boundary of the cascade up to 300000 values.
#[test]
fn offset_mean_is_torch_cpu_cascade_sum_bit_for_bit() {
    use peft_quant::block4::{torch_mean, torch_sum};
    let t = File::open("torch_sums.safetensors");
    let lengths: Vec<usize> = t
        .raw("lengths")
        .chunks_exact(4)
        .map(|b| usize::try_from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap())
        .collect();
    let (sums, means) = (t.f32s("sums"), t.f32s("means"));
    let max = lengths.iter().copied().max().unwrap();
    // The generator's x_i = f32((i * 7919) % 10007 + 1) / f32(1013): exact integer conversions, one IEEE division.
    let x: Vec<f32> = (0..max).map(|i| ((i * 7919) % 10007 + 1) as f32 / 1013.0).collect();
    for (k, &n) in lengths.iter().enumerate() {
        assert_eq!(torch_sum(&x[..n]).to_bits(), sums[k].to_bits(), "sum of {n}");
        assert_eq!(torch_mean(&x[..n]).to_bits(), means[k].to_bits(), "mean of {n}");
    }
    // The f64 mean the crate used before differs from torch's for some of these lengths.
    let f64_mean = |n: usize| (x[..n].iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64) as f32;
    let differing = lengths.iter().zip(&means).filter(|(&n, m)| f64_mean(n).to_bits() != m.to_bits()).count();
    eprintln!("{differing} of {} lengths: the f64-accumulated mean differs from torch's", lengths.len());
}
