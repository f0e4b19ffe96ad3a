//! Tests of the GGUF reader on files built in memory by the test writer.

use std::fs;

use half::{bf16, f16};
use proptest::prelude::*;

use super::test_writer::GgufBuilder;
use super::*;

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, IoResult<GgufFile>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    fs::write(&p, bytes).unwrap();
    let r = GgufFile::open(&p);
    (dir, r)
}

fn open_ok(bytes: &[u8]) -> (tempfile::TempDir, GgufFile) {
    let (d, r) = open_bytes(bytes);
    (d, r.unwrap())
}

fn open_err(bytes: &[u8]) -> IoError {
    let (_d, r) = open_bytes(bytes);
    let e = r.unwrap_err();
    assert!(e.path().is_some_and(|p| p.ends_with("m.gguf")), "error must name the file: {e}");
    e
}

fn f32s(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn strings(xs: &[&str]) -> GgufValue {
    GgufValue::Array(GgufValueType::String, xs.iter().map(|s| GgufValue::String(s.to_string())).collect())
}

/// A small valid file with metadata of every type and two tensors.
fn sample() -> GgufBuilder {
    GgufBuilder::new()
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("u8", GgufValue::U8(200))
        .kv("i8", GgufValue::I8(-100))
        .kv("u16", GgufValue::U16(60000))
        .kv("i16", GgufValue::I16(-30000))
        .kv("llama.block_count", GgufValue::U32(30))
        .kv("i32", GgufValue::I32(-7))
        .kv("llama.rope.freq_base", GgufValue::F32(100000.0))
        .kv("flag", GgufValue::Bool(true))
        .kv("u64", GgufValue::U64(u64::MAX))
        .kv("i64", GgufValue::I64(i64::MIN))
        .kv("f64", GgufValue::F64(1e-300))
        .kv("tokenizer.ggml.tokens", strings(&["<s>", "a", "ß", ""]))
        .kv(
            "nested",
            GgufValue::Array(GgufValueType::Array, vec![GgufValue::Array(GgufValueType::U8, vec![GgufValue::U8(1)])]),
        )
        .kv("empty", GgufValue::Array(GgufValueType::F32, vec![]))
        .tensor("w", &[3, 2], GgmlType::F32, f32s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
        .tensor(
            "v",
            &[4],
            GgmlType::F16,
            [1.0f32, -2.0, 0.5, 65504.0].iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        )
}

#[test]
fn metadata_of_every_value_type_roundtrips() {
    let b = sample();
    let (_d, f) = open_ok(&b.build());
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("llama"));
    for (k, v) in [
        ("u8", GgufValue::U8(200)),
        ("i8", GgufValue::I8(-100)),
        ("u16", GgufValue::U16(60000)),
        ("i16", GgufValue::I16(-30000)),
        ("i32", GgufValue::I32(-7)),
        ("flag", GgufValue::Bool(true)),
        ("u64", GgufValue::U64(u64::MAX)),
        ("i64", GgufValue::I64(i64::MIN)),
        ("f64", GgufValue::F64(1e-300)),
        ("empty", GgufValue::Array(GgufValueType::F32, vec![])),
    ] {
        assert_eq!(f.meta(k), Some(&v), "{k}");
    }
    assert_eq!(f.meta_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.meta_f64("llama.rope.freq_base").unwrap(), 100000.0);
    let toks: Vec<_> = f.meta_array("tokenizer.ggml.tokens").unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(toks, ["<s>", "a", "ß", ""]);
    assert_eq!(f.meta("nested").unwrap().as_array().unwrap()[0].as_array().unwrap(), &[GgufValue::U8(1)]);
    assert_eq!(f.metadata().len(), 15);
}

#[test]
fn metadata_getters_report_missing_and_mistyped_keys() {
    let (_d, f) = open_ok(&sample().build());
    assert!(matches!(f.meta_u64("nope"), Err(IoError::MissingKey { ref key, .. }) if key == "nope"));
    let e = f.meta_u64("general.architecture").unwrap_err();
    assert!(matches!(e, IoError::MetadataType { ref found, .. } if found == "string"), "{e}");
    assert!(matches!(f.meta_u64("i32"), Err(IoError::MetadataType { .. })), "negative is not a u64");
    assert_eq!(f.meta("i32").unwrap().as_i64(), Some(-7));
    assert!(matches!(f.meta_str("u8"), Err(IoError::MetadataType { .. })));
    assert!(matches!(f.meta_array("u8"), Err(IoError::MetadataType { .. })));
    assert_eq!(f.meta_u64("u64").unwrap(), u64::MAX);
    assert_eq!(f.meta("u64").unwrap().as_i64(), None);
    assert_eq!(f.meta_f64("u16").unwrap(), 60000.0);
    let e = f.meta_f64("tokenizer.ggml.tokens").unwrap_err();
    assert!(e.to_string().contains("array of string"), "{e}");
}

#[test]
fn tensors_roundtrip_with_row_major_shape() {
    let (_d, f) = open_ok(&sample().build());
    assert_eq!(f.tensors().len(), 2);
    let w = f.tensor_info("w").unwrap();
    assert_eq!((w.dims.as_slice(), w.shape(), w.numel(), w.n_bytes), (&[3u64, 2][..], vec![2, 3], 6, Some(24)));
    let a = f.get("w").unwrap();
    assert_eq!(a, ndarray::arr2(&[[0.0f32, 1.0, 2.0], [3.0, 4.0, 5.0]]).into_dyn());
    assert_eq!(f.get("v").unwrap().into_raw_vec_and_offset().0, [1.0, -2.0, 0.5, 65504.0]);
    assert_eq!(f.tensor_bytes("v").unwrap().len(), 8);
    assert_eq!(f.data_offset() % 32, 0);
    assert!(matches!(f.get("nope"), Err(IoError::MissingTensor { ref name, .. }) if name == "nope"));
}

#[test]
fn bf16_and_f64_tensors_are_widened() {
    let xs = [1.5f32, -3.0e20, 7.0e-3];
    let b = GgufBuilder::new()
        .tensor("b", &[3], GgmlType::BF16, xs.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect())
        .tensor("d", &[2], GgmlType::F64, [0.25f64, -1e10].iter().flat_map(|x| x.to_le_bytes()).collect());
    let (_d, f) = open_ok(&b.build());
    let want: Vec<f32> = xs.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(f.get("b").unwrap().into_raw_vec_and_offset().0, want);
    assert_eq!(f.get("d").unwrap().into_raw_vec_and_offset().0, [0.25, -1e10]);
}

#[test]
fn custom_alignment_places_data_on_its_boundary() {
    let b = GgufBuilder::new().alignment(64).tensor("a", &[3], GgmlType::F32, f32s(&[1.0, 2.0, 3.0])).tensor(
        "b",
        &[1],
        GgmlType::F32,
        f32s(&[9.0]),
    );
    let (_d, f) = open_ok(&b.build());
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.get("b").unwrap()[[0]], 9.0);
}

