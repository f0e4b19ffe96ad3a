//! Memory-mapped reading and atomic writing of `.safetensors` files, with F16/BF16/F64 upcast to f32.
//!
//! Layout of the format: an 8-byte little-endian header length `N`, `N` bytes of JSON (an object mapping each
//! tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`, plus an optional `"__metadata__"` object of
//! string values), then the data buffer. Offsets are relative to the data buffer, and the tensors must tile it
//! exactly (no holes, no overlaps, nothing after the last tensor). A duplicate JSON key anywhere in the header is
//! an error ([`IoError::Json`], "duplicate key"): the reference crate keeps the last of two tensor entries of one
//! name, which silently drops the first.
//!
//! The header is validated here rather than by the `safetensors` crate so that every way a file can be wrong
//! becomes a typed [`IoError`] naming the file and the tensor. Tensor data is decoded lazily, one tensor per
//! [`SafeTensorsFile::get`] call, straight from the mapping.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use ndarray::{ArrayD, AsArray, IxDyn};
use serde_json::{Map, Value};

use super::atomic::atomic_write;
use super::error::{IoError, IoResult};
use crate::tensor::Tensor;

/// Largest header accepted (the limit the reference implementation uses).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Element types a safetensors file can declare (the byte-sized ones; sub-byte types such as `F4` are reported
/// as [`IoError::UnsupportedDType`] when the file is opened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits.
    F8E5M2,
    /// 8-bit float, 4 exponent bits.
    F8E4M3,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE double precision.
    F64,
}

impl DType {
    const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::I64,
        DType::U64,
        DType::F64,
    ];

    /// The name the format uses in headers (`"F32"`, `"BF16"`, `"F8_E4M3"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F64 => "F64",
        }
    }

    /// Parses a header dtype name; `None` for names this reader does not know.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Header entry of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type on disk.
    pub dtype: DType,
    /// Shape, outermost axis first (row-major).
    pub shape: Vec<usize>,
    /// `[begin, end)` byte range within the data buffer.
    pub data_offsets: (usize, usize),
}

