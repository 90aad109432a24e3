//! ONNX Runtime's LoRA adapter file (`.onnx_adapter`, ORT >= 1.20), written and read through the
//! `flatbuffers` crate against the schema of `onnxruntime/lora/adapter_format/adapter_schema.fbs`
//! (file identifier `TORT`):
//!
//! ```text
//! table Adapter   { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
//! table Parameter { name:string; dims:[int64]; data_type:TensorDataType; raw_data:[uint8] (force_align: 8); }
//! ```
//!
//! `flatc` emits no code for `force_align` on a Rust vector, so the writer pads before `raw_data` itself:
//! ONNX Runtime hands those bytes to its kernels in place, without a copy. The view types below are what
//! `flatc --rust` generates for the two tables, cut to the fields betadpo reads.

use flatbuffers::{FlatBufferBuilder, Follow, ForwardsUOffset, InvalidFlatbuffer, Table, VOffsetT, Vector, Verifiable, Verifier, WIPOffset};

use crate::{Error, Result};

/// The only format version ONNX Runtime reads (`kAdapterFormatVersion`).
pub const ADAPTER_FORMAT_VERSION: i32 = 1;
const FILE_IDENTIFIER: &str = "TORT";

// Field slots: the n-th field of a table (from 0) sits at vtable offset 4 + 2n.
const VT_FORMAT_VERSION: VOffsetT = 4;
const VT_ADAPTER_VERSION: VOffsetT = 6;
const VT_MODEL_VERSION: VOffsetT = 8;
const VT_PARAMETERS: VOffsetT = 10;
const VT_NAME: VOffsetT = 4;
const VT_DIMS: VOffsetT = 6;
const VT_DATA_TYPE: VOffsetT = 8;
const VT_RAW_DATA: VOffsetT = 10;

/// One tensor of an adapter. `data_type` uses ONNX's `TensorProto.DataType` numbering, which the
/// adapter schema's `TensorDataType` repeats.
pub struct AdapterParameter<'a> {
    pub name: &'a str,
    pub dims: &'a [i64],
    pub data_type: i32,
    pub raw: &'a [u8],
}

/// The bytes of an adapter file holding `params`; refused when they would not fit one FlatBuffers buffer
/// (2 GiB), which is all ONNX Runtime reads.
pub fn encode_adapter(params: &[AdapterParameter], adapter_version: i32, model_version: i32) -> Result<Vec<u8>> {
    // each parameter's payload, plus a generous allowance for its vtable, table, offsets and padding
    let estimate: usize = params.iter().map(|p| p.raw.len() + 8 * p.dims.len() + p.name.len() + 64).sum::<usize>() + 64;
    if estimate >= flatbuffers::FLATBUFFERS_MAX_BUFFER_SIZE {
        return Err(Error::AdapterTooLarge { bytes: estimate, max: flatbuffers::FLATBUFFERS_MAX_BUFFER_SIZE });
    }
    let mut fbb = FlatBufferBuilder::with_capacity(estimate);
    let tables: Vec<_> = params.iter().map(|p| parameter(&mut fbb, p)).collect();
    let parameters = fbb.create_vector(&tables);
    let adapter = fbb.start_table();
    fbb.push_slot_always(VT_PARAMETERS, parameters);
    fbb.push_slot(VT_MODEL_VERSION, model_version, 0);
    fbb.push_slot(VT_ADAPTER_VERSION, adapter_version, 0);
    fbb.push_slot(VT_FORMAT_VERSION, ADAPTER_FORMAT_VERSION, 0);
    let adapter = fbb.end_table(adapter);
    fbb.finish(adapter, Some(FILE_IDENTIFIER));
    // the builder writes back to front: the finished buffer is the tail of its vector
    let (mut buf, head) = fbb.collapse();
    buf.drain(..head);
    Ok(buf)
}

fn parameter<'b>(fbb: &mut FlatBufferBuilder<'b>, p: &AdapterParameter) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    // `raw_data (force_align: 8)`: zero bytes after the data so that it starts 8 bytes from a boundary
    // counted from the buffer's end, which `finish` makes a multiple of 8 (the int64 dims ask for it)
    let pad = (8 - (fbb.unfinished_data().len() + p.raw.len()) % 8) % 8;
    for _ in 0..pad {
        fbb.push(0u8);
    }
    let raw = fbb.create_vector(p.raw);
    let dims = fbb.create_vector(p.dims);
    let name = fbb.create_string(p.name);
    let table = fbb.start_table();
    fbb.push_slot_always(VT_RAW_DATA, raw);
    fbb.push_slot_always(VT_DIMS, dims);
    fbb.push_slot_always(VT_NAME, name);
    fbb.push_slot(VT_DATA_TYPE, p.data_type, 0);
    fbb.end_table(table)
}

/// The root table of a verified adapter file (see [`read_adapter`]).
#[derive(Clone, Copy)]
pub struct AdapterView<'a> {
    table: Table<'a>,
}

/// One parameter of an [`AdapterView`].
#[derive(Clone, Copy)]
pub struct ParameterView<'a> {
    table: Table<'a>,
}

/// Checks `bytes` against the schema (identifier, offsets, bounds) and gives its root table.
pub fn read_adapter(bytes: &[u8]) -> std::result::Result<AdapterView<'_>, String> {
    if !flatbuffers::buffer_has_identifier(bytes, FILE_IDENTIFIER, false) {
        return Err(format!("no `{FILE_IDENTIFIER}` file identifier"));
    }
    flatbuffers::root::<AdapterView>(bytes).map_err(|e| e.to_string())
}