#[test]
fn version_2_is_read_and_other_versions_are_rejected() {
    let (_d, f) = open_ok(&sample().version(2).build());
    assert_eq!(f.version(), 2);
    for v in [1, 4, 0x0300_0000] {
        let e = open_err(&sample().version(v).build());
        assert!(matches!(e, IoError::UnsupportedVersion { version, .. } if version == v), "{e}");
    }
}

#[test]
fn bad_magic_is_corrupt_header() {
    let mut b = sample().build();
    b[..4].copy_from_slice(b"GGML");
    assert!(matches!(open_err(&b), IoError::CorruptHeader { ref reason, .. } if reason.contains("magic")));
}

#[test]
fn every_truncated_prefix_is_a_typed_error() {
    let full = sample().build();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    for len in 0..full.len() {
        fs::write(&p, &full[..len]).unwrap();
        match GgufFile::open(&p) {
            Err(IoError::Truncated { .. }) | Err(IoError::HeaderSizeMismatch { .. }) => {}
            other => panic!("prefix of {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn misaligned_tensor_offset_is_corrupt_header() {
    let b = GgufBuilder::new().tensor_raw("a", &[1], 0, f32s(&[1.0]), Some(4));
    assert!(matches!(open_err(&b.build()), IoError::CorruptHeader { ref reason, .. } if reason.contains("alignment")));
}

#[test]
fn data_beyond_file_is_size_mismatch() {
    let mut b = GgufBuilder::new().tensor("a", &[8], GgmlType::F32, f32s(&[1.0; 8])).build();
    b.truncate(b.len() - 4);
    let e = open_err(&b);
    assert!(matches!(e, IoError::HeaderSizeMismatch { ref name, .. } if name == "a"), "{e}");
    let b = GgufBuilder::new().tensor_raw("a", &[1], 0, f32s(&[1.0]), Some(u64::MAX - 31)).build();
    assert!(matches!(open_err(&b), IoError::HeaderSizeMismatch { .. }), "offset overflow");
}

#[test]
fn overlapping_tensors_are_size_mismatch() {
    let b = GgufBuilder::new().tensor_raw("a", &[16], 0, f32s(&[1.0; 16]), Some(0)).tensor_raw(
        "b",
        &[16],
        0,
        f32s(&[2.0; 16]),
        Some(32),
    );
    let e = open_err(&b.build());
    assert!(matches!(e, IoError::HeaderSizeMismatch { ref reason, .. } if reason.contains("overlaps")), "{e}");
}

#[test]
fn structural_errors_are_corrupt_header() {
    let not_block_multiple = GgufBuilder::new().tensor("q", &[16], GgmlType::Q8_0, vec![0; 34]);
    let too_many_dims = GgufBuilder::new().tensor("t", &[1, 1, 1, 1, 1], GgmlType::F32, f32s(&[1.0]));
    let dup_tensor = GgufBuilder::new().tensor("t", &[1], GgmlType::F32, f32s(&[1.0])).tensor(
        "t",
        &[1],
        GgmlType::F32,
        f32s(&[1.0]),
    );
    let dup_key = GgufBuilder::new().kv("k", GgufValue::U8(1)).kv("k", GgufValue::U8(2));
    let bad_align = GgufBuilder::new().kv("general.alignment", GgufValue::U32(24));
    let zero_align = GgufBuilder::new().kv("general.alignment", GgufValue::U32(0));
    let str_align = GgufBuilder::new().kv("general.alignment", GgufValue::String("32".into()));
    let overflow = GgufBuilder::new().tensor("t", &[u64::MAX, 2], GgmlType::F32, vec![]);
    let mut deep = GgufValue::U8(0);
    for _ in 0..10 {
        deep = GgufValue::Array(deep.value_type(), vec![deep]);
    }
    let too_deep = GgufBuilder::new().kv("deep", deep);
    for (what, b) in [
        ("ne0 % block", not_block_multiple),
        ("dims", too_many_dims),
        ("dup tensor", dup_tensor),
        ("dup key", dup_key),
        ("alignment 24", bad_align),
        ("alignment 0", zero_align),
        ("alignment string", str_align),
        ("numel overflow", overflow),
        ("nesting", too_deep),
    ] {
        let e = open_err(&b.build());
        assert!(matches!(e, IoError::CorruptHeader { .. }), "{what}: {e}");
    }
}

/// Byte position of the first occurrence of `needle`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn bad_value_bytes_are_corrupt_header() {
    let base = GgufBuilder::new().kv("flagkey", GgufValue::Bool(true)).kv("s", GgufValue::String("héllo".into()));
    // Bool byte 2.
    let mut b = base.build();
    let at = find(&b, b"flagkey") + 7 + 4;
    b[at] = 2;
    assert!(matches!(open_err(&b), IoError::CorruptHeader { ref reason, .. } if reason.contains("bool")));
    // Unknown value type 13.
    let mut b = base.build();
    let at = find(&b, b"flagkey") + 7;
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(matches!(open_err(&b), IoError::CorruptHeader { ref reason, .. } if reason.contains("value type 13")));
    // Invalid UTF-8 in a string value.
    let mut b = base.build();
    let at = find(&b, "é".as_bytes());
    b[at] = 0xff;
    assert!(matches!(open_err(&b), IoError::CorruptHeader { ref reason, .. } if reason.contains("UTF-8")));
}

#[test]
fn absurd_lengths_are_truncation_not_allocation() {
    let base = GgufBuilder::new().kv("arr", GgufValue::Array(GgufValueType::U64, vec![GgufValue::U64(1)]));
    let mut b = base.build();
    let at = find(&b, b"arr") + 3 + 4 + 4; // key, value type, element type
    b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(matches!(open_err(&b), IoError::Truncated { .. }));
    // Huge string length.
    let mut b = base.build();
    let at = find(&b, b"arr") - 8;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(open_err(&b), IoError::Truncated { .. }));
    // Huge tensor and kv counts.
    let mut b = base.build();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(open_err(&b), IoError::Truncated { .. }));
    let mut b = base.build();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(open_err(&b), IoError::Truncated { .. }));
}

