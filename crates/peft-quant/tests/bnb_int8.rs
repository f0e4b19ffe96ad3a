//! Row-wise int8 against bitsandbytes 0.50.2's CPU backend (`int8_vectorwise_quant` with threshold 0, i.e.
//! LLM.int8() without the outlier decomposition, and `int8_vectorwise_dequant`), byte for byte, on fixtures bnb
//! generated (`tests/fixtures/int8/gen_bnb_int8.py`): f32 and f16 inputs, shapes 1x1 to 2x2049, outliers, exact
//! half-way ties, ±0.0 and tiny values.

use peft_quant::{Checkpoint, Int8Rows};

#[test]
fn int8_rows_are_byte_identical_to_bitsandbytes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/int8/bnb_int8.safetensors");
    let ck = Checkpoint::read(path).unwrap();
    let mut cases = 0;
    for tag in ["", "h."] {
        for (r, c) in [(1usize, 1usize), (3, 7), (17, 33), (31, 129), (2, 2049)] {
            let s = format!("{tag}{r}x{c}");
            let x = ck.require(&format!("{s}.x")).unwrap().to_f32("x").unwrap();
            let q: Vec<i8> = ck.require(&format!("{s}.q")).unwrap().data().iter().map(|&b| b as i8).collect();
            let scb = ck.require(&format!("{s}.scb")).unwrap().to_f32("scb").unwrap();
            let deq = ck.require(&format!("{s}.deq")).unwrap().to_f32("deq").unwrap();
            let ours = Int8Rows::quantize(&x, r, c).unwrap();
            assert_eq!(ours.codes(), q.as_slice(), "{s}: codes");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(ours.scb()), bits(&scb), "{s}: SCB");
            assert_eq!(bits(&ours.dequantize()), bits(&deq), "{s}: dequantized");
            cases += 1;
        }
    }
    assert_eq!(cases, 10);
    let meta = ck.metadata().unwrap();
    assert_eq!(meta.get("bitsandbytes").and_then(|v| v.as_str()), Some("0.50.2"));
}
