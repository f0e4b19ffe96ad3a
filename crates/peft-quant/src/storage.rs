//! bitsandbytes' serialized layouts in safetensors, read and written byte-for-byte.
//!
//! A 4-bit linear layer at module path `p` is stored (bnb `Linear4bit._save_to_state_dict` +
//! `QuantState.as_dict(packed=True)`) as:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `p.weight` | U8 (or the `quant_storage` dtype) | `[(n+1)/2, 1]` |
//! | `p.weight.absmax` | F32, or U8 when double quantized | `[blocks]` |
//! | `p.weight.quant_map` | F32 | `[16]` |
//! | `p.weight.nested_absmax` | F32 | `[ceil(blocks/256)]` (double quant only) |
//! | `p.weight.nested_quant_map` | F32 | `[256]` (double quant only) |
//! | `p.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | UTF-8 JSON bytes |
//! | `p.bias` | the layer dtype | `[out]` |
//!
//! The JSON is Python's `json.dumps` of `{"quant_type", "blocksize", "dtype", "shape"}` plus, with double
//! quantisation, `{"nested_blocksize", "nested_dtype", "nested_offset"}`, in that order, with `", "` / `": "`
//! separators and Python's float `repr` for the offset. An int8 layer (bnb `Linear8bitLt`) is `p.weight` (I8),
//! `p.SCB` (F32 `[out]`) and `p.weight_format` (U8 scalar 0).
//!
//! LQ-LoRA's NF-b storage ([`NfPacked`]) has no bitsandbytes counterpart; this crate stores it under its own keys
//! ([`Checkpoint::insert_nf`]):
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `p.weight` | U8 | `[⌈n·b/8⌉]`: the `b`-bit value codes, little-endian bit order |
//! | `p.weight.nf_scale_codes` | U8 | `[⌈blocks·b0/8⌉]`: the `b0`-bit block-scale codes |
//! | `p.weight.nf_group_max` | `b1`'s dtype (F32, BF16 or F16) | `[⌈blocks/B1⌉]` |
//! | `p.weight.nf_min` | F32 | `[1]` |
//! | `p.weight.quant_state.peft_rs__nf` | U8 | UTF-8 JSON `{"quant_type": "nf", "bits", "scale_bits", "blocksize", "groupsize", "group_dtype", "shape"}` |
//!
//! [`Checkpoint`] keeps every tensor as raw bytes and writes safetensors exactly like the `safetensors` library
//! (tensors sorted by descending dtype then name, compact JSON header padded with spaces to 8 bytes, metadata
//! first, in the order it was read), so reading a bnb checkpoint and writing it back — or re-emitting its layers
//! from parsed [`Quant4`] states — reproduces the file byte for byte. Writes are atomic (temp file + rename).

use std::collections::BTreeMap;
use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::Arc;

use peft_core::io::IoError;

use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use crate::block4::{Absmax, FloatDtype, Quant4, QuantStorage, QuantType, NESTED_BLOCKSIZE};
use crate::blockwise8::Blockwise8;
use crate::error::{checked_numel, size, QuantError, Result};
use crate::int8::Int8Rows;
use crate::lq_lora::NfQuant;
use crate::nf_storage::NfPacked;

/// The state entry of an NF-b weight (after `<p>.weight.`): this crate's key, not a bitsandbytes one.
const NF_STATE: &str = "quant_state.peft_rs__nf";

/// Tensor bytes: owned, or a range of a shared read-only memory map.
#[derive(Clone)]
enum Bytes {
    Owned(Vec<u8>),
    Mapped { map: Arc<memmap2::Mmap>, range: Range<usize> },
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Bytes {}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if matches!(self, Bytes::Owned(_)) { "owned" } else { "mapped" };
        write!(f, "{} {kind} bytes", self.len())
    }
}

/// One stored tensor: dtype, shape and little-endian bytes (owned, or a range of the memory map of the file it
/// was read from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Bytes,
}

impl RawTensor {
    /// A tensor from its parts.
    ///
    /// # Errors
    /// [`QuantError::Overflow`] when the shape's size does not fit in `usize`; [`QuantError::Size`] when the byte
    /// count does not match dtype and shape.
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        size("tensor bytes", Self::byte_len(dtype, &shape)?, data.len())?;
        Ok(RawTensor { dtype, shape, data: Bytes::Owned(data) })
    }

    /// The byte count of a `dtype` tensor of `shape`, checked.
    fn byte_len(dtype: Dtype, shape: &[usize]) -> Result<usize> {
        let n = checked_numel("tensor", shape)?;
        n.checked_mul(dtype.bitsize())
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| QuantError::Overflow { what: "tensor bytes".into(), shape: shape.to_vec() })
    }

    /// An F32 tensor.
    ///
    /// # Errors
    /// As [`RawTensor::new`].
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        Self::new(Dtype::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A float tensor of `dtype` from f32 values (rounded to nearest even for bf16/f16).
    ///
    /// # Errors
    /// As [`RawTensor::new`].
    pub fn from_f32_as(dtype: FloatDtype, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        match dtype {
            FloatDtype::F32 => Self::from_f32(shape, values),
            FloatDtype::Bf16 => {
                let b = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
                Self::new(Dtype::BF16, shape, b)
            }
            FloatDtype::F16 => {
                let b = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
                Self::new(Dtype::F16, shape, b)
            }
        }
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The values as f32 (F32, BF16 and F16 tensors).
    ///
    /// # Errors
    /// [`QuantError::Dtype`] for other dtypes (`name` is used in the message).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let b = &self.data;
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(dtype_err(name, "F32, BF16 or F16", other)),
        })
    }

    fn expect_dtype(&self, name: &str, dtype: Dtype) -> Result<()> {
        if self.dtype == dtype {
            Ok(())
        } else {
            Err(dtype_err(name, &format!("{dtype:?}"), self.dtype))
        }
    }
}