#[test]
fn types_without_dequantiser_are_unsupported_dtype() {
    let b = GgufBuilder::new()
        .tensor_raw("iq", &[256], 16, vec![0; 66], None)
        .tensor("q81", &[32], GgmlType::Q8_1, vec![0; 36])
        .tensor("ints", &[2], GgmlType::I32, vec![0; 8])
        .tensor("f", &[1], GgmlType::F32, f32s(&[4.0]));
    let (_d, f) = open_ok(&b.build());
    let iq = f.tensor_info("iq").unwrap();
    assert_eq!((iq.ggml_type, iq.n_bytes), (GgmlType::Other(16), None));
    let e = f.get("iq").unwrap_err();
    assert!(
        matches!(e, IoError::UnsupportedDType { ref name, ref dtype, .. }
        if name == "iq" && dtype.contains("IQ2_XXS")),
        "{e}"
    );
    assert!(matches!(f.tensor_bytes("iq"), Err(IoError::UnsupportedDType { .. })));
    assert!(matches!(f.get("q81"), Err(IoError::UnsupportedDType { .. })));
    assert!(matches!(f.get("ints"), Err(IoError::UnsupportedDType { .. })));
    assert_eq!(f.tensor_bytes("ints").unwrap(), &[0; 8]);
    assert_eq!(f.get("f").unwrap()[[0]], 4.0);
    assert!(!GgmlType::Other(99).can_dequantize());
    assert_eq!(GgmlType::Other(99).name(), "type 99");
}

