//! ONNX protobuf types (generated from the official `onnx.proto3`), model I/O with external data,
//! and small constructors for tensors, attributes and nodes.

#[allow(clippy::all, missing_docs)]
pub mod proto;

mod adapter_file;
mod attr;
pub mod dtype;
mod io;
pub mod le;
mod shared_data;
mod tensor;

pub use adapter_file::{encode_adapter, read_adapter, AdapterParameter, AdapterView, ParameterView, ADAPTER_FORMAT_VERSION};
pub use attr::{attr, attr_f, attr_g, attr_i, attr_ints, attr_s, attr_t, AttrValue, NodeAttrs};
pub use dtype::DType;
pub use io::{external_data_path, load_model, load_model_mapped, producer_name, save_model, MappedData, SaveOptions, EXTERNAL_MIN_BYTES};
pub use proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto};
pub use shared_data::{is_cloned_weights_name, save_models_sharing_data, SharedData, SHARED_DATA_FILE};
pub use tensor::{checked_numel, tensor_f32, tensor_i64, tensor_to_f32, tensor_to_i64, value_info, value_info_type, zero_value, Dim};