fn dtype_err(name: &str, expected: &str, got: Dtype) -> QuantError {
    QuantError::Dtype { name: name.to_string(), expected: expected.to_string(), got: format!("{got:?}") }
}

/// A safetensors checkpoint held as raw tensors plus its `__metadata__`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    metadata: Option<Map<String, Value>>,
    tensors: BTreeMap<String, RawTensor>,
}

impl Checkpoint {
    /// An empty checkpoint (no metadata).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a safetensors buffer.
    ///
    /// # Errors
    /// [`QuantError::Safetensors`] for a malformed file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, |_, data| Bytes::Owned(data.to_vec()))
    }

    /// Parses a safetensors buffer, storing each tensor's bytes as `keep(offset, bytes)` makes them.
    fn parse(bytes: &[u8], keep: impl Fn(usize, &[u8]) -> Bytes) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)?;
        // The crate validated the header; re-read it only to keep the metadata's key order.
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("peft-rs bug: validated header length")) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n])
            .map_err(|e| QuantError::BadQuantState { key: "__header__".into(), msg: e.to_string() })?;
        let metadata = match header.get("__metadata__") {
            Some(Value::Object(m)) => Some(m.clone()),
            _ => None,
        };
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let (dtype, shape, data) = (view.dtype(), view.shape().to_vec(), view.data());
            size(format!("bytes of `{name}`"), RawTensor::byte_len(dtype, &shape)?, data.len())?;
            // `data` borrows from `bytes`: its offset locates it in a memory map.
            let offset = (data.as_ptr() as usize).wrapping_sub(bytes.as_ptr() as usize);
            let inside = bytes.get(offset..).is_some_and(|b| b.as_ptr() == data.as_ptr() && b.len() >= data.len());
            let data = if inside { keep(offset, data) } else { Bytes::Owned(data.to_vec()) };
            tensors.insert(name, RawTensor { dtype, shape, data });
        }
        Ok(Checkpoint { metadata, tensors })
    }

    /// Reads a safetensors file through a read-only memory map: tensor bytes stay in the page cache (shared with
    /// the file) instead of being copied onto the heap, so reading a 3 GB file costs no 3 GB of memory.
    ///
    /// The file must not be truncated or rewritten in place while the checkpoint is alive (every writer in this
    /// workspace replaces files by rename, which leaves an existing map valid).
    ///
    /// # Errors
    /// [`QuantError::File`] naming the path (missing or unreadable file); as [`Checkpoint::from_bytes`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| IoError::io(path, e))?;
        if file.metadata().map_err(|e| IoError::io(path, e))?.len() == 0 {
            // An empty file cannot be mapped; let the parser report it.
            return Self::from_bytes(&[]);
        }
        // SAFETY: the map is read-only and private to this process; see the note above on concurrent writers.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| IoError::io(path, e))?);
        Self::parse(&map, |offset, data| Bytes::Mapped { map: Arc::clone(&map), range: offset..offset + data.len() })
    }

    /// Serialises exactly as the `safetensors` library does.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("peft-rs bug: writing to a Vec cannot fail");
        out
    }

    /// Streams the serialisation of [`Checkpoint::to_bytes`] into `w` (no second copy of the tensors in memory).
    ///
    /// # Errors
    /// `w`'s errors.
    pub fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut order: Vec<(&String, &RawTensor)> = self.tensors.iter().collect();
        order.sort_by(|(ln, l), (rn, r)| r.dtype.cmp(&l.dtype).then(ln.cmp(rn)));
        let mut header = Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), Value::Object(m.clone()));
        }
        let mut offset = 0usize;
        for (name, t) in &order {
            let mut info = Map::new();
            info.insert("dtype".into(), serde_json::to_value(t.dtype).expect("peft-rs bug: dtype serialises"));
            info.insert("shape".into(), Value::from(t.shape.clone()));
            info.insert("data_offsets".into(), Value::from(vec![offset, offset + t.data.len()]));
            offset += t.data.len();
            header.insert((*name).clone(), Value::Object(info));
        }
        let mut h = serde_json::to_string(&header).expect("peft-rs bug: header serialises").into_bytes();
        h.resize(h.len().next_multiple_of(8), b' ');
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for (_, t) in order {
            w.write_all(&t.data)?;
        }
        Ok(())
    }

    /// Writes atomically with [`peft_core::io::atomic_write`]: a temporary file in the same directory, synced,
    /// then renamed over `path` (temporaries of killed earlier writers of `path` are removed first).
    ///
    /// # Errors
    /// [`QuantError::File`] naming the path.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        Ok(peft_core::io::atomic_write(path, |w| self.write_to(w))?)
    }

    /// The `__metadata__` map (e.g. `{"format": "pt"}`).
    pub fn metadata(&self) -> Option<&Map<String, Value>> {
        self.metadata.as_ref()
    }

    /// Sets one `__metadata__` entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.get_or_insert_with(Map::new).insert(key.into(), Value::String(value.into()));
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The tensor `name`.
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.tensors.get(name)
    }

    /// The tensor `name` or [`QuantError::MissingTensor`].
    ///
    /// # Errors
    /// [`QuantError::MissingTensor`].
    pub fn require(&self, name: &str) -> Result<&RawTensor> {
        self.tensors.get(name).ok_or_else(|| QuantError::MissingTensor(name.to_string()))
    }

    /// Inserts (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: RawTensor) {
        self.tensors.insert(name.into(), t);
    }

    /// Removes a tensor.
    pub fn remove(&mut self, name: &str) -> Option<RawTensor> {
        self.tensors.remove(name)
    }

    /// Module paths that hold a bnb 4-bit weight (a `<path>.weight.quant_state.bitsandbytes__*` entry), sorted.
    pub fn quant4_modules(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| {
                let (head, tail) = k.rsplit_once(".quant_state.bitsandbytes__")?;
                QuantType::parse(tail)?;
                module_of_weight(head)
            })
            .map(str::to_string)
            .collect();
        v.dedup();
        v
    }

    /// Stores a 4-bit weight for module `prefix` with bnb's keys (replacing any previous entries).
    ///
    /// # Errors
    /// [`QuantError::Size`] when the packed bytes cannot be reinterpreted as the `quant_storage` dtype.
    pub fn insert_quant4(&mut self, prefix: &str, q: &Quant4) -> Result<()> {
        let w = key(prefix, "weight");
        for t in [QuantType::Nf4, QuantType::Fp4] {
            self.tensors.remove(&format!("{w}.quant_state.bitsandbytes__{}", t.name()));
        }
        for k in ["absmax", "quant_map", "nested_absmax", "nested_quant_map"] {
            self.tensors.remove(&format!("{w}.{k}"));
        }
        let packed = q.packed().to_vec();
        let (dtype, elem) = match q.storage() {
            QuantStorage::U8 => (Dtype::U8, 1),
            QuantStorage::Float(FloatDtype::F32) => (Dtype::F32, 4),
            QuantStorage::Float(FloatDtype::Bf16) => (Dtype::BF16, 2),
            QuantStorage::Float(FloatDtype::F16) => (Dtype::F16, 2),
        };
        size(
            "packed bytes divisible by the quant_storage element size",
            packed.len().next_multiple_of(elem),
            packed.len(),
        )?;
        self.insert(w.clone(), RawTensor::new(dtype, vec![packed.len() / elem, 1], packed)?);
        self.insert(format!("{w}.quant_map"), RawTensor::from_f32(vec![16], q.quant_type().table())?);
        match q.absmax() {
            Absmax::Plain(v) => self.insert(format!("{w}.absmax"), RawTensor::from_f32(vec![v.len()], v)?),
            Absmax::Double { q: q8, .. } => {
                self.insert(format!("{w}.absmax"), RawTensor::new(Dtype::U8, vec![q8.len()], q8.codes().to_vec())?);
                let a2 = q8.absmax();
                self.insert(format!("{w}.nested_absmax"), RawTensor::from_f32(vec![a2.len()], a2)?);
                self.insert(format!("{w}.nested_quant_map"), RawTensor::from_f32(vec![256], q8.code())?);
            }
        }
        let json = quant_state_json(q).into_bytes();
        let qs = format!("{w}.quant_state.bitsandbytes__{}", q.quant_type().name());
        self.insert(qs, RawTensor::new(Dtype::U8, vec![json.len()], json)?);
        Ok(())
    }

    /// Reads the 4-bit weight of module `prefix`.
    ///
    /// # Errors
    /// [`QuantError::MissingQuantState`], [`QuantError::MissingTensor`], [`QuantError::BadQuantState`] (JSON that
    /// is not bnb's, a quant_map that is not the built-in table), [`QuantError::Dtype`], [`QuantError::Size`].
    pub fn quant4(&self, prefix: &str) -> Result<Quant4> {
        let w = key(prefix, "weight");
        let found: Vec<(QuantType, String)> = [QuantType::Nf4, QuantType::Fp4]
            .into_iter()
            .map(|t| (t, format!("{w}.quant_state.bitsandbytes__{}", t.name())))
            .filter(|(_, k)| self.tensors.contains_key(k))
            .collect();
        let (qt, qs_key) = match found.as_slice() {
            [] => return Err(QuantError::MissingQuantState(w)),
            [one] => one.clone(),
            _ => return Err(bad(&w, "both an nf4 and an fp4 quant_state entry")),
        };
        let qs_t = self.require(&qs_key)?;
        qs_t.expect_dtype(&qs_key, Dtype::U8)?;
        let st = parse_quant_state(&qs_key, qs_t.data())?;
        if st.quant_type != qt {
            return Err(bad(&qs_key, &format!("quant_type `{}` in a `{}` entry", st.quant_type.name(), qt.name())));
        }
        let packed_t = self.require(&w)?;
        let storage = match packed_t.dtype() {
            Dtype::U8 => QuantStorage::U8,
            Dtype::F32 => QuantStorage::Float(FloatDtype::F32),
            Dtype::BF16 => QuantStorage::Float(FloatDtype::Bf16),
            Dtype::F16 => QuantStorage::Float(FloatDtype::F16),
            other => return Err(dtype_err(&w, "U8 (or a float quant_storage)", other)),
        };
        let qmap_k = format!("{w}.quant_map");
        let qmap = self.require(&qmap_k)?.to_f32(&qmap_k)?;
        if qmap.len() != 16 || qmap.iter().zip(qt.table()).any(|(a, b)| a != b) {
            return Err(bad(&qmap_k, &format!("not bitsandbytes' {} table", qt.name())));
        }
        let absmax_k = format!("{w}.absmax");
        let absmax_t = self.require(&absmax_k)?;
        let absmax = match st.nested {
            None => {
                absmax_t.expect_dtype(&absmax_k, Dtype::F32)?;
                Absmax::Plain(absmax_t.to_f32(&absmax_k)?)
            }
            Some((nested_bs, offset)) => {
                absmax_t.expect_dtype(&absmax_k, Dtype::U8)?;
                let a2_k = format!("{w}.nested_absmax");
                let a2_t = self.require(&a2_k)?;
                a2_t.expect_dtype(&a2_k, Dtype::F32)?;
                let code_k = format!("{w}.nested_quant_map");
                let code = self.require(&code_k)?.to_f32(&code_k)?;
                let code: [f32; 256] = code.try_into().map_err(|c: Vec<f32>| QuantError::Size {
                    what: code_k,
                    expected: 256,
                    got: c.len(),
                })?;
                let q8 = Blockwise8::from_parts(absmax_t.data().to_vec(), a2_t.to_f32(&a2_k)?, nested_bs, code)?;
                Absmax::Double { q: q8, offset }
            }
        };
        let q = Quant4::from_parts(qt, st.blocksize, st.shape, st.dtype, packed_t.data().to_vec(), absmax)?;
        Ok(q.with_storage(storage))
    }

    /// Stores LQ-LoRA's NF-b weight ([`NfPacked`]) for module `prefix` under this crate's own keys (no
    /// bitsandbytes layout exists for it; see the module docs), replacing a previous NF-b weight there.
    ///
    /// # Errors
    /// Never in practice (sizes are consistent by construction).
    pub fn insert_nf(&mut self, prefix: &str, q: &NfPacked) -> Result<()> {
        let w = key(prefix, "weight");
        let c = q.config();
        self.insert(w.clone(), RawTensor::new(Dtype::U8, vec![q.codes().len()], q.codes().to_vec())?);
        let sc = q.scale_codes().to_vec();
        self.insert(format!("{w}.nf_scale_codes"), RawTensor::new(Dtype::U8, vec![sc.len()], sc)?);
        let gm = q.group_max();
        self.insert(format!("{w}.nf_group_max"), RawTensor::from_f32_as(c.group_dtype, vec![gm.len()], gm)?);
        self.insert(format!("{w}.nf_min"), RawTensor::from_f32(vec![1], &[q.min()])?);
        let shape: Vec<String> = q.shape().iter().map(usize::to_string).collect();
        let json = format!(
            "{{\"quant_type\": \"nf\", \"bits\": {}, \"scale_bits\": {}, \"blocksize\": {}, \"groupsize\": {}, \
             \"group_dtype\": \"{}\", \"shape\": [{}]}}",
            c.bits,
            c.scale_bits,
            c.block,
            c.group,
            c.group_dtype.name(),
            shape.join(", ")
        )
        .into_bytes();
        self.insert(format!("{w}.{NF_STATE}"), RawTensor::new(Dtype::U8, vec![json.len()], json)?);
        Ok(())
    }

    /// Module paths that hold an NF-b weight (a `<path>.weight.quant_state.peft_rs__nf` entry), sorted.
    pub fn nf_modules(&self) -> Vec<String> {
        let suffix = format!(".{NF_STATE}");
        self.tensors.keys().filter_map(|k| module_of_weight(k.strip_suffix(&suffix)?)).map(str::to_string).collect()
    }

    /// True when module `prefix` holds an NF-b weight ([`Checkpoint::insert_nf`]'s state entry).
    pub fn has_nf(&self, prefix: &str) -> bool {
        self.tensors.contains_key(&format!("{}.{NF_STATE}", key(prefix, "weight")))
    }

    /// Reads the NF-b weight of module `prefix` ([`Checkpoint::insert_nf`]).
    ///
    /// # Errors
    /// [`QuantError::MissingTensor`], [`QuantError::BadQuantState`] (a state entry that is not the JSON written
    /// here), [`QuantError::Dtype`], and [`NfPacked::from_parts`]' errors (sizes that do not follow from the
    /// shape, bad scales).
    pub fn nf(&self, prefix: &str) -> Result<NfPacked> {
        let w = key(prefix, "weight");
        let sk = format!("{w}.{NF_STATE}");
        let st = self.require(&sk)?;
        st.expect_dtype(&sk, Dtype::U8)?;
        let js = StateJson::parse(&sk, st.data())?;
        let bits = |name: &str| -> Result<u8> {
            u8::try_from(js.uint(name)?).map_err(|_| bad(&sk, &format!("`{name}` is not a bit width")))
        };
        if js.field("quant_type")?.as_str() != Some("nf") {
            return Err(bad(&sk, "`quant_type` is not \"nf\""));
        }
        let group_dtype = js.float_dtype("group_dtype")?;
        let shape = js.shape()?;
        let cfg = NfQuant {
            bits: bits("bits")?,
            scale_bits: bits("scale_bits")?,
            block: js.uint("blocksize")?,
            group: js.uint("groupsize")?,
            group_dtype,
        };
        let codes_t = self.require(&w)?;
        codes_t.expect_dtype(&w, Dtype::U8)?;
        let sck = format!("{w}.nf_scale_codes");
        let sc_t = self.require(&sck)?;
        sc_t.expect_dtype(&sck, Dtype::U8)?;
        let gk = format!("{w}.nf_group_max");
        let g_t = self.require(&gk)?;
        let want = match group_dtype {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::Bf16 => Dtype::BF16,
            FloatDtype::F16 => Dtype::F16,
        };
        g_t.expect_dtype(&gk, want)?;
        let mk = format!("{w}.nf_min");
        let m_t = self.require(&mk)?;
        m_t.expect_dtype(&mk, Dtype::F32)?;
        let min = m_t.to_f32(&mk)?;
        let [min] = min.as_slice() else {
            return Err(QuantError::Size { what: mk, expected: 1, got: min.len() });
        };
        NfPacked::from_parts(cfg, &shape, codes_t.data().to_vec(), sc_t.data().to_vec(), g_t.to_f32(&gk)?, *min)
    }

    /// Stores an int8 row-wise weight for module `prefix` with bnb `Linear8bitLt`'s keys.
    ///
    /// # Errors
    /// Never in practice (sizes are consistent by construction).
    pub fn insert_int8(&mut self, prefix: &str, q: &Int8Rows) -> Result<()> {
        let bytes = q.codes().iter().map(|&v| v.to_le_bytes()[0]).collect();
        self.insert(key(prefix, "weight"), RawTensor::new(Dtype::I8, vec![q.rows(), q.cols()], bytes)?);
        self.insert(key(prefix, "SCB"), RawTensor::from_f32(vec![q.rows()], q.scb())?);
        self.insert(key(prefix, "weight_format"), RawTensor::new(Dtype::U8, vec![], vec![0])?);
        Ok(())
    }

    /// Reads the int8 row-wise weight of module `prefix`.
    ///
    /// # Errors
    /// [`QuantError::MissingTensor`], [`QuantError::Dtype`], [`QuantError::Size`]; [`QuantError::BadQuantState`]
    /// for a `weight_format` other than row-major (0).
    pub fn int8(&self, prefix: &str) -> Result<Int8Rows> {
        let wk = key(prefix, "weight");
        let w = self.require(&wk)?;
        w.expect_dtype(&wk, Dtype::I8)?;
        let [rows, cols] = w.shape() else {
            return Err(QuantError::Size { what: format!("rank of `{wk}`"), expected: 2, got: w.shape().len() });
        };
        let sk = key(prefix, "SCB");
        let s = self.require(&sk)?;
        s.expect_dtype(&sk, Dtype::F32)?;
        let fk = key(prefix, "weight_format");
        if let Some(f) = self.get(&fk) {
            if f.data().iter().any(|&b| b != 0) {
                return Err(bad(&fk, "only the row-major weight_format (0) is supported"));
            }
        }
        let q = w.data().iter().map(|&b| i8::from_le_bytes([b])).collect();
        Int8Rows::from_parts(*rows, *cols, q, s.to_f32(&sk)?)
    }
}

