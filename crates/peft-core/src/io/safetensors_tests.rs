//! Tests of the safetensors reader and writer (kept apart from `safetensors.rs` to keep both files short).

use std::collections::{BTreeMap, HashMap};
use std::fs;

use ndarray::{arr1, arr2, ArrayD, IxDyn};

use super::*;

/// A file image: length prefix, header text, data.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, IoResult<SafeTensorsFile>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    fs::write(&p, bytes).unwrap();
    let r = SafeTensorsFile::open(&p);
    (dir, r)
}

fn open_err(bytes: &[u8]) -> IoError {
    let (_dir, r) = open_bytes(bytes);
    let e = r.unwrap_err();
    assert!(e.path().is_some_and(|p| p.ends_with("t.safetensors")), "error must name the file: {e}");
    e
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn roundtrip_f32_preserves_values_shapes_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let a = arr2(&[[1.0f32, -2.5, 3.25], [4.0, 5.0, f32::MIN_POSITIVE]]).into_dyn();
    let b = arr1(&[0.1f32, f32::INFINITY, -0.0]).into_dyn();
    let scalar = ArrayD::from_elem(IxDyn(&[]), 7.5f32);
    let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&p, [("z.a", &a), ("b", &b), ("s", &scalar), ("e", &empty)], Some(&meta)).unwrap();

    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.names().collect::<Vec<_>>(), ["b", "e", "s", "z.a"]);
    assert_eq!(f.len(), 4);
    assert_eq!(f.metadata(), &meta);
    assert_eq!(f.get("z.a").unwrap(), a);
    assert_eq!(f.shape("z.a").unwrap(), &[2, 3]);
    assert_eq!(f.dtype("z.a").unwrap(), DType::F32);
    let gb = f.get("b").unwrap();
    assert_eq!(gb[[0]], 0.1);
    assert_eq!(gb[[1]], f32::INFINITY);
    assert!(gb[[2]] == 0.0 && gb[[2]].is_sign_negative());
    assert_eq!(f.get("s").unwrap(), scalar);
    assert_eq!(f.get("e").unwrap().shape(), &[0, 3]);
    assert_eq!(f.tensor("z.a").unwrap().shape(), &[2, 3]);
    assert_eq!(read_safetensors(&p).unwrap().len(), 4);
}

#[test]
fn written_header_is_sorted_padded_and_readable_by_reference_crate() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let a = arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn();
    let b = arr1(&[5.0f32]).into_dyn();
    let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
    write_safetensors(&p, [("zz", &a), ("aa", &b)], Some(&meta)).unwrap();
    let bytes = fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "data must start 8-byte aligned");
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let (ia, iz, im) = (header.find("\"aa\"").unwrap(), header.find("\"zz\"").unwrap(), header.find("__metadata__"));
    assert!(im.unwrap() < ia && ia < iz, "metadata first, then sorted keys: {header}");

    let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zz = st.tensor("zz").unwrap();
    assert_eq!(zz.shape(), &[2, 2]);
    assert_eq!(zz.data(), f32_bytes(&[1.0, 2.0, 3.0, 4.0]).as_slice());
    let (_, m) = ::safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(m.metadata().as_ref().unwrap().get("k").map(String::as_str), Some("v"));
}

