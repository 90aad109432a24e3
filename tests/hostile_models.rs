//! Crafted model files (issue 11, part 4): external data that points outside the model's
//! directory, offsets that do not parse or overflow, unknown dtypes, malformed nodes and absurd
//! dims. Each is refused by `build-graph` with one line naming the problem, a non-zero exit and no
//! output directory, and nothing outside the model's directory is read.

mod common;

use std::path::{Path, PathBuf};

use betadpo::onnx::attr_f;
use betadpo::onnx::proto::{self, tensor_proto::DataLocation, StringStringEntryProto};
use common::cli::{assert_absent, assert_one_line_error};

/// The tiny LM with its weights moved to `weights.bin` beside `model.onnx`, then edited by `edit`.
fn external_model(name: &str, edit: impl FnOnce(&Path, &mut proto::ModelProto)) -> (PathBuf, PathBuf) {
    // one level down, so that `..` is a scratch directory of this test
    let dir = common::fixtures::scratch(name).join("model");
    std::fs::create_dir(&dir).unwrap();
    let mut m = common::tiny_lm::model(&["Tanh"]);
    let mut data = Vec::new();
    for t in m.graph.as_mut().unwrap().initializer.iter_mut() {
        let bytes = std::mem::take(&mut t.raw_data);
        t.data_location = DataLocation::External as i32;
        t.external_data = vec![entry("location", "weights.bin"), entry("offset", &data.len().to_string()), entry("length", &bytes.len().to_string())];
        data.extend_from_slice(&bytes);
    }
    std::fs::write(dir.join("weights.bin"), &data).unwrap();
    edit(&dir, &mut m);
    let path = dir.join("model.onnx");
    common::tiny_lm::write(&path, &m);
    (path, dir.join("art"))
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: key.into(), value: value.into() }
}

/// Sets `key` of the first initializer's external data.
fn set_external(m: &mut proto::ModelProto, key: &str, value: &str) {
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    t.external_data.retain(|kv| kv.key != key);
    t.external_data.push(entry(key, value));
}

/// `build-graph` fails with one line containing every needle, and writes nothing.
fn refused(model: &Path, out: &Path, needles: &[&str]) {
    let err = assert_one_line_error(&["build-graph", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()], needles[0]);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in {err}");
    }
    assert_absent(out);
}

