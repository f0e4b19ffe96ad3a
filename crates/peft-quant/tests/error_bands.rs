//! Reconstruction error on `randn(1024, 1024)` against bitsandbytes' published references
//! (`tests/test_functional.py::test_4bit_quant`: means over 1k samples per configuration; bnb asserts
//! `err < ref + 1e-3`). We assert the two-sided band `|measured − ref| < 1e-3` for the mean absolute error
//! `mean|A − Â|` and the mean relative error `mean(|A − Â| / (|A| + 1e-8))`, both accumulated in f64.

use peft_quant::{Checkpoint, Quant4, Quant4Config, QuantType};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// (type, blocksize, mean abs err, mean rel err) from bnb's `error_dict`; NF4 bs32 from the spec's table.
const REFS: [(QuantType, usize, f64, f64); 5] = [
    (QuantType::Nf4, 32, 0.067746, 0.189726),
    (QuantType::Nf4, 64, 0.072792, 0.203299),
    (QuantType::Nf4, 4096, 0.092537, 0.262457),
    (QuantType::Fp4, 64, 0.096545, 0.260130),
    (QuantType::Fp4, 4096, 0.129573, 0.337228),
];

const BAND: f64 = 1e-3;

fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut abs, mut rel) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let e = f64::from((x - y).abs());
        abs += e;
        rel += e / (f64::from(x.abs()) + 1e-8);
    }
    (abs / a.len() as f64, rel / a.len() as f64)
}

#[test]
fn mean_errors_on_standard_normal_1024x1024_are_inside_bnb_bands() {
    let a = randn(42, 1024 * 1024);
    for (qt, bs, ref_abs, ref_rel) in REFS {
        let cfg = Quant4Config { quant_type: qt, blocksize: bs, double_quant: false };
        let q = Quant4::quantize(&a, &[1024, 1024], &cfg).unwrap();
        // bnb's test goes through as_dict/from_dict; so do we (serialize -> parse -> dequantize).
        let mut c = Checkpoint::new();
        c.insert_quant4("w", &q).unwrap();
        let back = Checkpoint::from_bytes(&c.to_bytes()).unwrap().quant4("w").unwrap();
        let (abs, rel) = errors(&a, &back.dequantize());
        eprintln!("{} bs{bs}: mean abs err {abs:.6} (ref {ref_abs}), mean rel err {rel:.6} (ref {ref_rel})", qt.name());
        assert!((abs - ref_abs).abs() < BAND, "{} bs{bs}: abs err {abs} outside {ref_abs} ± {BAND}", qt.name());
        assert!((rel - ref_rel).abs() < BAND, "{} bs{bs}: rel err {rel} outside {ref_rel} ± {BAND}", qt.name());
    }
}

#[test]
fn double_quantisation_barely_changes_the_error_and_stores_4_127_bits_per_parameter() {
    let a = randn(7, 1024 * 1024);
    let plain = Quant4::quantize(&a, &[1024, 1024], &Quant4Config { double_quant: false, ..Quant4Config::default() });
    let dq = Quant4::quantize(&a, &[1024, 1024], &Quant4Config::default()).unwrap();
    let (abs_p, _) = errors(&a, &plain.unwrap().dequantize());
    let (abs_d, rel_d) = errors(&a, &dq.dequantize());
    eprintln!("nf4 bs64 +DQ: mean abs err {abs_d:.6}, mean rel err {rel_d:.6} (plain {abs_p:.6})");
    assert!((abs_d - 0.072792).abs() < BAND && (rel_d - 0.203299).abs() < BAND);
    assert!((abs_d - abs_p).abs() < 2e-4);

    // Bits per parameter measured from the bytes of the serialized tensors.
    let mut c = Checkpoint::new();
    c.insert_quant4("w", &dq).unwrap();
    let c = Checkpoint::from_bytes(&c.to_bytes()).unwrap();
    let bytes = |k: &str| c.require(k).unwrap().data().len();
    let data = bytes("w.weight") + bytes("w.weight.absmax") + bytes("w.weight.nested_absmax");
    let bits = 8.0 * data as f64 / a.len() as f64;
    eprintln!(
        "serialized: weight {} + absmax {} + nested_absmax {} bytes = {bits} bits/param (per-tensor constants: \
         quant_map {} B, nested_quant_map {} B, quant_state JSON {} B)",
        bytes("w.weight"),
        bytes("w.weight.absmax"),
        bytes("w.weight.nested_absmax"),
        bytes("w.weight.quant_map"),
        bytes("w.weight.nested_quant_map"),
        bytes("w.weight.quant_state.bitsandbytes__nf4"),
    );
    assert_eq!(bits, 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0));
    assert_eq!(format!("{bits:.3}"), "4.127");
}