#[test]
fn reads_files_written_by_reference_crate_in_every_float_dtype() {
    use ::safetensors::tensor::{Dtype, TensorView};
    let xs = [1.0f32, -0.5, 3.140625, 65504.0];
    let h: Vec<u8> = xs.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
    let bh: Vec<u8> = xs.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
    let d: Vec<u8> = [1.0f64, -0.5, 1e300, 0.1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let i: Vec<u8> = [504i64, -3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        ("h", TensorView::new(Dtype::F16, vec![2, 2], &h).unwrap()),
        ("bh", TensorView::new(Dtype::BF16, vec![4], &bh).unwrap()),
        ("d", TensorView::new(Dtype::F64, vec![4], &d).unwrap()),
        ("ids", TensorView::new(Dtype::I64, vec![2], &i).unwrap()),
    ];
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = ::safetensors::serialize(views, Some(meta)).unwrap();
    let (_dir, f) = open_bytes(&bytes);
    let f = f.unwrap();
    assert_eq!(f.get("h").unwrap().into_raw_vec_and_offset().0, xs);
    assert_eq!(f.get("bh").unwrap().into_raw_vec_and_offset().0, xs.map(|x| bf16::from_f32(x).to_f32()));
    let gd = f.get("d").unwrap();
    assert_eq!(gd[[0]], 1.0);
    assert_eq!(gd[[2]], f32::INFINITY, "F64 beyond f32 range rounds to inf");
    assert_eq!(gd[[3]], 0.1f32);
    assert_eq!(f.get_i64("ids").unwrap().into_raw_vec_and_offset().0, [504, -3]);
    assert_eq!(f.metadata()["format"], "pt");
}

#[test]
fn f16_and_bf16_writes_round_to_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let a = arr1(&[1.0f32, 0.1, -2.0e-8, 1000.7]).into_dyn();
    for dt in [DType::F16, DType::BF16] {
        let p = dir.path().join(format!("{dt}.safetensors"));
        write_safetensors_as(&p, [("a", &a)], None, dt).unwrap();
        let f = SafeTensorsFile::open(&p).unwrap();
        assert_eq!(f.dtype("a").unwrap(), dt);
        let want: Vec<f32> = a
            .iter()
            .map(|&x| if dt == DType::F16 { f16::from_f32(x).to_f32() } else { bf16::from_f32(x).to_f32() })
            .collect();
        assert_eq!(f.get("a").unwrap().into_raw_vec_and_offset().0, want);
        assert_eq!(f.bytes("a").unwrap().len(), 8);
    }
}

#[test]
fn non_contiguous_views_are_written_in_logical_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    let a = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn();
    let t = a.t().to_owned(); // expected contents
    write_safetensors(&p, [("t", a.t())], None).unwrap();
    assert_eq!(SafeTensorsFile::open(&p).unwrap().get("t").unwrap(), t);
}

#[test]
fn accepts_btreemap_and_shared_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    let map = BTreeMap::from([("x".to_string(), arr1(&[1.0f32]).into_dyn())]);
    write_safetensors(&p, map.iter(), None).unwrap();
    let tensor = Tensor::new(arr1(&[2.0f32, 3.0]).into_dyn());
    write_safetensors(&p, [("y", tensor.data())], None).unwrap();
    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.names().collect::<Vec<_>>(), ["y"]);
}

#[test]
fn failed_write_leaves_existing_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("keep.safetensors");
    let a = arr1(&[1.0f32, 2.0]).into_dyn();
    write_safetensors(&p, [("a", &a)], None).unwrap();
    let before = fs::read(&p).unwrap();

    let e = write_safetensors(&p, [("b", &a), ("b", &a)], None).unwrap_err();
    assert!(matches!(e, IoError::DuplicateTensor { ref name, .. } if name == "b"), "{e}");
    let big = arr1(&[1.0e6f32]).into_dyn();
    let e = write_safetensors_as(&p, [("big", &big)], None, DType::F16).unwrap_err();
    assert!(e.to_string().contains("overflows F16"), "{e}");
    let e = write_safetensors_as(&p, [("a", &a)], None, DType::I64).unwrap_err();
    assert!(matches!(e, IoError::Core(_)), "{e}");
    let e = write_safetensors(&p, [("__metadata__", &a)], None).unwrap_err();
    assert!(matches!(e, IoError::Core(_)), "{e}");

    assert_eq!(fs::read(&p).unwrap(), before);
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "no temp files left: {names:?}");
}

#[test]
fn missing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.safetensors");
    assert!(matches!(SafeTensorsFile::open(&p), Err(IoError::NotFound { path }) if path == p));
}

#[test]
fn empty_file_is_truncated() {
    let e = open_err(&[]);
    assert!(matches!(e, IoError::Truncated { ref reason, .. } if reason.contains("empty")), "{e}");
}