/// The module path of weight key `head` (`a.b.weight` -> `a.b`, `weight` -> ``), if it is a weight.
fn module_of_weight(head: &str) -> Option<&str> {
    if head == "weight" {
        Some("")
    } else {
        head.strip_suffix(".weight")
    }
}

/// A quant-state JSON entry being read; every error names its key.
struct StateJson<'a> {
    key: &'a str,
    obj: Map<String, Value>,
}

impl<'a> StateJson<'a> {
    fn parse(key: &'a str, bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|e| bad(key, &format!("not UTF-8: {e}")))?;
        let v: Value = serde_json::from_str(text).map_err(|e| bad(key, &format!("not JSON: {e}")))?;
        let Value::Object(obj) = v else { return Err(bad(key, "not a JSON object")) };
        Ok(StateJson { key, obj })
    }

    fn has(&self, name: &str) -> bool {
        self.obj.contains_key(name)
    }

    fn field(&self, name: &str) -> Result<&Value> {
        self.obj.get(name).ok_or_else(|| bad(self.key, &format!("no `{name}`")))
    }

    fn uint(&self, name: &str) -> Result<usize> {
        let n =
            self.field(name)?.as_u64().ok_or_else(|| bad(self.key, &format!("`{name}` is not an unsigned integer")))?;
        usize::try_from(n).map_err(|_| bad(self.key, &format!("`{name}` too large")))
    }