#[test]
fn ggml_type_ids_roundtrip() {
    for id in 0..64 {
        assert_eq!(GgmlType::from_id(id).id(), id);
    }
    for t in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::BF16] {
        assert!(t.can_dequantize(), "{t}");
    }
}

#[test]
fn empty_file_and_header_only_file() {
    assert!(matches!(open_err(&[]), IoError::Truncated { .. }));
    let (_d, f) = open_ok(&GgufBuilder::new().kv("a", GgufValue::U8(1)).build());
    assert!(f.tensors().is_empty());
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(GgufFile::open(dir.path().join("missing.gguf")), Err(IoError::NotFound { .. })));
}

#[test]
fn quantised_tensor_dequantises_through_file() {
    // Q8_0, dims [32, 2]: two rows of one block each, d = 0.5 and 2.0.
    let mut data = Vec::new();
    for (d, base) in [(0.5f32, 0i8), (2.0, -16)] {
        data.extend(f16::from_f32(d).to_le_bytes());
        data.extend((0..32).map(|i| (base + i as i8) as u8));
    }
    let (_d, f) = open_ok(&GgufBuilder::new().tensor("q", &[32, 2], GgmlType::Q8_0, data).build());
    let a = f.get("q").unwrap();
    assert_eq!(a.shape(), &[2, 32]);
    assert_eq!((a[[0, 0]], a[[0, 31]], a[[1, 0]], a[[1, 31]]), (0.0, 15.5, -32.0, 30.0));
}

proptest! {
    #![proptest_config(crate::testing::proptest_config(64))]

    /// Flipping arbitrary bytes of a valid file yields a file that opens or fails with an error, never a panic,
    /// and whose tensors (if it opens) read or fail cleanly.
    #[test]
    fn corrupted_files_never_panic(flips in prop::collection::vec((0usize..4096, any::<u8>()), 1..6)) {
        let mut b = sample().build();
        let n = b.len();
        for (pos, byte) in flips {
            b[pos % n] = byte;
        }
        let (_d, r) = open_bytes(&b);
        if let Ok(f) = r {
            for t in f.tensors() {
                let _ = f.get(&t.name);
            }
        }
    }
}