// SAFETY (every `get` below): `read_adapter` ran the verifier, which checked that each slot holds the type read.
impl<'a> AdapterView<'a> {
    pub fn format_version(&self) -> i32 {
        unsafe { self.table.get::<i32>(VT_FORMAT_VERSION, Some(0)) }.unwrap_or_default()
    }
    pub fn adapter_version(&self) -> i32 {
        unsafe { self.table.get::<i32>(VT_ADAPTER_VERSION, Some(0)) }.unwrap_or_default()
    }
    pub fn model_version(&self) -> i32 {
        unsafe { self.table.get::<i32>(VT_MODEL_VERSION, Some(0)) }.unwrap_or_default()
    }
    pub fn parameters(&self) -> Vec<ParameterView<'a>> {
        let v = unsafe { self.table.get::<ForwardsUOffset<Vector<'a, ForwardsUOffset<ParameterView<'a>>>>>(VT_PARAMETERS, None) };
        v.map(|v| v.iter().collect()).unwrap_or_default()
    }
}

impl<'a> ParameterView<'a> {
    pub fn name(&self) -> &'a str {
        unsafe { self.table.get::<ForwardsUOffset<&str>>(VT_NAME, None) }.unwrap_or_default()
    }
    pub fn dims(&self) -> Vec<i64> {
        unsafe { self.table.get::<ForwardsUOffset<Vector<'a, i64>>>(VT_DIMS, None) }.map(|v| v.iter().collect()).unwrap_or_default()
    }
    pub fn data_type(&self) -> i32 {
        unsafe { self.table.get::<i32>(VT_DATA_TYPE, Some(0)) }.unwrap_or_default()
    }
    pub fn raw_data(&self) -> &'a [u8] {
        unsafe { self.table.get::<ForwardsUOffset<Vector<'a, u8>>>(VT_RAW_DATA, None) }.map(|v| v.bytes()).unwrap_or_default()
    }
}

impl<'a> Follow<'a> for AdapterView<'a> {
    type Inner = Self;
    unsafe fn follow(buf: &'a [u8], loc: usize) -> Self {
        AdapterView { table: unsafe { Table::new(buf, loc) } }
    }
}

impl<'a> Follow<'a> for ParameterView<'a> {
    type Inner = Self;
    unsafe fn follow(buf: &'a [u8], loc: usize) -> Self {
        ParameterView { table: unsafe { Table::new(buf, loc) } }
    }
}

impl Verifiable for AdapterView<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> std::result::Result<(), InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<i32>("format_version", VT_FORMAT_VERSION, false)?
            .visit_field::<i32>("adapter_version", VT_ADAPTER_VERSION, false)?
            .visit_field::<i32>("model_version", VT_MODEL_VERSION, false)?
            .visit_field::<ForwardsUOffset<Vector<'_, ForwardsUOffset<ParameterView>>>>("parameters", VT_PARAMETERS, false)?
            .finish();
        Ok(())
    }
}

impl Verifiable for ParameterView<'_> {
    fn run_verifier(v: &mut Verifier, pos: usize) -> std::result::Result<(), InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<ForwardsUOffset<&str>>("name", VT_NAME, false)?
            .visit_field::<ForwardsUOffset<Vector<'_, i64>>>("dims", VT_DIMS, false)?
            .visit_field::<i32>("data_type", VT_DATA_TYPE, false)?
            .visit_field::<ForwardsUOffset<Vector<'_, u8>>>("raw_data", VT_RAW_DATA, false)?
            .finish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_through_the_verifier_with_raw_data_8_byte_aligned() {
        let a: Vec<u8> = [1.0f32, -2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = [3u8, 4, 5]; // an odd length moves what follows off any boundary
        let params =
            [AdapterParameter { name: "lora_A", dims: &[1, 2], data_type: 1, raw: &a }, AdapterParameter { name: "odd", dims: &[3], data_type: 2, raw: &b }];
        let bytes = encode_adapter(&params, 3, 7).unwrap();
        assert_eq!(&bytes[4..8], b"TORT");
        let view = read_adapter(&bytes).unwrap();
        assert_eq!((view.format_version(), view.adapter_version(), view.model_version()), (ADAPTER_FORMAT_VERSION, 3, 7));
        let read = view.parameters();
        assert_eq!(read.len(), 2);
        for (p, r) in params.iter().zip(&read) {
            assert_eq!((r.name(), r.dims(), r.data_type(), r.raw_data()), (p.name, p.dims.to_vec(), p.data_type, p.raw));
            let at = r.raw_data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(at % 8, 0, "{}: raw_data starts at {at}", p.name);
        }
    }

    #[test]
    fn a_buffer_of_another_kind_or_cut_short_is_refused() {
        let bytes = encode_adapter(&[AdapterParameter { name: "w", dims: &[2], data_type: 1, raw: &[0; 8] }], 0, 0).unwrap();
        assert!(read_adapter(&bytes[..bytes.len() - 9]).is_err());
        let mut other = bytes.clone();
        other[4..8].copy_from_slice(b"XXXX");
        let Err(why) = read_adapter(&other) else { panic!("a buffer without the TORT identifier was accepted") };
        assert!(why.contains("identifier"), "{why}");
    }
}
