//! Reading GGUF files (versions 2 and 3): header, metadata key/values, tensor infos, and tensor data dequantised
//! to f32.
//!
//! File layout (all little-endian): magic `GGUF`, `version: u32`, `tensor_count: u64`, `kv_count: u64`; then
//! `kv_count` entries `(key: string, type: u32, value)`; then `tensor_count` infos `(name: string, n_dims: u32,
//! dims: u64[n_dims], type: u32, offset: u64)`; then padding to `general.alignment` (default 32), then the data
//! section. Strings are `u64` length + UTF-8 bytes; arrays are `(elem_type: u32, len: u64, elems)`. Tensor offsets
//! are relative to the data section and multiples of the alignment.
//!
//! Shapes: ggml lists dimensions innermost first (`ne[0]` is the contiguous axis). [`GgufTensorInfo::dims`] keeps
//! that order; [`GgufTensorInfo::shape`] and the arrays returned by [`GgufFile::get`] use the row-major order of
//! PyTorch/ndarray (reversed), so a `[out, in]` weight stored with `ne = [in, out]` comes back as `[out, in]`.
//!
//! Every inconsistency in a file (bad magic, truncation, absurd counts, misaligned or overlapping data, ...) is a
//! typed [`IoError`]; nothing panics on malformed input.

mod dequant;
mod parse;
mod value;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{ArrayD, IxDyn};

use super::error::{IoError, IoResult};
pub use value::{GgufValue, GgufValueType};

/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays accepted in metadata.
const MAX_ARRAY_DEPTH: usize = 8;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// A ggml tensor element type (the `type` field of a tensor info).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// IEEE single precision (id 0).
    F32,
    /// IEEE half precision (id 1).
    F16,
    /// 4-bit, 32-element blocks, scale only (id 2).
    Q4_0,
    /// 4-bit, 32-element blocks, scale and min (id 3).
    Q4_1,
    /// 5-bit, 32-element blocks, scale only (id 6).
    Q5_0,
    /// 5-bit, 32-element blocks, scale and min (id 7).
    Q5_1,
    /// 8-bit, 32-element blocks (id 8).
    Q8_0,
    /// 8-bit with block sums, used for activations (id 9; no dequantiser).
    Q8_1,
    /// 2-bit k-quant (id 10).
    Q2_K,
    /// 3-bit k-quant (id 11).
    Q3_K,
    /// 4-bit k-quant (id 12).
    Q4_K,
    /// 5-bit k-quant (id 13).
    Q5_K,
    /// 6-bit k-quant (id 14).
    Q6_K,
    /// 8-bit k-quant (id 15).
    Q8_K,
    /// Signed 8-bit integer (id 24).
    I8,
    /// Signed 16-bit integer (id 25).
    I16,
    /// Signed 32-bit integer (id 26).
    I32,
    /// Signed 64-bit integer (id 27).
    I64,
    /// IEEE double precision (id 28).
    F64,
    /// bfloat16 (id 30).
    BF16,
    /// Any other id (IQ*, TQ*, MXFP4, future types): readable as raw bytes only, extent not validated.
    Other(u32),
}

impl GgmlType {
    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Other(other),
        }
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Other(id) => id,
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for [`GgmlType::Other`].
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            F64 => (1, 8),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (dequant::QK_K, 84),
            Q3_K => (dequant::QK_K, 110),
            Q4_K => (dequant::QK_K, 144),
            Q5_K => (dequant::QK_K, 176),
            Q6_K => (dequant::QK_K, 210),
            Q8_K => (dequant::QK_K, 292),
            Other(_) => return None,
        })
    }

    /// Whether [`GgufFile::get`] can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        dequant::supported(self)
    }

    /// ggml's name for the type (`"Q4_K"`, `"IQ2_XXS"`, `"type 99"`).
    pub fn name(self) -> String {
        use GgmlType::*;
        let s = match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
            Other(id) => {
                let known = [
                    (16, "IQ2_XXS"),
                    (17, "IQ2_XS"),
                    (18, "IQ3_XXS"),
                    (19, "IQ1_S"),
                    (20, "IQ4_NL"),
                    (21, "IQ3_S"),
                    (22, "IQ2_S"),
                    (23, "IQ4_XS"),
                    (29, "IQ1_M"),
                    (34, "TQ1_0"),
                    (35, "TQ2_0"),
                    (39, "MXFP4"),
                ];
                return known
                    .iter()
                    .find(|(k, _)| *k == id)
                    .map_or(format!("type {id}"), |(_, n)| format!("{n} (type {id})"));
            }
        };
        s.to_string()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name (llama.cpp names, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) axis.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
    /// Byte length of the data (`None` for types whose layout is unknown).
    pub n_bytes: Option<usize>,
}

impl GgufTensorInfo {
    /// The shape in row-major order (outermost axis first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements (saturating at `usize::MAX` for a shape no machine could hold).
    pub fn numel(&self) -> usize {
        if self.dims.contains(&0) {
            return 0;
        }
        self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?)).unwrap_or(usize::MAX)
    }
}

/// An opened, validated GGUF file; tensor data is read on demand from a read-only memory map.
///
/// ```no_run
/// use peft_core::io::GgufFile;
/// let f = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// assert_eq!(f.meta_str("general.architecture")?, "llama");
/// let layers = f.meta_u64("llama.block_count")?;
/// let w = f.get("blk.0.ffn_down.weight")?; // dequantised, shape [out, in]
/// # Ok::<(), peft_core::io::IoError>(())
/// ```
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: usize,
}

