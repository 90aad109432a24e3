//! The GPU checks that need neither a GPU nor wheels: the driver version parsing and the messages of its
//! checks on a machine without a driver, TensorRT's optimization profiles, `betadpo doctor`, and the
//! summary of what TensorRT left to the CUDA provider.

#[path = "common/cli.rs"]
mod cli;

use cli::doctor;

use betadpo::runtime::driver;

// ---------------------------------------------------------------------------------------------- the driver

#[test]
fn driver_version_parsing() {
    let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0\n";
    assert_eq!(driver::parse_proc_version(text).as_deref(), Some("550.54.15"));
    let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n";
    assert_eq!(driver::parse_proc_version(open).as_deref(), Some("580.65.06"));
    assert_eq!(driver::parse_proc_version("garbage"), None);
    assert_eq!(driver::format_cuda_version(12040), "12.4");
    assert_eq!(driver::format_cuda_version(13000), "13.0");
    // A driver for CUDA 12.4 runs CUDA 12 builds (minor version compatibility), not CUDA 13 ones.
    assert_eq!(driver::supports(12040, Some("550.54.15"), 12), Ok(()));
    assert_eq!(driver::supports(13000, None, 12), Ok(()));
    assert_eq!(
        driver::supports(12040, Some("550.54.15"), 13).unwrap_err(),
        "the NVIDIA driver 550.54.15 supports CUDA up to 12.4, but the ONNX Runtime GPU build needs CUDA 13; update the driver"
    );
}

/// On a machine without an NVIDIA driver the checks say so in one line; with one, they report a CUDA version.
#[test]
fn driver_check_says_what_is_missing() {
    match driver::cuda_driver_version() {
        Err(why) => {
            assert!(why.starts_with("no NVIDIA driver found (libcuda.so.1 cannot be loaded"), "{why}");
            assert!(!why.contains('\n'));
            assert_eq!(driver::check_supports(12).unwrap_err(), why);
        }
        Ok(v) => {
            assert!(v >= 1000, "{v}");
            let needed = (v / 1000 + 1) as u32;
            let err = driver::check_supports(needed).unwrap_err();
            assert!(err.contains(&format!("needs CUDA {needed}")) && err.contains("update the driver"), "{err}");
        }
    }
}

// ---------------------------------------------------------------------------------------------- TensorRT profiles

mod tensorrt_profiles {
    use betadpo::runtime::tensorrt::{batch_dim_ranges, profile, BatchShape, InputDim};

    fn input(name: &str, dims: &[&str]) -> (String, Vec<InputDim>) {
        let dims = dims.iter().map(|d| d.parse().map(InputDim::Fixed).unwrap_or_else(|_| InputDim::Named(d.to_string()))).collect();
        (name.to_string(), dims)
    }

    #[test]
    fn padded_batches() {
        let ranges = batch_dim_ranges(&BatchShape { pairs: 4, max_length: 128, pack_tokens: None });
        let inputs = [
            input("input_ids", &["rows", "sequence"]),
            input("weight", &["16", "8"]), // fixed: not part of a profile
            input("completion_mask", &["rows", "sequence"]),
            input("ref_logps", &["rows"]),
            input("selection_noise", &["pairs"]),
        ];
        let p = profile(&inputs, &ranges).unwrap();
        // The last micro-batch may hold a single pair (2 rows) of one token; a full one 4 pairs of 128 tokens.
        assert_eq!(p.min, "input_ids:2x1,completion_mask:2x1,ref_logps:2,selection_noise:1");
        assert_eq!(p.opt, "input_ids:8x128,completion_mask:8x128,ref_logps:8,selection_noise:4");
        assert_eq!(p.max, p.opt);
    }

