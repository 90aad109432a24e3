//! ONNX Runtime's LoRA adapter file (`.onnx_adapter`, ORT >= 1.20): a FlatBuffers buffer with the
//! file identifier `TORT` and the schema of `onnxruntime/lora/adapter_format/adapter_schema.fbs`:
//!
//! ```text
//! table Adapter   { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
//! table Parameter { name:string; dims:[int64]; data_type:TensorDataType; raw_data:[uint8] (force_align: 8); }
//! ```
//!
//! The schema is four fields deep, so the buffer is laid out front to back by hand rather than
//! through a FlatBuffers builder: every table is preceded by its vtable, every offset points
//! forward, and the `int64` dims and the raw bytes start on 8-byte boundaries (ONNX Runtime hands
//! `raw_data` to its kernels in place, without a copy).

/// The only format version ONNX Runtime reads (`kAdapterFormatVersion`).
pub const ADAPTER_FORMAT_VERSION: i32 = 1;
const FILE_IDENTIFIER: &[u8; 4] = b"TORT";

/// One tensor of an adapter. `data_type` uses ONNX's `TensorProto.DataType` numbering, which the
/// adapter schema's `TensorDataType` repeats.
pub struct AdapterParameter<'a> {
    pub name: &'a str,
    pub dims: &'a [i64],
    pub data_type: i32,
    pub raw: &'a [u8],
}

/// The bytes of an adapter file holding `params`.
pub fn encode_adapter(params: &[AdapterParameter], adapter_version: i32, model_version: i32) -> Vec<u8> {
    let mut w = Writer::default();
    let root = w.slot();
    w.buf.extend_from_slice(FILE_IDENTIFIER);
    // Adapter: three ints and the parameter vector
    let table = w.table(4);
    w.i32(ADAPTER_FORMAT_VERSION);
    w.i32(adapter_version);
    w.i32(model_version);
    let vector = w.slot();
    w.patch(root, table);

    w.align(4, 0);
    w.patch(vector, w.buf.len());
    w.u32(params.len() as u32);
    let entries: Vec<usize> = params.iter().map(|_| w.slot()).collect();
    for (p, entry) in params.iter().zip(entries) {
        let table = w.table(4);
        w.patch(entry, table);
        let (name, dims) = (w.slot(), w.slot());
        w.i32(p.data_type);
        let raw = w.slot();

        w.align(4, 0);
        w.patch(name, w.buf.len());
        w.u32(p.name.len() as u32);
        w.buf.extend_from_slice(p.name.as_bytes());
        w.buf.push(0);

        w.align(8, 4);
        w.patch(dims, w.buf.len());
        w.u32(p.dims.len() as u32);
        for d in p.dims {
            w.buf.extend_from_slice(&d.to_le_bytes());
        }

        w.align(8, 4);
        w.patch(raw, w.buf.len());
        w.u32(p.raw.len() as u32);
        w.buf.extend_from_slice(p.raw);
    }
    w.buf
}

#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Pads with zeros until the length is `rem` past a multiple of `to`.
    fn align(&mut self, to: usize, rem: usize) {
        while self.buf.len() % to != rem {
            self.buf.push(0);
        }
    }
    /// A forward offset to be filled in by [`Writer::patch`] once its target is written.
    fn slot(&mut self) -> usize {
        let at = self.buf.len();
        self.u32(0);
        at
    }
    fn patch(&mut self, slot: usize, target: usize) {
        let off = (target - slot) as u32;
        self.buf[slot..slot + 4].copy_from_slice(&off.to_le_bytes());
    }
    /// Writes the vtable of a table whose `fields` are all 4 bytes wide and present, then the
    /// table's own offset back to it; returns where the table starts. The fields follow.
    fn table(&mut self, fields: u16) -> usize {
        self.align(4, 0);
        let vtable = self.buf.len();
        self.buf.extend_from_slice(&(4 + 2 * fields).to_le_bytes());
        self.buf.extend_from_slice(&(4 + 4 * fields).to_le_bytes());
        for i in 0..fields {
            self.buf.extend_from_slice(&(4 + 4 * i).to_le_bytes());
        }
        self.align(4, 0);
        let table = self.buf.len();
        self.i32((table - vtable) as i32);
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> usize {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
    }

    #[test]
    fn layout_follows_the_schema() {
        let raw: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = encode_adapter(&[AdapterParameter { name: "a", dims: &[1, 2], data_type: 1, raw: &raw }], 3, 7);
        assert_eq!(&b[4..8], b"TORT");
        let table = u32_at(&b, 0);
        let vtable = table - i32::from_le_bytes(b[table..table + 4].try_into().unwrap()) as usize;
        assert_eq!(u16::from_le_bytes([b[vtable], b[vtable + 1]]), 12);
        assert_eq!(i32::from_le_bytes(b[table + 4..table + 8].try_into().unwrap()), ADAPTER_FORMAT_VERSION);
        assert_eq!(i32::from_le_bytes(b[table + 8..table + 12].try_into().unwrap()), 3);
        let vector = table + 16 + u32_at(&b, table + 16);
        assert_eq!(u32_at(&b, vector), 1);
        let param = vector + 4 + u32_at(&b, vector + 4);
        let raw_at = param + 16 + u32_at(&b, param + 16);
        assert_eq!((raw_at + 4) % 8, 0, "raw_data is 8-byte aligned");
        assert_eq!(&b[raw_at + 4..raw_at + 12], &raw[..]);
    }
}