#[test]
fn file_shorter_than_length_prefix_is_truncated() {
    assert!(matches!(open_err(&[1, 0, 0]), IoError::Truncated { .. }));
}

#[test]
fn header_length_beyond_file_is_truncated() {
    let mut b = raw("{}", &[]);
    b[..8].copy_from_slice(&1000u64.to_le_bytes());
    let e = open_err(&b);
    assert!(matches!(e, IoError::Truncated { ref reason, .. } if reason.contains("1000")), "{e}");
    let mut b = raw("{}", &[]);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(open_err(&b), IoError::Truncated { .. }));
}

#[test]
fn invalid_json_is_json_error() {
    assert!(matches!(open_err(&raw("{\"a\": ", &[])), IoError::Json { .. }));
    assert!(matches!(open_err(&raw("[1, 2]", &[])), IoError::Json { .. }), "header must be an object");
}

#[test]
fn non_utf8_header_is_corrupt() {
    let mut b = raw("{\"a\":1}", &[]);
    b[10] = 0xff;
    assert!(matches!(open_err(&b), IoError::CorruptHeader { .. }));
}

#[test]
fn malformed_entries_are_corrupt_header() {
    for h in [
        r#"{"a": 3}"#,
        r#"{"a": {"shape": [1], "data_offsets": [0, 4]}}"#,
        r#"{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
        r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}"#,
        r#"{"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}"#,
        r#"{"__metadata__": {"k": 1}}"#,
        r#"{"__metadata__": []}"#,
    ] {
        let e = open_err(&raw(h, &[0; 4]));
        assert!(matches!(e, IoError::CorruptHeader { .. }), "{h}: {e}");
    }
}

