//! Preference rows from Arrow data: Parquet files and the Arrow IPC stream files that `datasets`'
//! `save_to_disk` writes, each row turned into the JSON object the JSONL reader would have parsed,
//! so that row parsing and everything after it is shared.
//!
//! Nested columns map as JSON does: a list to an array, a struct to an object. A struct field that
//! is null is left out, as it would be absent from the JSONL row the data came from (Arrow gives
//! every message every field of the column's type, e.g. `tool_calls: null` on plain messages).

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch, RecordBatchReader};
use arrow_schema::{ArrowError, DataType};
use serde_json::{Map, Number, Value};

use super::rows::RowSink;
use crate::{Error, Result};

/// Which Arrow container a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrowFile {
    Parquet,
    /// The Arrow IPC stream format (`datasets`' `data-00000-of-00001.arrow`).
    IpcStream,
    /// The Arrow IPC file format (`ARROW1`; what pyarrow's `ipc.new_file` writes).
    IpcFile,
}

/// Calls `visit(location, row)` for every row of `path`, in order; the location is `file: row N`
/// (0-based, as `datasets` and pandas number rows).
pub fn visit_arrow_rows(path: &Path, kind: ArrowFile, visit: &mut RowSink) -> Result<()> {
    let file = crate::fs_guard::open_regular(path)?;
    let bad = |e: &dyn std::fmt::Display| Error::Data(format!("{}: not a readable {} file ({e})", path.display(), kind.name()));
    let reader: Box<dyn RecordBatchReader> = match kind {
        ArrowFile::Parquet => {
            Box::new(parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()).map_err(|e| bad(&e))?)
        }
        ArrowFile::IpcStream => Box::new(arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None).map_err(|e| bad(&e))?),
        ArrowFile::IpcFile => Box::new(arrow_ipc::reader::FileReader::try_new(file, None).map_err(|e| bad(&e))?),
    };
    let name = path.display().to_string();
    let mut row = 0usize;
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e: ArrowError| bad(&e))?;
        for i in 0..batch.num_rows() {
            visit(format!("{name}: row {row}"), row_object(&batch, i))?;
            row += 1;
        }
    }
    Ok(())
}

impl ArrowFile {
    fn name(self) -> &'static str {
        match self {
            ArrowFile::Parquet => "Parquet",
            ArrowFile::IpcStream => "Arrow stream",
            ArrowFile::IpcFile => "Arrow",
        }
    }
}

fn row_object(batch: &RecordBatch, row: usize) -> std::result::Result<Value, String> {
    let mut obj = Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let v = json_at(column.as_ref(), row).map_err(|e| format!("column \"{}\": {e}", field.name()))?;
        obj.insert(field.name().clone(), v);
    }
    Ok(Value::Object(obj))
}

/// The JSON value of `array[row]`.
fn json_at(array: &dyn Array, row: usize) -> std::result::Result<Value, String> {
    if array.is_null(row) {
        return Ok(Value::Null);
    }
    let float = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).into(),
        DataType::Float16 => float(array.as_primitive::<Float16Type>().value(row).to_f64()),
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(row)),
        DataType::List(_) => list(array.as_list::<i32>().value(row).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(row).as_ref())?,
        DataType::FixedSizeList(_, _) => list(array.as_fixed_size_list().value(row).as_ref())?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut obj = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                match json_at(column.as_ref(), row)? {
                    Value::Null => {}
                    v => {
                        obj.insert(field.name().clone(), v);
                    }
                }
            }
            Value::Object(obj)
        }
        DataType::Dictionary(_, _) => {
            let d = array.as_any_dictionary();
            let key = d.normalized_keys()[row];
            json_at(d.values().as_ref(), key)?
        }
        other => return Err(format!("values of type {other} are not read (strings, numbers, booleans, lists and structs are)")),
    })
}

fn list(items: &dyn Array) -> std::result::Result<Value, String> {
    (0..items.len()).map(|i| json_at(items, i)).collect::<std::result::Result<Vec<_>, _>>().map(Value::Array)
}