    fn float_dtype(&self, name: &str) -> Result<FloatDtype> {
        self.field(name)?
            .as_str()
            .and_then(FloatDtype::parse)
            .ok_or_else(|| bad(self.key, &format!("`{name}` is not float32, bfloat16 or float16")))
    }

    fn shape(&self) -> Result<Vec<usize>> {
        self.field("shape")?
            .as_array()
            .ok_or_else(|| bad(self.key, "`shape` is not a list"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(|| bad(self.key, "`shape` entry")))
            .collect()
    }
}

fn key(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

fn bad(key: &str, msg: &str) -> QuantError {
    QuantError::BadQuantState { key: key.to_string(), msg: msg.to_string() }
}

/// The non-tensor part of a bnb quant state.
#[derive(Clone, Debug, PartialEq)]
struct QuantStateJson {
    quant_type: QuantType,
    blocksize: usize,
    dtype: FloatDtype,
    shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` with double quantisation.
    nested: Option<(usize, f32)>,
}

fn parse_quant_state(k: &str, bytes: &[u8]) -> Result<QuantStateJson> {
    let st = StateJson::parse(k, bytes)?;
    let quant_type = st
        .field("quant_type")?
        .as_str()
        .and_then(QuantType::parse)
        .ok_or_else(|| bad(k, "`quant_type` is not \"nf4\" or \"fp4\""))?;
    let dtype = st.float_dtype("dtype")?;
    let shape = st.shape()?;
    checked_numel(k, &shape)?;
    let nested = if st.has("nested_offset") || st.has("nested_blocksize") {
        let nbs = st.uint("nested_blocksize")?;
        if nbs == 0 {
            return Err(bad(k, "`nested_blocksize` is 0"));
        }
        if st.field("nested_dtype")?.as_str() != Some("float32") {
            return Err(bad(k, "`nested_dtype` is not float32"));
        }
        let off = st.field("nested_offset")?.as_f64().ok_or_else(|| bad(k, "`nested_offset` is not a number"))?;
        Some((nbs, off as f32))
    } else {
        None
    };
    Ok(QuantStateJson { quant_type, blocksize: st.uint("blocksize")?, dtype, shape, nested })
}

/// The quant_state JSON exactly as bnb writes it (Python `json.dumps` of the packed dict).
pub fn quant_state_json(q: &Quant4) -> String {
    let shape: Vec<String> = q.shape().iter().map(usize::to_string).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.quant_type().name(),
        q.blocksize(),
        q.dtype().name(),
        shape.join(", ")
    );
    if let Absmax::Double { q: q8, offset } = q.absmax() {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            q8.blocksize(),
            python_float_repr(f64::from(*offset))
        ));
    }
    s.push('}');
    s
}

/// Python's `repr(float)` (and `json.dumps`) for a finite double: shortest round-trip digits, scientific notation
/// when the decimal exponent is below -4 or above 15 (`1e-05`, `1e+16`), otherwise positional with at least one
/// fractional digit (`2.0`).
pub fn python_float_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{:e}", v.abs());
    let (mant, exp) = sci.split_once('e').expect("peft-rs bug: {:e} has an exponent");
    let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
    let exp: i32 = exp.parse().expect("peft-rs bug: {:e} exponent is an integer");
    let decpt = exp + 1;
    let sign = if v < 0.0 { "-" } else { "" };
    let n = digits.len() as i32;
    if !(-4 < decpt && decpt <= 16) {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    } else if decpt <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt < n {
        format!("{sign}{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
    } else {
        format!("{sign}{digits}{}.0", "0".repeat((decpt - n) as usize))
    }
}

const _: () = assert!(NESTED_BLOCKSIZE == 256);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block4::Quant4Config;

    fn sample(dq: bool) -> Quant4 {
        let x: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let cfg = Quant4Config { double_quant: dq, ..Quant4Config::default() };
        Quant4::quantize(&x, &[3, 100], &cfg).unwrap()
    }

    fn ckpt(q: &Quant4) -> Checkpoint {
        let mut c = Checkpoint::new();
        c.set_metadata("format", "pt");
        c.insert_quant4("m.proj", q).unwrap();
        c
    }

    /// Issue 14 item 6: a quant_state shape whose element count overflows (`[2^32, 2^32]` wraps to 0 with a plain
    /// `product()`, which matched empty packed/absmax tensors) is a typed error, as is a raw tensor of such a shape.
    #[test]
    fn overflowing_shapes_are_typed_errors_not_wrapped_sizes() {
        let mut c = ckpt(&sample(false));
        set_json(
            &mut c,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4294967296, 4294967296]}"#,
        );
        c.insert("m.proj.weight", RawTensor::new(Dtype::U8, vec![0, 1], vec![]).unwrap());
        c.insert("m.proj.weight.absmax", RawTensor::from_f32(vec![0], &[]).unwrap());
        let e = c.quant4("m.proj").unwrap_err();
        assert!(matches!(e, QuantError::Overflow { .. }), "{e}");
        assert!(e.to_string().contains("4294967296"), "{e}");
        let e = RawTensor::new(Dtype::F32, vec![1 << 32, 1 << 32], vec![]).unwrap_err();
        assert!(matches!(e, QuantError::Overflow { .. }), "{e}");
        let e = RawTensor::new(Dtype::F32, vec![1 << 62], vec![]).unwrap_err();
        assert!(matches!(e, QuantError::Overflow { .. }), "{e}");
    }

    /// Issue 14 item 8: [`Checkpoint::read`] maps the file (tensor bytes are not copied) and equals the parsed copy;
    /// a missing file's error names the path.
    #[test]
    fn read_maps_the_file_and_names_the_path_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let c = ckpt(&sample(true));
        c.write(&p).unwrap();
        let back = Checkpoint::read(&p).unwrap();
        assert_eq!(back, c);
        assert!(back.tensors.values().all(|t| matches!(t.data, Bytes::Mapped { .. })));
        assert_eq!(back.to_bytes(), std::fs::read(&p).unwrap());
        let e = Checkpoint::read(dir.path().join("nope.safetensors")).unwrap_err();
        assert!(e.to_string().contains("nope.safetensors"), "{e}");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(Checkpoint::read(&p), Err(QuantError::Safetensors(_))));
    }

    #[test]
    fn python_float_repr_matches_cpython() {
        let cases: [(f64, &str); 12] = [
            (2.6189379692077637, "2.6189379692077637"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (2.0, "2.0"),
            (-0.5, "-0.5"),
            (123456789.123, "123456789.123"),
            (1.5e300, "1.5e+300"),
            (3.4028234663852886e38, "3.4028234663852886e+38"),
            (0.0, "0.0"),
            (-1.25e-7, "-1.25e-07"),
        ];
        for (v, s) in cases {
            assert_eq!(python_float_repr(v), s, "{v:e}");
        }
    }

    #[test]
    fn quant_state_json_is_python_json_dumps() {
        let q = sample(false);
        assert_eq!(
            quant_state_json(&q),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, 100]}"#
        );
        let q = sample(true);
        let Absmax::Double { offset, .. } = q.absmax() else { panic!() };
        let expected = format!(
            r#"{{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, 100], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {}}}"#,
            python_float_repr(f64::from(*offset))
        );
        assert_eq!(quant_state_json(&q), expected);
    }

    #[test]
    fn four_bit_state_round_trips_through_bytes_and_files() {
        for dq in [false, true] {
            let q = sample(dq);
            let c = ckpt(&q);
            let bytes = c.to_bytes();
            let back = Checkpoint::from_bytes(&bytes).unwrap();
            assert_eq!(back, c);
            assert_eq!(back.quant4("m.proj").unwrap(), q);
            assert_eq!(back.quant4_modules(), vec!["m.proj".to_string()]);
            let dir = std::env::temp_dir().join(format!("peft_quant_storage_{}_{dq}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("model.safetensors");
            std::fs::write(&path, b"old contents").unwrap();
            c.write(&path).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
            let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left, vec![std::ffi::OsString::from("model.safetensors")], "no temp file left behind");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn quant_storage_reinterprets_the_packed_bytes() {
        let q = sample(true).with_storage(QuantStorage::Float(FloatDtype::Bf16));
        let c = ckpt(&q);
        let w = c.get("m.proj.weight").unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::BF16, &[75usize, 1][..]));
        assert_eq!(Checkpoint::from_bytes(&c.to_bytes()).unwrap().quant4("m.proj").unwrap(), q);
        let odd = Quant4::quantize(&[1.0; 66], &[66], &Quant4Config::default()).unwrap();
        let mut c = Checkpoint::new();
        let r = c.insert_quant4("x", &odd.with_storage(QuantStorage::Float(FloatDtype::F32)));
        assert!(matches!(r, Err(QuantError::Size { .. })), "33 bytes do not make f32 elements");
    }

    #[test]
    fn int8_rows_round_trip_with_bnb_keys() {
        let x: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
        let q = Int8Rows::quantize(&x, 3, 4).unwrap();
        let mut c = Checkpoint::new();
        c.insert_int8("fc", &q).unwrap();
        assert_eq!(c.names(), vec!["fc.SCB", "fc.weight", "fc.weight_format"]);
        let back = Checkpoint::from_bytes(&c.to_bytes()).unwrap();
        assert_eq!(back.int8("fc").unwrap(), q);
        c.insert("fc.weight_format", RawTensor::new(Dtype::U8, vec![], vec![2]).unwrap());
        assert!(matches!(c.int8("fc"), Err(QuantError::BadQuantState { .. })));
        c.insert("fc.weight", RawTensor::new(Dtype::U8, vec![3, 4], vec![0; 12]).unwrap());
        assert!(matches!(c.int8("fc"), Err(QuantError::Dtype { .. })));
    }

    fn corrupt(f: impl FnOnce(&mut Checkpoint)) -> QuantError {
        let mut c = ckpt(&sample(true));
        f(&mut c);
        c.quant4("m.proj").unwrap_err()
    }

    fn set_json(c: &mut Checkpoint, json: &str) {
        let t = RawTensor::new(Dtype::U8, vec![json.len()], json.as_bytes().to_vec()).unwrap();
        c.insert("m.proj.weight.quant_state.bitsandbytes__nf4", t);
    }

    #[test]
    fn corrupt_checkpoints_give_typed_errors() {
        const QS: &str = "m.proj.weight.quant_state.bitsandbytes__nf4";
        let e = corrupt(|c| {
            c.remove(QS);
        });
        assert!(matches!(e, QuantError::MissingQuantState(ref k) if k == "m.proj.weight"), "{e}");
        let e = corrupt(|c| set_json(c, "{\"quant_type\": \"nf4\", "));
        assert!(matches!(e, QuantError::BadQuantState { .. }), "{e}");
        let e = corrupt(|c| c.insert(QS, RawTensor::new(Dtype::U8, vec![2], vec![0xff, 0xfe]).unwrap()));
        assert!(matches!(e, QuantError::BadQuantState { ref msg, .. } if msg.contains("UTF-8")), "{e}");
        let e = corrupt(|c| set_json(c, r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}"#));
        assert!(matches!(e, QuantError::BadQuantState { ref msg, .. } if msg.contains("shape")), "{e}");
        let e = corrupt(|c| {
            set_json(c, r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [3, 100]}"#)
        });
        assert!(matches!(e, QuantError::BadQuantState { .. }), "{e}");
        let e =
            corrupt(|c| set_json(c, r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [3, 100]}"#));
        assert!(matches!(e, QuantError::BadQuantState { .. }), "{e}");
        // A plain-absmax quant state over U8 (double quantized) scales.
        let e = corrupt(|c| {
            set_json(c, r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, 100]}"#)
        });
        assert!(matches!(e, QuantError::Dtype { .. }), "{e}");
        let e = corrupt(|c| {
            let j = String::from_utf8(c.get(QS).unwrap().data().to_vec()).unwrap();
            set_json(c, &j.replace("\"blocksize\": 64", "\"blocksize\": 48"));
        });
        assert!(matches!(e, QuantError::Blocksize(48)), "{e}");
        let e = corrupt(|c| {
            let j = String::from_utf8(c.get(QS).unwrap().data().to_vec()).unwrap();
            set_json(c, &j.replace("[3, 100]", "[3, 101]"));
        });
        assert!(matches!(e, QuantError::Size { .. }), "{e}");
        let e = corrupt(|c| c.insert("m.proj.weight", RawTensor::new(Dtype::U8, vec![149, 1], vec![0; 149]).unwrap()));
        assert!(matches!(e, QuantError::Size { .. }), "{e}");
        let e = corrupt(|c| c.insert("m.proj.weight.absmax", RawTensor::new(Dtype::U8, vec![4], vec![0; 4]).unwrap()));
        assert!(matches!(e, QuantError::Size { .. }), "{e}");
        let e =
            corrupt(|c| c.insert("m.proj.weight.nested_absmax", RawTensor::from_f32(vec![2], &[1.0, 1.0]).unwrap()));
        assert!(matches!(e, QuantError::Size { .. }), "{e}");
        let e =
            corrupt(|c| c.insert("m.proj.weight.nested_quant_map", RawTensor::from_f32(vec![3], &[0.0; 3]).unwrap()));
        assert!(matches!(e, QuantError::Size { .. }), "{e}");
        let e = corrupt(|c| {
            c.remove("m.proj.weight.nested_absmax");
        });
        assert!(matches!(e, QuantError::MissingTensor(ref k) if k == "m.proj.weight.nested_absmax"), "{e}");
        let e = corrupt(|c| {
            c.insert("m.proj.weight.quant_map", RawTensor::from_f32(vec![16], &crate::codes::FP4).unwrap())
        });
        assert!(matches!(e, QuantError::BadQuantState { .. }), "{e}");
        let e = corrupt(|c| {
            let t = c.get(QS).unwrap().clone();
            c.insert("m.proj.weight.quant_state.bitsandbytes__fp4", t);
        });
        assert!(matches!(e, QuantError::BadQuantState { ref msg, .. } if msg.contains("both")), "{e}");
    }

    #[test]
    fn malformed_safetensors_and_bad_tensor_sizes_are_rejected() {
        let bytes = ckpt(&sample(false)).to_bytes();
        assert!(matches!(Checkpoint::from_bytes(&bytes[..bytes.len() - 3]), Err(QuantError::Safetensors(_))));
        assert!(matches!(Checkpoint::from_bytes(b"\x05\0\0\0\0\0\0\0{}"), Err(QuantError::Safetensors(_))));
        assert!(matches!(RawTensor::new(Dtype::F32, vec![2], vec![0; 7]), Err(QuantError::Size { .. })));
        // the error names the file (issue 14 item 9)
        let e = Checkpoint::read("/nonexistent/peft-quant.safetensors").unwrap_err();
        assert!(matches!(e, QuantError::File(_)) && e.to_string().contains("/nonexistent/peft-quant.safetensors"));
        let t = RawTensor::new(Dtype::I32, vec![1], vec![0; 4]).unwrap();
        assert!(matches!(t.to_f32("t"), Err(QuantError::Dtype { .. })));
    }

    fn nf_sample(group_dtype: FloatDtype) -> NfPacked {
        let x: Vec<f32> = (0..7 * 45).map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0).collect();
        let cfg = NfQuant { bits: 3, scale_bits: 5, block: 32, group: 3, group_dtype };
        NfPacked::quantize(&x, &[7, 45], &cfg).unwrap()
    }

    #[test]
    fn nf_storage_round_trips_through_a_file_and_counts_its_bytes() {
        for dt in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16] {
            let q = nf_sample(dt);
            let mut c = Checkpoint::new();
            c.insert_nf("m.lin", &q).unwrap();
            assert!(c.has_nf("m.lin") && !c.has_nf("m.other"));
            assert_eq!(c.nf_modules(), ["m.lin"]);
            assert!(c.quant4_modules().is_empty(), "not listed as a bitsandbytes 4-bit weight");
            let back = Checkpoint::from_bytes(&c.to_bytes()).unwrap();
            let r = back.nf("m.lin").unwrap();
            assert_eq!(r, q, "{dt:?}");
            assert_eq!(r.dequantize(), q.dequantize());
            // The tensors hold exactly the storage bytes (the JSON state aside).
            let tensor_bytes: usize = ["m.lin.weight", "m.lin.weight.nf_scale_codes", "m.lin.weight.nf_group_max"]
                .iter()
                .map(|k| back.get(k).unwrap().data().len())
                .sum::<usize>()
                + 4;
            assert_eq!(tensor_bytes, q.storage_bytes(), "{dt:?}");
        }
    }

    #[test]
    fn corrupt_nf_entries_are_typed_errors() {
        let q = nf_sample(FloatDtype::Bf16);
        let good = {
            let mut c = Checkpoint::new();
            c.insert_nf("p", &q).unwrap();
            c
        };
        let state = |c: &Checkpoint| {
            String::from_utf8(c.get("p.weight.quant_state.peft_rs__nf").unwrap().data().to_vec()).unwrap()
        };
        let with_state = |text: &str| {
            let mut c = good.clone();
            let b = text.as_bytes().to_vec();
            c.insert("p.weight.quant_state.peft_rs__nf", RawTensor::new(Dtype::U8, vec![b.len()], b).unwrap());
            c
        };
        let s = state(&good);
        // One more row than the codes hold; a bit width out of range; not JSON; a wrong quant type.
        for (text, expect) in [
            (s.replace("[7, 45]", "[8, 45]"), "packed value codes"),
            (s.replace("\"bits\": 3", "\"bits\": 300"), "bit width"),
            (s.replace("\"bits\": 3", "\"bits\": 9"), "unsupported quantizer config"),
            ("{not json".to_string(), "not JSON"),
            (s.replace("\"nf\"", "\"nf4\""), "quant_type"),
            (s.replace("[7, 45]", "[4294967296, 4294967296, 4294967296]"), "more elements"),
        ] {
            let e = with_state(&text).nf("p").unwrap_err();
            assert!(e.to_string().contains(expect), "{text}: {e}");
        }
        let mut c = good.clone();
        c.remove("p.weight.nf_min");
        assert!(matches!(c.nf("p"), Err(QuantError::MissingTensor(_))));
        let mut c = good.clone();
        c.insert("p.weight.nf_group_max", RawTensor::from_f32(vec![q.group_max().len()], q.group_max()).unwrap());
        assert!(matches!(c.nf("p"), Err(QuantError::Dtype { .. })), "F32 group maxes for a bf16 config");
        let mut c = good.clone();
        let n = q.group_max().len();
        c.insert(
            "p.weight.nf_group_max",
            RawTensor::from_f32_as(FloatDtype::Bf16, vec![n], &vec![f32::NAN; n]).unwrap(),
        );
        assert!(matches!(c.nf("p"), Err(QuantError::NonFinite(_))));
        let mut c = good.clone();
        c.insert("p.weight.nf_scale_codes", RawTensor::new(Dtype::U8, vec![1], vec![0]).unwrap());
        assert!(matches!(c.nf("p"), Err(QuantError::Size { .. })));
    }
}
