//! A tiny GGUF writer for tests: builds file images in memory with the layout the reader expects.

use super::{GgmlType, GgufValue};

/// One tensor to write; `offset` overrides the computed (aligned, sequential) data offset.
struct Entry {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

/// Builds a GGUF file image.
pub struct GgufBuilder {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, GgufValue)>,
    tensors: Vec<Entry>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufBuilder {
    /// An empty GGUF v3 file with 32-byte alignment.
    pub fn new() -> Self {
        GgufBuilder { version: 3, alignment: 32, kvs: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the version field.
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// Sets the layout alignment and writes `general.alignment`.
    pub fn alignment(mut self, a: u32) -> Self {
        self.alignment = a.into();
        self.kv("general.alignment", GgufValue::U32(a))
    }

    /// Adds a metadata key.
    pub fn kv(mut self, key: &str, value: GgufValue) -> Self {
        self.kvs.push((key.into(), value));
        self
    }

    /// Adds a tensor at the next aligned offset.
    pub fn tensor(self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensor_raw(name, dims, ty.id(), data, None)
    }

    /// Adds a tensor with an explicit data offset (for corrupt-file tests).
    pub fn tensor_raw(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>, offset: Option<u64>) -> Self {
        self.tensors.push(Entry { name: name.into(), dims: dims.to_vec(), type_id, data, offset });
        self
    }

    /// The file image.
    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            write_str(&mut out, k);
            out.extend(v.value_type().tag().to_le_bytes());
            write_value(&mut out, v);
        }
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for t in &self.tensors {
            let off = t.offset.unwrap_or(at);
            offsets.push(off);
            if t.offset.is_none() {
                at = (off + t.data.len() as u64).next_multiple_of(self.alignment);
            }
            write_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(off.to_le_bytes());
        }
        if !self.tensors.is_empty() {
            out.resize((out.len() as u64).next_multiple_of(self.alignment) as usize, 0);
        }
        let data_start = out.len();
        // Overridden offsets far past the end (corruption tests) get no data.
        for (t, off) in self.tensors.iter().zip(offsets).filter(|(_, off)| *off < 1 << 20) {
            let s = data_start + off as usize;
            if out.len() < s + t.data.len() {
                out.resize(s + t.data.len(), 0);
            }
            out[s..s + t.data.len()].copy_from_slice(&t.data);
        }
        out
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(b) => out.push(u8::from(*b)),
        GgufValue::String(s) => write_str(out, s),
        GgufValue::Array(t, vs) => {
            out.extend(t.tag().to_le_bytes());
            out.extend((vs.len() as u64).to_le_bytes());
            for v in vs {
                write_value(out, v);
            }
        }
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}