    #[test]
    fn packed_batches() {
        let inputs = [
            input("input_ids", &["packed_rows", "packed_sequence"]),
            input("packed_attention_bias", &["packed_rows", "1", "packed_sequence", "packed_sequence"]),
            input("answer_index", &["answer_tokens", "2"]),
            input("head_weight", &["head_reads"]),
            input("ref_logps", &["rows"]),
        ];
        // 8 pairs of up to 256 tokens write up to 8 x 512 = 4096 tokens: typically 4 rows of 1024, at most
        // one row per pair.
        let p = profile(&inputs, &batch_dim_ranges(&BatchShape { pairs: 8, max_length: 256, pack_tokens: Some(1024) })).unwrap();
        assert_eq!(p.min, "input_ids:1x1,packed_attention_bias:1x1x1x1,answer_index:1x2,head_weight:1,ref_logps:2");
        assert_eq!(p.opt, "input_ids:4x1024,packed_attention_bias:4x1x1024x1024,answer_index:4096x2,head_weight:4096,ref_logps:16");
        assert_eq!(p.max, "input_ids:8x1024,packed_attention_bias:8x1x1024x1024,answer_index:4096x2,head_weight:4096,ref_logps:16");
        // A pair longer than a row gets a row of its own: 2 x 300 = 600 tokens > 512.
        let p = profile(&inputs[..1], &batch_dim_ranges(&BatchShape { pairs: 2, max_length: 300, pack_tokens: Some(512) })).unwrap();
        assert_eq!((p.min.as_str(), p.opt.as_str(), p.max.as_str()), ("input_ids:1x1", "input_ids:2x512", "input_ids:2x600"));
    }

    #[test]
    fn a_dimension_without_a_range_is_named() {
        let ranges = batch_dim_ranges(&BatchShape { pairs: 2, max_length: 8, pack_tokens: None });
        let err = profile(&[input("x", &["rows", "mystery"])], &ranges).unwrap_err().to_string();
        assert!(err.contains("'x'") && err.contains("'mystery'"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------- betadpo doctor

#[test]
fn doctor_on_the_cpu_reports_the_runtime_and_succeeds() {
    let (code, out, err) = doctor("cpu", &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let line = |label: &str| out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label} line:\n{out}")).to_string();
    assert!(line("ONNX Runtime").contains("1.32.0"), "{out}");
    assert!(line("providers").split_whitespace().any(|w| w.trim_end_matches(',') == "CPU"), "{out}");
    assert!(line("NVIDIA driver").len() > "NVIDIA driver".len());
    assert!(out.lines().any(|l| l.starts_with("GPU")), "no GPU line:\n{out}");
    assert!(out.trim_end().ends_with("the CPU execution provider can run here"), "{out}");
}

/// Without a driver, `doctor --ep cuda` says so in one line and downloads nothing.
#[test]
fn doctor_without_a_driver_names_it_and_downloads_nothing() {
    if driver::cuda_driver_version().is_ok() {
        return eprintln!("notice: this machine has an NVIDIA driver; the no-driver path is not exercised here");
    }
    let cache = tempfile::tempdir().unwrap();
    for (ep, name) in [("cuda", "CUDA"), ("tensorrt:0", "TensorRT")] {
        let (code, out, err) = doctor(ep, &[("BETADPO_CACHE_DIR", cache.path())]);
        assert_ne!(code, 0, "{out}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].starts_with(&format!("error: the {name} execution provider cannot work here: no NVIDIA driver found (libcuda.so.1")), "{err}");
        assert!(out.contains("no GPU found"), "{out}");
        assert!(out.contains("onnxruntime-gpu") && out.contains("not provisioned yet"), "{out}");
    }
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0, "doctor downloaded into the cache without a driver");
}

#[test]
fn fallback_summary_counts_what_tensorrt_left() {
    use betadpo::runtime::placement::{fallback_summary, Assigned};
    let nodes = |ops: &[&str]| ops.iter().enumerate().map(|(i, op)| (op.to_string(), format!("n{i}"))).collect::<Vec<_>>();
    let trt = Assigned { provider: "TensorrtExecutionProvider".into(), nodes: nodes(&["MatMul", "Add", "Softmax"]) };
    let cuda = Assigned { provider: "CUDAExecutionProvider".into(), nodes: nodes(&["ScatterND", "Gather", "Gather"]) };
    let cpu = Assigned { provider: "CPUExecutionProvider".into(), nodes: nodes(&["Shape"]) };
    assert_eq!(
        fallback_summary(&[trt.clone(), cuda, cpu], "TensorrtExecutionProvider").as_deref(),
        Some("TensorrtExecutionProvider runs 3 of 7 nodes; CUDAExecutionProvider runs 3: 2 Gather, 1 ScatterND; CPUExecutionProvider runs 1: 1 Shape")
    );
    assert_eq!(fallback_summary(&[trt], "TensorrtExecutionProvider"), None);
}