/// An opened, validated `.safetensors` file; tensors are decoded on demand from a read-only memory map.
///
/// ```no_run
/// use peft_core::io::SafeTensorsFile;
/// let f = SafeTensorsFile::open("model.safetensors")?;
/// for name in f.names() {
///     println!("{name}: {:?} {}", f.shape(name)?, f.dtype(name)?);
/// }
/// let w = f.get("encoder.layer.0.attention.self.query.weight")?; // ArrayD<f32>, F16/BF16 upcast
/// # Ok::<(), peft_core::io::IoError>(())
/// ```
#[derive(Debug)]
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafeTensorsFile {
    /// Opens and memory-maps `path`, parsing and validating the whole header (but no tensor data).
    ///
    /// # Errors
    /// [`IoError::NotFound`] / [`IoError::Io`] for OS errors; [`IoError::Truncated`] for a file shorter than its
    /// length prefix or header; [`IoError::Json`] for a header that is not a JSON object;
    /// [`IoError::CorruptHeader`] for malformed entries; [`IoError::UnsupportedDType`] for dtype names this reader
    /// does not know; [`IoError::HeaderSizeMismatch`] when offsets exceed the data, disagree with shape × dtype
    /// size, overlap, or leave holes.
    pub fn open(path: impl AsRef<Path>) -> IoResult<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| IoError::io(&path, e))?;
        let len = file.metadata().map_err(|e| IoError::io(&path, e))?.len();
        if len < 8 {
            let reason = if len == 0 {
                "empty file (expected an 8-byte header length)".to_string()
            } else {
                format!("{len} bytes, fewer than the 8-byte header length")
            };
            return Err(IoError::Truncated { path, reason });
        }
        // SAFETY: the map is read-only and private to this struct. As with every mmap-based loader, the file must
        // not be truncated or rewritten by another process while it is open; peft-rs itself only ever replaces
        // files by atomic rename (see `atomic_write`), which leaves existing mappings intact.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| IoError::io(&path, e))?;
        let (header_len, tensors, metadata) = parse_header(&mmap, &path)?;
        Ok(SafeTensorsFile { path, mmap, data_start: 8 + header_len, tensors, metadata })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The `__metadata__` map (empty if the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// All header entries, by name.
    pub fn infos(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The header entry of `name`.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`] if there is no such tensor.
    pub fn info(&self, name: &str) -> IoResult<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| IoError::MissingTensor { path: self.path.clone(), name: name.into() })
    }

    /// The shape of `name`.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`] if there is no such tensor.
    pub fn shape(&self, name: &str) -> IoResult<&[usize]> {
        Ok(&self.info(name)?.shape)
    }

    /// The on-disk dtype of `name`.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`] if there is no such tensor.
    pub fn dtype(&self, name: &str) -> IoResult<DType> {
        Ok(self.info(name)?.dtype)
    }

    /// The raw little-endian bytes of `name`, borrowed from the mapping.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`] if there is no such tensor.
    pub fn bytes(&self, name: &str) -> IoResult<&[u8]> {
        let (b, e) = self.info(name)?.data_offsets;
        Ok(&self.mmap[self.data_start + b..self.data_start + e])
    }

    /// Decodes `name` to f32: F32 as is, F16/BF16 widened exactly, F64 rounded to nearest.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`] if there is no such tensor; [`IoError::UnsupportedDType`] for non-float dtypes
    /// (use [`SafeTensorsFile::get_i64`] for integers).
    pub fn get(&self, name: &str) -> IoResult<ArrayD<f32>> {
        let info = self.info(name)?;
        let bytes = self.bytes(name)?;
        let values: Vec<f32> = match info.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("peft-rs bug: chunk of 8")) as f32)
                .collect(),
            other => return Err(self.unsupported(name, other)),
        };
        Ok(ArrayD::from_shape_vec(IxDyn(&info.shape), values).expect("peft-rs bug: validated tensor size"))
    }

    /// Decodes `name` to f32 and checks its shape.
    ///
    /// # Errors
    /// As [`SafeTensorsFile::get`], plus [`IoError::ShapeMismatch`] if the shape is not `expected`.
    pub fn get_checked(&self, name: &str, expected: &[usize]) -> IoResult<ArrayD<f32>> {
        let found = self.shape(name)?;
        if found != expected {
            return Err(IoError::ShapeMismatch {
                path: self.path.clone(),
                name: name.into(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        self.get(name)
    }

    /// Decodes `name` into a constant (frozen) [`Tensor`].
    ///
    /// # Errors
    /// As [`SafeTensorsFile::get`].
    pub fn tensor(&self, name: &str) -> IoResult<Tensor> {
        Ok(Tensor::new(self.get(name)?))
    }

    /// Decodes an integer (or bool) tensor to i64, e.g. token ids in a reference file.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`]; [`IoError::UnsupportedDType`] for float dtypes, and for `U64` values above
    /// `i64::MAX`.
    pub fn get_i64(&self, name: &str) -> IoResult<ArrayD<i64>> {
        let info = self.info(name)?;
        let b = self.bytes(name)?;
        let values: Vec<i64> = match info.dtype {
            DType::Bool | DType::U8 => b.iter().map(|&x| i64::from(x)).collect(),
            DType::I8 => b.iter().map(|&x| i64::from(x as i8)).collect(),
            DType::I16 => b.chunks_exact(2).map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
            DType::U16 => b.chunks_exact(2).map(|c| i64::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            DType::U32 => b.chunks_exact(4).map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            DType::U64 => b
                .chunks_exact(8)
                .map(|c| i64::try_from(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
                .collect::<Result<_, _>>()
                .map_err(|_| IoError::UnsupportedDType {
                    path: self.path.clone(),
                    name: name.into(),
                    dtype: "U64 (value above i64::MAX)".into(),
                })?,
            other => return Err(self.unsupported(name, other)),
        };
        Ok(ArrayD::from_shape_vec(IxDyn(&info.shape), values).expect("peft-rs bug: validated tensor size"))
    }

    /// Decodes every float tensor to f32.
    ///
    /// # Errors
    /// As [`SafeTensorsFile::get`], for the first tensor that fails.
    pub fn load_all(&self) -> IoResult<BTreeMap<String, ArrayD<f32>>> {
        self.names().map(|n| Ok((n.to_string(), self.get(n)?))).collect()
    }

    fn unsupported(&self, name: &str, dtype: DType) -> IoError {
        IoError::UnsupportedDType { path: self.path.clone(), name: name.into(), dtype: dtype.name().into() }
    }
}

/// Parsed header: its byte length, tensor entries, metadata.
type Header = (usize, BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Parses and validates the header of a complete file image.
fn parse_header(buf: &[u8], path: &Path) -> IoResult<Header> {
    let corrupt = |reason: String| IoError::CorruptHeader { path: path.to_path_buf(), reason };
    let mismatch = |name: &str, reason: String| IoError::HeaderSizeMismatch {
        path: path.to_path_buf(),
        name: name.into(),
        reason,
    };

    let n = u64::from_le_bytes(buf[..8].try_into().expect("peft-rs bug: caller checked len >= 8"));
    let rest = (buf.len() - 8) as u64;
    if n > rest {
        let reason = format!("header length {n} exceeds the {rest} bytes after the length prefix");
        return Err(IoError::Truncated { path: path.to_path_buf(), reason });
    }
    if n > MAX_HEADER_LEN {
        return Err(corrupt(format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit")));
    }
    let n = n as usize;
    let text = std::str::from_utf8(&buf[8..8 + n]).map_err(|e| corrupt(format!("header is not UTF-8: {e}")))?;
    // Duplicate keys (a tensor named twice, an entry with two `data_offsets`) are a parse error, not last-wins.
    let root: Map<String, Value> = super::strict_json::object_from_str(text)
        .map_err(|source| IoError::Json { path: path.to_path_buf(), source })?;
    let data_len = buf.len() - 8 - n;

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in root {
        if name == "__metadata__" {
            let obj = entry.as_object().ok_or_else(|| corrupt("`__metadata__` is not an object".into()))?;
            for (k, v) in obj {
                let s = v.as_str().ok_or_else(|| corrupt(format!("`__metadata__.{k}` is not a string: {v}")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let info = parse_entry(&name, &entry, path)?;
        let (b, e) = info.data_offsets;
        if b > e {
            return Err(mismatch(&name, format!("data_offsets [{b}, {e}] are reversed")));
        }
        if e > data_len {
            return Err(mismatch(&name, format!("data_offsets end {e} is beyond the {data_len}-byte data buffer")));
        }
        let numel = info.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let need = numel.and_then(|n| n.checked_mul(info.dtype.size()));
        if need != Some(e - b) {
            let need = need.map_or("more than usize::MAX".to_string(), |n| n.to_string());
            return Err(mismatch(
                &name,
                format!(
                    "data_offsets [{b}, {e}] span {} bytes but shape {:?} of {} needs {need}",
                    e - b,
                    info.shape,
                    info.dtype
                ),
            ));
        }
        tensors.insert(name, info);
    }

    // The tensors must tile the data buffer exactly.
    let mut spans: Vec<(&str, usize, usize)> =
        tensors.iter().map(|(n, i)| (n.as_str(), i.data_offsets.0, i.data_offsets.1)).collect();
    spans.sort_by_key(|&(_, b, e)| (b, e));
    let mut at = 0usize;
    for (name, b, e) in spans {
        if b > at {
            return Err(mismatch(name, format!("hole: bytes [{at}, {b}) of the data buffer belong to no tensor")));
        }
        if b < at {
            return Err(mismatch(name, format!("data_offsets [{b}, {e}] overlap the previous tensor (ends at {at})")));
        }
        at = e;
    }
    if at != data_len {
        return Err(mismatch("<data>", format!("{} bytes after the last tensor belong to no tensor", data_len - at)));
    }
    Ok((n, tensors, metadata))
}

fn parse_entry(name: &str, entry: &Value, path: &Path) -> IoResult<TensorInfo> {
    let corrupt =
        |what: String| IoError::CorruptHeader { path: path.to_path_buf(), reason: format!("`{name}`: {what}") };
    let obj = entry.as_object().ok_or_else(|| corrupt(format!("entry is not an object: {entry}")))?;
    let dtype_name =
        obj.get("dtype").and_then(Value::as_str).ok_or_else(|| corrupt("missing string `dtype`".into()))?;
    let dtype = DType::from_name(dtype_name).ok_or_else(|| IoError::UnsupportedDType {
        path: path.to_path_buf(),
        name: name.into(),
        dtype: dtype_name.into(),
    })?;
    let uint = |v: &Value| v.as_u64().and_then(|x| usize::try_from(x).ok());
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(uint).collect::<Option<Vec<usize>>>())
        .ok_or_else(|| corrupt("`shape` is not an array of non-negative integers".into()))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(uint).collect::<Option<Vec<usize>>>())
        .filter(|o| o.len() == 2)
        .ok_or_else(|| corrupt("`data_offsets` is not an array of two non-negative integers".into()))?;
    Ok(TensorInfo { dtype, shape, data_offsets: (offsets[0], offsets[1]) })
}

/// Reads every float tensor of a `.safetensors` file into memory as f32.
///
/// # Errors
/// As [`SafeTensorsFile::open`] and [`SafeTensorsFile::get`].
pub fn read_safetensors(path: impl AsRef<Path>) -> IoResult<BTreeMap<String, ArrayD<f32>>> {
    SafeTensorsFile::open(path)?.load_all()
}

/// Writes f32 tensors to a `.safetensors` file as F32, atomically (see [`atomic_write`]).
///
/// `tensors` yields `(name, array)` pairs in any order: `[("w", &a)]`, `map.iter()` over a
/// `BTreeMap<String, ArrayD<f32>>`, or `(name, tensor.data())` pairs. Keys are written sorted; `metadata` goes to
/// `__metadata__`. The header is padded to a multiple of 8 bytes, as the reference implementation does.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("peft-st-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// use peft_core::io::{write_safetensors, SafeTensorsFile};
/// let w = ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn();
/// let path = dir.join("adapter.safetensors");
/// write_safetensors(&path, [("lora_A.weight", &w)], None)?;
/// assert_eq!(SafeTensorsFile::open(&path)?.get("lora_A.weight")?, w);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), peft_core::io::IoError>(())
/// ```
///
/// # Errors
/// [`IoError::DuplicateTensor`] for a repeated name, [`IoError::Core`] for the reserved name `__metadata__`, and
/// the errors of [`atomic_write`]. On error an existing file at `path` is left untouched.
pub fn write_safetensors<'a, I, K, A>(
    path: impl AsRef<Path>,
    tensors: I,
    metadata: Option<&BTreeMap<String, String>>,
) -> IoResult<()>
where
    I: IntoIterator<Item = (K, A)>,
    K: AsRef<str>,
    A: AsArray<'a, f32, IxDyn>,
{
    write_safetensors_as(path, tensors, metadata, DType::F32)
}

/// Writes f32 tensors to a `.safetensors` file stored as `dtype` (`F32`, `F16` or `BF16`, rounding to nearest
/// even), atomically. See [`write_safetensors`].
///
/// # Errors
/// As [`write_safetensors`], plus [`IoError::Core`] for any other `dtype` and for finite values that overflow
/// `F16` (|x| > 65504 after rounding); nothing is written in those cases.
pub fn write_safetensors_as<'a, I, K, A>(
    path: impl AsRef<Path>,
    tensors: I,
    metadata: Option<&BTreeMap<String, String>>,
    dtype: DType,
) -> IoResult<()>
where
    I: IntoIterator<Item = (K, A)>,
    K: AsRef<str>,
    A: AsArray<'a, f32, IxDyn>,
{
    const OP: &str = "write_safetensors";
    let path = path.as_ref();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(crate::Error::Unsupported {
            op: OP,
            what: "dtype",
            value: dtype.to_string(),
            expected: "F32, F16 or BF16",
        }
        .into());
    }
    let mut sorted = BTreeMap::new();
    for (name, array) in tensors {
        let name = name.as_ref().to_string();
        if name == "__metadata__" {
            return Err(crate::Error::arg(OP, "tensor name", name, "`__metadata__` is reserved").into());
        }
        let view = array.into();
        if dtype == DType::F16 {
            if let Some(x) = view.iter().find(|x| x.is_finite() && f16::from_f32(**x).is_infinite()) {
                return Err(
                    crate::Error::arg(OP, format!("value of tensor `{name}`"), x, "overflows F16 (max 65504)").into()
                );
            }
        }
        if sorted.insert(name.clone(), view).is_some() {
            return Err(IoError::DuplicateTensor { path: path.to_path_buf(), name });
        }
    }

    let mut header = Map::new();
    if let Some(meta) = metadata {
        let m: Map<String, Value> = meta.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, view) in &sorted {
        let nbytes = view.len() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": view.shape(), "data_offsets": [offset, offset + nbytes]}),
        );
        offset += nbytes;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header)).expect("peft-rs bug: JSON of strings/ints");
    header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');

    atomic_write(path, |w| {
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        let mut chunk = Vec::with_capacity(1 << 16);
        for view in sorted.values() {
            // Logical (row-major) order, whatever the memory layout of the view.
            for &x in view.iter() {
                match dtype {
                    DType::F16 => chunk.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                    DType::BF16 => chunk.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    _ => chunk.extend_from_slice(&x.to_le_bytes()),
                }
                if chunk.len() >= 1 << 16 {
                    w.write_all(&chunk)?;
                    chunk.clear();
                }
            }
        }
        w.write_all(&chunk)
    })
}

#[cfg(test)]
#[path = "safetensors_tests.rs"]
mod tests;

impl crate::nn::WeightSource for SafeTensorsFile {
    fn get(&self, name: &str, shape: &[usize]) -> crate::Result<ArrayD<f32>> {
        if !self.contains(name) {
            return Err(crate::Error::UnknownName { name: format!("{name} (in {})", self.path().display()) });
        }
        match self.get_checked(name, shape) {
            Ok(a) => Ok(a),
            Err(IoError::ShapeMismatch { expected, found, .. }) => Err(crate::Error::WeightShape {
                origin: self.path().display().to_string(),
                name: name.to_string(),
                expected,
                found,
            }),
            Err(e) => Err(crate::Error::file(self.path(), e)),
        }
    }
    fn contains(&self, name: &str) -> bool {
        SafeTensorsFile::contains(self, name)
    }
}
