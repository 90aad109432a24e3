//! `.onnx_adapter` files written by betadpo, read back by ONNX Runtime itself (Python `onnxruntime`):
//! the parameters' names, shapes, dtypes and bytes, the versions, and an adapter that really feeds
//! a model's inputs when made active.

mod common;

use std::process::Command;

use betadpo::onnx::{encode_adapter, AdapterParameter};

#[test]
fn onnxruntime_reads_and_applies_the_adapter_file() {
    if !common::fixtures::python_imports("onnxruntime, onnx, numpy", "the adapter-file check") {
        return;
    }
    let dir = common::fixtures::scratch("onnx-adapter");
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let b: Vec<f32> = vec![2.0, -3.0, 0.25];
    // a half-precision tensor too: 1.0, -2.0, 0.5 as IEEE float16
    let h: Vec<u16> = vec![0x3C00, 0xC000, 0x3800];
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ra, rb, rh) = (bytes(&a), bytes(&b), h.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
    let params = [
        AdapterParameter { name: "layers.0.q_proj.lora_A", dims: &[2, 3], data_type: 1, raw: &ra },
        AdapterParameter { name: "lora_B", dims: &[3], data_type: 1, raw: &rb },
        AdapterParameter { name: "half", dims: &[3], data_type: 10, raw: &rh },
    ];
    let file = dir.join("a.onnx_adapter");
    std::fs::write(&file, encode_adapter(&params, 5, 9).unwrap()).unwrap();
    let script = r#"
import sys, json, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
path = sys.argv[1]
f = ort.AdapterFormat.read_adapter(path)
out = {"format": f.get_format_version(), "adapter": f.get_adapter_version(), "model": f.get_model_version(), "params": {}}
for name, v in f.get_parameters().items():
    a = v.numpy()
    out["params"][name] = {"shape": list(a.shape), "dtype": str(a.dtype), "values": [float(x) for x in a.ravel()]}
# y = x + lora_B, where lora_B is an input with a zero default the active adapter overrides
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
lb = helper.make_tensor_value_info("lora_B", TensorProto.FLOAT, [3])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
# every adapter parameter must name a model input: the other two are inputs the graph ignores
la = helper.make_tensor_value_info("layers.0.q_proj.lora_A", TensorProto.FLOAT, [2, 3])
hf = helper.make_tensor_value_info("half", TensorProto.FLOAT16, [3])
g = helper.make_graph([helper.make_node("Add", ["x", "lora_B"], ["y"])], "g", [x, lb, la, hf], [y],
                      initializer=[helper.make_tensor("lora_B", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0]),
                                   helper.make_tensor("layers.0.q_proj.lora_A", TensorProto.FLOAT, [2, 3], [0.0] * 6),
                                   helper.make_tensor("half", TensorProto.FLOAT16, [3], [0.0] * 3)])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
adapter = ort.LoraAdapter(); adapter.Load(path)
ro = ort.RunOptions(); ro.add_active_adapter(adapter)
out["applied"] = [float(v) for v in s.run(None, {"x": np.ones(3, np.float32)}, ro)[0]]
print(json.dumps(out))
"#;
    let out = Command::new("python3").args(["-c", script, file.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!((v["format"].as_i64(), v["adapter"].as_i64(), v["model"].as_i64()), (Some(1), Some(5), Some(9)));
    let p = &v["params"];
    assert_eq!(p.as_object().unwrap().len(), 3);
    let vals = |n: &str| p[n]["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    assert_eq!(p["layers.0.q_proj.lora_A"]["shape"], serde_json::json!([2, 3]));
    assert_eq!(vals("layers.0.q_proj.lora_A"), a);
    assert_eq!(vals("lora_B"), b);
    assert_eq!(p["half"]["dtype"], "float16");
    assert_eq!(vals("half"), vec![1.0, -2.0, 0.5]);
    let applied: Vec<f32> = v["applied"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(applied, vec![3.0, -2.0, 1.25], "the active adapter feeds lora_B");
}

#[test]
fn an_empty_adapter_is_still_a_valid_file() {
    if !common::fixtures::python_imports("onnxruntime, onnx, numpy", "the adapter-file check") {
        return;
    }
    let dir = common::fixtures::scratch("onnx-adapter-empty");
    let file = dir.join("e.onnx_adapter");
    std::fs::write(&file, encode_adapter(&[], 0, 0).unwrap()).unwrap();
    let script = "import sys, onnxruntime as ort; f = ort.AdapterFormat.read_adapter(sys.argv[1]); print(len(f.get_parameters()))";
    let out = Command::new("python3").args(["-c", script, file.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.trim_ascii(), b"0");
}