#[test]
fn offsets_beyond_data_are_size_mismatch() {
    let e = open_err(&raw(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#, &[0; 4]));
    assert!(
        matches!(e, IoError::HeaderSizeMismatch { ref name, ref reason, .. }
        if name == "w" && reason.contains("beyond")),
        "{e}"
    );
}

#[test]
fn offsets_not_matching_shape_and_dtype_are_size_mismatch() {
    // 2 x F32 = 8 bytes, but the range spans 6.
    let e = open_err(&raw(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 6]}}"#, &[0; 6]));
    assert!(
        matches!(e, IoError::HeaderSizeMismatch { ref name, ref reason, .. }
        if name == "w" && reason.contains("needs 8")),
        "{e}"
    );
    // Same bytes, but declared F16: 2 x 2 = 4 != 8.
    let e = open_err(&raw(r#"{"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}"#, &[0; 8]));
    assert!(matches!(e, IoError::HeaderSizeMismatch { .. }), "{e}");
    let e = open_err(&raw(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#, &[0; 8]));
    assert!(matches!(e, IoError::HeaderSizeMismatch { ref reason, .. } if reason.contains("reversed")), "{e}");
    let huge = format!(r#"{{"w": {{"dtype": "F32", "shape": [{}, 4], "data_offsets": [0, 0]}}}}"#, usize::MAX / 2);
    assert!(matches!(open_err(&raw(&huge, &[])), IoError::HeaderSizeMismatch { .. }), "shape product overflow");
}

#[test]
fn overlapping_tensors_are_size_mismatch() {
    let h = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#;
    let e = open_err(&raw(h, &[0; 12]));
    assert!(
        matches!(e, IoError::HeaderSizeMismatch { ref name, ref reason, .. }
        if name == "b" && reason.contains("overlap")),
        "{e}"
    );
}

#[test]
fn holes_and_trailing_bytes_are_size_mismatch() {
    let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
               "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#;
    let e = open_err(&raw(h, &[0; 12]));
    assert!(
        matches!(e, IoError::HeaderSizeMismatch { ref name, ref reason, .. }
        if name == "b" && reason.contains("hole")),
        "{e}"
    );
    let h = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    let e = open_err(&raw(h, &[0; 8]));
    assert!(matches!(e, IoError::HeaderSizeMismatch { ref name, .. } if name == "<data>"), "{e}");
}

#[test]
fn unknown_dtype_name_is_unsupported_dtype() {
    let e = open_err(&raw(r#"{"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}"#, &[0; 1]));
    assert!(matches!(e, IoError::UnsupportedDType { ref name, ref dtype, .. } if name == "w" && dtype == "F4"), "{e}");
}

#[test]
fn integer_tensor_read_as_f32_is_unsupported_dtype() {
    let h = r#"{"ids": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
               "x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#;
    let mut data = 7i64.to_le_bytes().to_vec();
    data.extend(f32_bytes(&[1.5]));
    let (_dir, f) = open_bytes(&raw(h, &data));
    let f = f.unwrap();
    let e = f.get("ids").unwrap_err();
    assert!(matches!(e, IoError::UnsupportedDType { ref name, ref dtype, .. } if name == "ids" && dtype == "I64"));
    assert_eq!(f.get_i64("ids").unwrap()[[0]], 7);
    assert!(matches!(f.get_i64("x"), Err(IoError::UnsupportedDType { .. })));
}

#[test]
fn unsigned_above_i64_max_is_rejected() {
    let h = r#"{"u": {"dtype": "U64", "shape": [1], "data_offsets": [0, 8]}}"#;
    let (_dir, f) = open_bytes(&raw(h, &u64::MAX.to_le_bytes()));
    assert!(matches!(f.unwrap().get_i64("u"), Err(IoError::UnsupportedDType { .. })));
}

#[test]
fn missing_tensor_and_shape_mismatch_name_the_tensor() {
    let h = r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#;
    let (_dir, f) = open_bytes(&raw(h, &f32_bytes(&[1.0, 2.0])));
    let f = f.unwrap();
    assert!(matches!(f.get("v"), Err(IoError::MissingTensor { ref name, .. }) if name == "v"));
    assert!(matches!(f.shape("v"), Err(IoError::MissingTensor { .. })));
    let e = f.get_checked("w", &[3]).unwrap_err();
    assert!(
        matches!(e, IoError::ShapeMismatch { ref expected, ref found, .. }
        if expected == &[3] && found == &[2]),
        "{e}"
    );
    assert_eq!(f.get_checked("w", &[2]).unwrap().into_raw_vec_and_offset().0, [1.0, 2.0]);
    // Issue 14 item 9: loading a model through the weight-source interface names the tensor and the file
    // (it used to say only "load weight: shape mismatch: lhs [3], rhs [2]").
    let e = crate::nn::WeightSource::get(&f, "w", &[3]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, crate::Error::WeightShape { .. }), "{msg}");
    assert!(
        msg.contains("t.safetensors") && msg.contains("`w`") && msg.contains("[3]") && msg.contains("[2]"),
        "{msg}"
    );
}

#[test]
fn header_with_only_metadata_and_no_tensors_is_valid() {
    let (_dir, f) = open_bytes(&raw(r#"{"__metadata__": {"a": "b"}}"#, &[]));
    let f = f.unwrap();
    assert!(f.is_empty());
    assert_eq!(f.metadata()["a"], "b");
}

#[test]
fn duplicate_keys_are_a_json_error_naming_the_key() {
    let data = f32_bytes(&[1.0, 2.0]);
    let cases = [
        // The fuzz smoke's find: last-wins parsing took the second `data_offsets` and accepted the file.
        (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4],"data_offsets":[0,8]}}"#, "data_offsets"),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            "a",
        ),
        (r#"{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, "k"),
    ];
    for (header, key) in cases {
        match open_err(&raw(header, &data)) {
            IoError::Json { source, .. } => {
                assert!(source.to_string().contains(&format!("duplicate key `{key}`")), "{header}: {source}")
            }
            other => panic!("{header}: expected a JSON error, got {other:?}"),
        }
    }
    // The same file without the duplicate opens.
    let (_d, ok) = open_bytes(&raw(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &data));
    assert_eq!(ok.unwrap().get("a").unwrap().as_slice().unwrap(), &[1.0, 2.0]);
}
