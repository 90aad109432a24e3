//! `betadpo doctor`: what a run on an execution provider would find (ONNX Runtime, its providers, the NVIDIA
//! driver, GPUs, the provisioned CUDA / cuDNN / TensorRT libraries), and the one reason it could not work.

use std::process::{Command, Stdio};

use ort::ep::{ExecutionProvider as _, TensorRT, CPU, CUDA};

use super::{driver, gpu_libs, init, loaded_library, provision, ExecutionProvider, Flavor, Locator};

/// What was found, as labelled lines, and the reason the provider cannot work, if any.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<(String, String)>,
    pub problem: Option<String>,
}

impl Report {
    fn add(&mut self, label: &str, value: impl Into<String>) {
        self.lines.push((label.to_string(), value.into()));
    }

    fn fail(&mut self, ep: &ExecutionProvider, why: impl std::fmt::Display) {
        if self.problem.is_none() {
            self.problem = Some(format!("the {} execution provider cannot work here: {why}", ep.display_name()));
        }
    }
}

/// Examines this machine for `ep`. Loads (and, for a GPU provider with a usable driver, provisions) ONNX
/// Runtime like a run would, so call it before any other runtime use in the process.
pub fn examine(ep: &ExecutionProvider) -> Report {
    let mut report = Report::default();
    let driver = examine_driver(&mut report);
    let gpus = examine_gpus(&mut report);
    if ep.gpu_stack().is_some() {
        if let Err(why) = &driver {
            report.fail(ep, why);
        } else if gpus == Some(0) {
            report.fail(ep, "the NVIDIA driver is installed but nvidia-smi lists no GPU");
        }
    }
    if report.problem.is_some() {
        // Without a usable driver, loading would only download gigabytes to fail: show what is cached.
        report_cached_libraries(&mut report, ep);
        return report;
    }
    match init(ep) {
        Ok(_) => {
            if let Some(lib) = loaded_library() {
                report.add("ONNX Runtime", format!("{} ({})", lib.version, lib.path.display()));
            }
            report.add("providers", available_providers().join(", "));
            if let Err(e) = ep.check_available(&loaded_library().map(|l| l.path.display().to_string()).unwrap_or_default()) {
                report.fail(ep, e);
            }
        }
        Err(e) => report.fail(ep, e),
    }
    report_cached_libraries(&mut report, ep);
    report
}

fn examine_driver(report: &mut Report) -> Result<i32, String> {
    report.add("NVIDIA driver", driver::kernel_module_version().unwrap_or_else(|| "none (no /proc/driver/nvidia/version)".into()));
    let cuda = driver::cuda_driver_version();
    report.add(
        "driver CUDA version",
        match &cuda {
            Ok(v) => format!("up to {}", driver::format_cuda_version(*v)),
            Err(why) => why.clone(),
        },
    );
    cuda
}

/// Lists GPUs with nvidia-smi; returns their number, or None when nvidia-smi is absent or fails.
fn examine_gpus(report: &mut Report) -> Option<usize> {
    let out = Command::new("nvidia-smi").args(["--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader"]).stdin(Stdio::null()).output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let gpus: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            if gpus.is_empty() {
                report.add("GPUs", "no GPU found (nvidia-smi lists none)");
            }
            for g in &gpus {
                report.add("GPU", *g);
            }
            Some(gpus.len())
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()).next().unwrap_or("").trim().to_string();
            report.add("GPUs", format!("no GPU found (nvidia-smi failed: {err})"));
            None
        }
        Err(_) => {
            report.add("GPUs", "no GPU found (nvidia-smi is not installed)");
            None
        }
    }
}

fn available_providers() -> Vec<&'static str> {
    let mut names = Vec::new();
    for (name, available) in [("CPU", CPU::is_available()), ("CUDA", CUDA::is_available()), ("TensorRT", TensorRT::is_available())] {
        if available.unwrap_or(false) {
            names.push(name);
        }
    }
    names
}

/// The provisioned GPU build and NVIDIA libraries in the cache, with versions (their wheels').
fn report_cached_libraries(report: &mut Report, ep: &ExecutionProvider) {
    let Some(stack) = ep.gpu_stack() else { return };
    let Ok(locator) = Locator::from_env() else { return };
    if locator.dylib_override.is_some() {
        report.add("NVIDIA libraries", "not provisioned: ORT_DYLIB_PATH is set, so they come from the loader path");
        return;
    }
    let ort = locator.cached_library(Flavor::Gpu);
    let Ok(cuda_version) = provision::cuda_version_of(&ort) else {
        report.add("onnxruntime-gpu", format!("not provisioned yet (would go to {})", ort.parent().unwrap_or(&ort).display()));
        return;
    };
    report.add("onnxruntime-gpu", format!("{} built with CUDA {cuda_version} ({})", provision::GPU_ORT_VERSION, ort.display()));
    let sets = match gpu_libs::library_sets(&cuda_version, stack) {
        Ok(sets) => sets,
        Err(e) => return report.add("NVIDIA libraries", e.to_string()),
    };
    for set in sets {
        match gpu_libs::find(&locator.cache_dir, &set) {
            Some(found) => {
                for l in &found.libraries {
                    report.add(&l.file, format!("{} {} ({})", l.package, l.version, found.dir.display()));
                }
            }
            None => report.add(&set.what, format!("not provisioned yet (would go to {})", locator.cache_dir.join(&set.dir_name).display())),
        }
    }
}
