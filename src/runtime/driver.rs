//! The NVIDIA driver, as far as betadpo needs it: is one installed, and which CUDA version can it run. Asked
//! before the GPU libraries are provisioned, so a machine without a usable driver fails in a second with a
//! one-line reason instead of after gigabytes of downloads.

use std::ffi::c_int;
use std::path::Path;

use super::dl::{Library, Scope};

/// The driver's user-space library; it comes with the driver, never with a wheel.
pub const LIBCUDA: &str = "libcuda.so.1";
const PROC_VERSION: &str = "/proc/driver/nvidia/version";

/// The kernel module's version (e.g. `550.54.15`) from `/proc/driver/nvidia/version`, if a driver is loaded.
pub fn kernel_module_version() -> Option<String> {
    parse_proc_version(&std::fs::read_to_string(PROC_VERSION).ok()?)
}

/// Reads `NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ...`.
pub fn parse_proc_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    let after = line.split("Kernel Module").nth(1).unwrap_or(line);
    after.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.')).map(str::to_string)
}

/// The newest CUDA version the installed driver supports, as `cuDriverGetVersion` reports it (`12040` for
/// 12.4), or why it cannot be asked.
pub fn cuda_driver_version() -> Result<i32, String> {
    let lib = Library::open(Path::new(LIBCUDA), Scope::Local).map_err(|e| format!("no NVIDIA driver found ({LIBCUDA} cannot be loaded: {e})"))?;
    let symbol = lib.symbol(c"cuDriverGetVersion").ok_or_else(|| format!("{LIBCUDA} does not export cuDriverGetVersion"))?;
    // SAFETY: `CUresult cuDriverGetVersion(int*)` in every CUDA driver API since 2.2; needs no cuInit.
    let get: unsafe extern "C" fn(*mut c_int) -> c_int = unsafe { std::mem::transmute(symbol) };
    let mut version: c_int = 0;
    match unsafe { get(&mut version) } {
        0 => Ok(version),
        code => Err(format!("cuDriverGetVersion failed with CUDA error {code}")),
    }
}

/// `12040` -> `12.4`.
pub fn format_cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Fails with a one-line reason unless a driver is installed that runs CUDA `needed_major`.
pub fn check_supports(needed_major: u32) -> Result<i32, String> {
    let v = cuda_driver_version()?;
    supports(v, kernel_module_version().as_deref(), needed_major).map(|()| v)
}

/// Whether a driver reporting CUDA `driver_cuda` (`cuDriverGetVersion`'s number) runs CUDA `needed_major`;
/// `module` is its version for the message.
pub fn supports(driver_cuda: i32, module: Option<&str>, needed_major: u32) -> Result<(), String> {
    if driver_cuda / 1000 >= needed_major as i32 {
        return Ok(());
    }
    let module = module.map(|m| format!(" {m}")).unwrap_or_default();
    Err(format!(
        "the NVIDIA driver{module} supports CUDA up to {}, but the ONNX Runtime GPU build needs CUDA {needed_major}; update the driver",
        format_cuda_version(driver_cuda)
    ))
}