#[test]
fn the_external_model_itself_builds() {
    // the crafted models below differ from this one in one field each
    let (model, out) = external_model("ext-ok", |_, _| {});
    let (code, _, err) = common::cli::betadpo(&["build-graph", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "-q"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("manifest.json").exists());
}

#[test]
fn external_data_at_an_absolute_path() {
    let (model, out) = external_model("ext-abs", |_, m| set_external(m, "location", "/etc/passwd"));
    refused(&model, &out, &["\"/etc/passwd\"", "must be a relative path inside the model's directory", "emb.weight"]);
}

#[test]
fn external_data_in_the_parent_directory() {
    let (model, out) = external_model("ext-parent", |dir, m| {
        // the file exists and is large enough: only the location is wrong
        std::fs::write(dir.parent().unwrap().join("x"), vec![0u8; 4096]).unwrap();
        set_external(m, "location", "../x");
    });
    refused(&model, &out, &["\"../x\"", "without `..`"]);
    let (model, out) = external_model("ext-inner-parent", |_, m| set_external(m, "location", "sub/../../x"));
    refused(&model, &out, &["\"sub/../../x\"", "without `..`"]);
}

#[test]
fn external_data_through_a_symlink_out_of_the_directory() {
    let outside = common::fixtures::scratch("ext-outside").join("secret.bin");
    std::fs::write(&outside, vec![0u8; 4096]).unwrap();
    let (model, out) = external_model("ext-symlink", |dir, m| {
        std::os::unix::fs::symlink(&outside, dir.join("link.bin")).unwrap();
        set_external(m, "location", "link.bin");
    });
    refused(&model, &out, &["\"link.bin\"", "outside the model's directory"]);
    // a symlink to a directory above, then down again: also outside
    let (model, out) = external_model("ext-symlink-dir", |dir, m| {
        std::os::unix::fs::symlink(outside.parent().unwrap(), dir.join("up")).unwrap();
        set_external(m, "location", "up/secret.bin");
    });
    refused(&model, &out, &["\"up/secret.bin\"", "outside the model's directory"]);
}

#[test]
fn external_data_that_is_not_a_regular_file() {
    // a FIFO would block the reader forever; a directory cannot be mapped
    let (model, out) = external_model("ext-fifo", |dir, m| {
        let fifo = std::ffi::CString::new(dir.join("pipe").to_str().unwrap()).unwrap();
        // SAFETY: a plain libc call on a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        set_external(m, "location", "pipe");
    });
    refused(&model, &out, &["\"pipe\"", "is not a regular file"]);
    let (model, out) = external_model("ext-dir", |dir, m| {
        std::fs::create_dir(dir.join("sub")).unwrap();
        set_external(m, "location", "sub");
    });
    refused(&model, &out, &["\"sub\"", "is not a regular file"]);
}

#[test]
fn external_data_offsets_that_do_not_parse() {
    let (model, out) = external_model("ext-offset-abc", |_, m| set_external(m, "offset", "abc"));
    refused(&model, &out, &["offset \"abc\" is not a byte count", "emb.weight"]);
    let (model, out) = external_model("ext-offset-neg", |_, m| set_external(m, "offset", "-8"));
    refused(&model, &out, &["offset \"-8\" is not a byte count"]);
    let (model, out) = external_model("ext-length-abc", |_, m| set_external(m, "length", "12x"));
    refused(&model, &out, &["length \"12x\" is not a byte count"]);
}

#[test]
fn external_data_offset_plus_length_overflows() {
    let (model, out) = external_model("ext-overflow", |_, m| {
        set_external(m, "offset", &u64::MAX.to_string());
        set_external(m, "length", "512");
    });
    refused(&model, &out, &["offset 18446744073709551615, length 512", "runs past the end"]);
    let (model, out) = external_model("ext-long", |_, m| set_external(m, "length", &(u64::MAX - 3).to_string()));
    refused(&model, &out, &["runs past the end"]);
}

#[test]
fn external_data_length_that_disagrees_with_the_dims() {
    let (model, out) = external_model("ext-short", |_, m| set_external(m, "length", "8"));
    refused(&model, &out, &["\"emb.weight\" has 8 bytes of data where dtype 1 and dims [16, 8] need 512"]);
}

#[test]
fn unknown_dtype() {
    let (model, out) = external_model("dtype", |_, m| m.graph.as_mut().unwrap().initializer[1].data_type = 99);
    refused(&model, &out, &["\"lm_head.weight\" has unknown or non-numeric dtype 99"]);
    // inline data too
    let dir = common::fixtures::scratch("dtype-inline");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    m.graph.as_mut().unwrap().initializer[0].data_type = 0;
    common::tiny_lm::write(&dir.join("model.onnx"), &m);
    refused(&dir.join("model.onnx"), &dir.join("art"), &["\"emb.weight\" has unknown or non-numeric dtype 0"]);
}

#[test]
fn absurd_and_negative_dims() {
    let (model, out) = external_model("dims-huge", |_, m| m.graph.as_mut().unwrap().initializer[0].dims = vec![1 << 40, 1 << 40]);
    refused(&model, &out, &["\"emb.weight\"", "dimensions [1099511627776, 1099511627776] exceed"]);
    let (model, out) = external_model("dims-neg", |_, m| m.graph.as_mut().unwrap().initializer[0].dims = vec![-16, -8]);
    refused(&model, &out, &["\"emb.weight\"", "negative dimension in [-16, -8]"]);
    // a zero after the overflow does not rescue the product
    let dir = common::fixtures::scratch("dims-zero");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    m.graph.as_mut().unwrap().initializer[0].dims = vec![i64::MAX, i64::MAX, 0];
    m.graph.as_mut().unwrap().initializer[0].raw_data = Default::default();
    common::tiny_lm::write(&dir.join("model.onnx"), &m);
    refused(&dir.join("model.onnx"), &dir.join("art"), &["exceed"]);
}

#[test]
fn matmul_with_one_input() {
    let dir = common::fixtures::scratch("matmul-one");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    m.graph.as_mut().unwrap().node.last_mut().unwrap().input.truncate(1);
    common::tiny_lm::write(&dir.join("model.onnx"), &m);
    refused(&dir.join("model.onnx"), &dir.join("art"), &["building node lm_head (MatMul): it has 1 input(s); MatMul takes 2"]);
}

#[test]
fn other_malformed_nodes() {
    let dir = common::fixtures::scratch("nodes");
    let model = dir.join("model.onnx");
    let out = dir.join("art");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    m.graph.as_mut().unwrap().node[1].output.clear();
    common::tiny_lm::write(&model, &m);
    refused(&model, &out, &["building node act0 (Tanh): it has no output"]);

    let mut m = common::tiny_lm::model(&["Tanh"]);
    m.graph.as_mut().unwrap().node[1].input.push("h0".into());
    common::tiny_lm::write(&model, &m);
    refused(&model, &out, &["building node act0 (Tanh): it has 2 input(s); Tanh takes 1"]);

    // an attribute of the wrong type: transB as a float
    let mut m = common::tiny_lm::model(&["Tanh"]);
    let head = m.graph.as_mut().unwrap().node.last_mut().unwrap();
    head.op_type = "Gemm".into();
    head.attribute.push(attr_f("transB", 1.0));
    common::tiny_lm::write(&model, &m);
    refused(&model, &out, &["building node lm_head (Gemm): attribute transB has type FLOAT, the spec says INT"]);
}

#[test]
fn inline_data_that_disagrees_with_the_dims() {
    let dir = common::fixtures::scratch("inline-short");
    let mut m = common::tiny_lm::model(&["Tanh"]);
    let t = &mut m.graph.as_mut().unwrap().initializer[1];
    t.raw_data = t.raw_data.slice(..100);
    common::tiny_lm::write(&dir.join("model.onnx"), &m);
    refused(&dir.join("model.onnx"), &dir.join("art"), &["\"lm_head.weight\" has 100 bytes of data where dtype 1 and dims [8, 16] need 512"]);
    let mut m = common::tiny_lm::model(&["Tanh"]);
    let t = &mut m.graph.as_mut().unwrap().initializer[1];
    t.raw_data = Default::default();
    t.float_data = vec![0.5; 7];
    common::tiny_lm::write(&dir.join("model.onnx"), &m);
    refused(&dir.join("model.onnx"), &dir.join("art"), &["\"lm_head.weight\" holds 7 values for dims [8, 16]"]);
}
