//! Bounds-checked parsing of the GGUF header, metadata and tensor infos.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::{GgmlType, GgufTensorInfo, GgufValue, GgufValueType, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::io::error::{IoError, IoResult};

/// Everything the header says.
pub(super) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    pub data_offset: usize,
}

/// A cursor over the file image that turns every out-of-bounds read into [`IoError::Truncated`].
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &str, need: impl std::fmt::Display) -> IoError {
        IoError::Truncated {
            path: self.path.to_path_buf(),
            reason: format!("{what} at byte {} needs {need} bytes, {} left", self.pos, self.remaining()),
        }
    }

    fn corrupt(&self, reason: String) -> IoError {
        IoError::CorruptHeader { path: self.path.to_path_buf(), reason }
    }

    fn take(&mut self, n: usize, what: &str) -> IoResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> IoResult<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> IoResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> IoResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> IoResult<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.truncated(what, len));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.corrupt(format!("{what} is not UTF-8: {e}")))
    }

    fn value_type(&mut self, what: &str) -> IoResult<GgufValueType> {
        let tag = self.u32(what)?;
        GgufValueType::from_tag(tag).ok_or_else(|| self.corrupt(format!("{what}: unknown value type {tag}")))
    }

    fn value(&mut self, ty: GgufValueType, what: &str, depth: usize) -> IoResult<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            T::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T::U32 => GgufValue::U32(self.u32(what)?),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T::U64 => GgufValue::U64(self.u64(what)?),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T::Bool => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.corrupt(format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            T::String => GgufValue::String(self.string(what)?),
            T::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem = self.value_type(what)?;
                let len = self.u64(what)?;
                // Bound the length by what the remaining bytes can hold before allocating anything.
                let need = len.checked_mul(elem.min_size() as u64);
                if need.is_none_or(|n| n > self.remaining() as u64) {
                    let need = need.map_or(format!("{len} x {}", elem.min_size()), |n| n.to_string());
                    return Err(self.truncated(&format!("{what} (array of {len})"), need));
                }
                let mut values = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    values.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(elem, values)
            }
        })
    }
}

/// Parses and validates a whole GGUF file image.
pub(super) fn parse(buf: &[u8], path: &Path) -> IoResult<Header> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(r.corrupt(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(IoError::UnsupportedVersion { path: path.to_path_buf(), format: "GGUF", version });
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // Each kv needs at least 8 (key length) + 4 (type) + 1 bytes, each tensor info 8 + 4 + 4 + 8.
    if n_kv.saturating_mul(13) > r.remaining() as u64 {
        return Err(r.truncated(&format!("{n_kv} metadata entries"), n_kv.saturating_mul(13)));
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let what = format!("metadata `{key}`");
        let ty = r.value_type(&what)?;
        let value = r.value(ty, &what, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.corrupt(format!("duplicate metadata key `{key}`")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => return Err(r.corrupt(format!("general.alignment {v:?} is not a positive power of two"))),
        },
    };

    if n_tensors.saturating_mul(24) > r.remaining() as u64 {
        return Err(r.truncated(&format!("{n_tensors} tensor infos"), n_tensors.saturating_mul(24)));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let what = format!("tensor info `{name}`");
        let n_dims = r.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(r.corrupt(format!("{what}: {n_dims} dimensions, at most {MAX_DIMS} allowed")));
        }
        let dims = (0..n_dims).map(|_| r.u64(&what)).collect::<IoResult<Vec<u64>>>()?;
        let ggml_type = GgmlType::from_id(r.u32(&what)?);
        let offset = r.u64(&what)?;
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= isize::MAX as u64)
            .ok_or_else(|| r.corrupt(format!("{what}: element count of dims {dims:?} overflows")))?;
        let n_bytes = match ggml_type.block_layout() {
            None => None,
            Some((bs, ts)) => {
                let ne0 = dims.first().copied().unwrap_or(1);
                if ne0 % bs as u64 != 0 {
                    return Err(r.corrupt(format!(
                        "{what}: first dimension {ne0} is not a multiple of the {ggml_type} block size {bs}"
                    )));
                }
                Some(
                    (numel / bs as u64)
                        .checked_mul(ts as u64)
                        .filter(|&n| n <= isize::MAX as u64)
                        .ok_or_else(|| r.corrupt(format!("{what}: byte size overflows")))? as usize,
                )
            }
        };
        if offset % alignment != 0 {
            return Err(r.corrupt(format!("{what}: data offset {offset} is not a multiple of alignment {alignment}")));
        }
        if !names.insert(name.clone()) {
            return Err(r.corrupt(format!("duplicate tensor name `{name}`")));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset, n_bytes });
    }

    let data_offset = (r.pos as u64).next_multiple_of(alignment);
    if !tensors.is_empty() && data_offset > buf.len() as u64 {
        return Err(IoError::Truncated {
            path: path.to_path_buf(),
            reason: format!("data section starts at {data_offset}, beyond the {}-byte file", buf.len()),
        });
    }
    let data_offset = data_offset as usize;
    check_extents(&tensors, buf.len().saturating_sub(data_offset) as u64, path)?;
    Ok(Header { version, metadata, tensors, alignment, data_offset })
}

/// Every tensor must lie inside the data section, and no two may overlap.
fn check_extents(tensors: &[GgufTensorInfo], data_len: u64, path: &Path) -> IoResult<()> {
    let mismatch = |name: &str, reason: String| IoError::HeaderSizeMismatch {
        path: path.to_path_buf(),
        name: name.into(),
        reason,
    };
    let mut spans = Vec::with_capacity(tensors.len());
    for t in tensors {
        let len = t.n_bytes.unwrap_or(0) as u64;
        let end = t.offset.checked_add(len).filter(|&e| e <= data_len).ok_or_else(|| {
            mismatch(
                &t.name,
                format!("data [{}, {}+{len}) extends beyond the {data_len}-byte data section", t.offset, t.offset),
            )
        })?;
        spans.push((t.offset, end, t.name.as_str()));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((b0, e0, n0), (b1, _, n1)) = (w[0], w[1]);
        if b1 < e0 && b0 < e0 {
            return Err(mismatch(n1, format!("data at {b1} overlaps tensor `{n0}` ([{b0}, {e0}))")));
        }
    }
    Ok(())
}