impl GgufFile {
    /// Opens and memory-maps `path`, parsing and validating the header, metadata and tensor infos.
    ///
    /// # Errors
    /// [`IoError::NotFound`] / [`IoError::Io`]; [`IoError::CorruptHeader`] (bad magic, invalid UTF-8, unknown
    /// value type, too many dims, duplicate names, bad alignment, misaligned offsets, a first dimension that is not
    /// a multiple of the block size); [`IoError::UnsupportedVersion`] (not v2/v3); [`IoError::Truncated`];
    /// [`IoError::HeaderSizeMismatch`] (data beyond the end of the file, overlapping tensors).
    pub fn open(path: impl AsRef<Path>) -> IoResult<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| IoError::io(&path, e))?;
        let len = file.metadata().map_err(|e| IoError::io(&path, e))?.len();
        if len < 4 {
            return Err(IoError::Truncated { path, reason: format!("{len} bytes, fewer than the 4-byte magic") });
        }
        // SAFETY: read-only private map; the file must not be truncated or rewritten while open (peft-rs replaces
        // files only by atomic rename, which leaves existing mappings intact).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| IoError::io(&path, e))?;
        let h = parse::parse(&mmap, &path)?;
        let index = h.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path,
            mmap,
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            index,
            alignment: h.alignment,
            data_offset: h.data_offset,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn meta_as<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        f: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> IoResult<T> {
        let v = self.meta(key).ok_or_else(|| IoError::MissingKey { path: self.path.clone(), key: key.into() })?;
        f(v).ok_or_else(|| IoError::MetadataType {
            path: self.path.clone(),
            key: key.into(),
            expected,
            found: v.type_name(),
        })
    }

    /// A non-negative integer value (any integer type).
    ///
    /// # Errors
    /// [`IoError::MissingKey`], or [`IoError::MetadataType`] for non-integers and negative values.
    pub fn meta_u64(&self, key: &str) -> IoResult<u64> {
        self.meta_as(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// A numeric value (any integer or float type) as f64.
    ///
    /// # Errors
    /// [`IoError::MissingKey`], or [`IoError::MetadataType`] for non-numbers.
    pub fn meta_f64(&self, key: &str) -> IoResult<f64> {
        self.meta_as(key, "a number", GgufValue::as_f64)
    }

    /// A string value.
    ///
    /// # Errors
    /// [`IoError::MissingKey`], or [`IoError::MetadataType`] for non-strings.
    pub fn meta_str(&self, key: &str) -> IoResult<&str> {
        self.meta_as(key, "a string", GgufValue::as_str)
    }

    /// An array value's elements.
    ///
    /// # Errors
    /// [`IoError::MissingKey`], or [`IoError::MetadataType`] for non-arrays.
    pub fn meta_array(&self, key: &str) -> IoResult<&[GgufValue]> {
        self.meta_as(key, "an array", GgufValue::as_array)
    }

    /// `general.architecture` (e.g. `"llama"`), if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.meta("general.architecture").and_then(GgufValue::as_str)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`].
    pub fn tensor_info(&self, name: &str) -> IoResult<&GgufTensorInfo> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| IoError::MissingTensor { path: self.path.clone(), name: name.into() })
    }

    /// The raw (quantised) bytes of tensor `name`.
    ///
    /// # Errors
    /// [`IoError::MissingTensor`]; [`IoError::UnsupportedDType`] for types of unknown layout, whose extent is
    /// unknown.
    pub fn tensor_bytes(&self, name: &str) -> IoResult<&[u8]> {
        let t = self.tensor_info(name)?;
        let n = t.n_bytes.ok_or_else(|| self.unsupported(t))?;
        let start = self.data_offset + t.offset as usize;
        Ok(&self.mmap[start..start + n])
    }

    /// Tensor `name` dequantised to f32, in row-major shape ([`GgufTensorInfo::shape`]).
    ///
    /// # Errors
    /// [`IoError::MissingTensor`]; [`IoError::UnsupportedDType`] for integer types and quantisations without a
    /// dequantiser (see [`GgmlType::can_dequantize`]).
    pub fn get(&self, name: &str) -> IoResult<ArrayD<f32>> {
        let t = self.tensor_info(name)?;
        let values = dequant::dequantize(t.ggml_type, self.tensor_bytes(name)?).ok_or_else(|| self.unsupported(t))?;
        // A shape whose element count overflows usize (possible with a zero dimension next to huge ones, where
        // the byte count is 0) is a corrupt header, not a bug (found by the gguf fuzz target).
        ArrayD::from_shape_vec(IxDyn(&t.shape()), values).map_err(|e| IoError::CorruptHeader {
            path: self.path.clone(),
            reason: format!("tensor `{}`: shape {:?} does not describe its data ({e})", t.name, t.shape()),
        })
    }

    fn unsupported(&self, t: &GgufTensorInfo) -> IoError {
        IoError::UnsupportedDType { path: self.path.clone(), name: t.name.clone(), dtype: t.ggml_type.name() }
    }
}

/// A GGUF file writer for tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod test_writer;
#[cfg(test)]
mod tests;
