//! Setting up the GPU path without a GPU: provisioning the onnxruntime-gpu build and NVIDIA's runtime libraries
//! from a fake wheel index (small zip files laid out like the real wheels, served to the real `pip download`
//! with `--no-index --find-links`) and preloading real tiny shared libraries in dependency order
//! (tests/gpu_driver.rs has the driver checks, TensorRT profiles and `betadpo doctor`).

#[path = "common/cli.rs"]
mod cli;
#[path = "common/fixtures.rs"]
mod fixtures;

use cli::doctor;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use betadpo::runtime::gpu_libs::{self, GpuStack, LibrarySet, MANIFEST};
use betadpo::runtime::wheel::WheelSource;
use betadpo::runtime::{provision, provision_gpu_libraries, Flavor, Locator};

// ---------------------------------------------------------------------------------------------- fake wheels

/// Writes `<dist>-<version>-py3-none-any.whl` into `index` with `files` (member path, contents) and the
/// dist-info pip reads.
fn fake_wheel(index: &Path, dist: &str, version: &str, files: &[(&str, Vec<u8>)]) {
    let stem = format!("{}-{version}", dist.replace('-', "_"));
    let file = std::fs::File::create(index.join(format!("{stem}-py3-none-any.whl"))).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default();
    for (name, bytes) in files {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file(format!("{stem}.dist-info/METADATA"), opts).unwrap();
    write!(zip, "Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n").unwrap();
    zip.start_file(format!("{stem}.dist-info/WHEEL"), opts).unwrap();
    write!(zip, "Wheel-Version: 1.0\nGenerator: betadpo-tests\nRoot-Is-Purelib: false\nTag: py3-none-any\n").unwrap();
    zip.finish().unwrap();
}

/// Distinct bytes per file, so a test can tell which wheel member landed where.
fn body(name: &str) -> Vec<u8> {
    format!("fake {name}").into_bytes()
}

/// The onnxruntime-gpu wheel: the four libraries and the build info that names its CUDA version.
fn fake_ort_gpu(index: &Path, cuda_version: &str) {
    let mut files: Vec<(&str, Vec<u8>)> =
        ["libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so", Flavor::Gpu.lib_name()]
            .iter()
            .map(|n| (Box::leak(format!("onnxruntime/capi/{n}").into_boxed_str()) as &str, body(n)))
            .collect();
    files.push((
        "onnxruntime/capi/build_and_package_info.py",
        format!("package_name = 'onnxruntime-gpu'\n__version__ = '1.31.1'\ncuda_version = '{cuda_version}'\n").into_bytes(),
    ));
    files.push(("onnxruntime/__init__.py", b"".to_vec()));
    fake_wheel(index, "onnxruntime-gpu", provision::GPU_ORT_VERSION, &files);
}

/// CUDA 12 per-component wheels (`nvidia/<component>/lib/`), with the extra files real wheels carry: a header
/// and a Python `__init__.py` (not to be extracted) and cuDNN's lazily opened sub-libraries (to be extracted).
/// `libs` overrides a library's bytes (real ELF files for the preload tests); `skip` leaves members or whole
/// packages out.
fn fake_cuda12_index(index: &Path, libs: &dyn Fn(&str) -> Vec<u8>, skip: &[&str]) {
    let wheels: [(&str, &str, &str, &[&str]); 6] = [
        ("nvidia-cublas-cu12", "12.8.4.1", "cublas", &["libcublasLt.so.12", "libcublas.so.12", "libnvblas.so.12"]),
        ("nvidia-cuda-nvrtc-cu12", "12.8.93", "cuda_nvrtc", &["libnvrtc.so.12", "libnvrtc-builtins.so.12.8"]),
        ("nvidia-curand-cu12", "10.3.9.90", "curand", &["libcurand.so.10"]),
        ("nvidia-cufft-cu12", "11.3.3.83", "cufft", &["libcufft.so.11", "libcufftw.so.11"]),
        ("nvidia-cuda-runtime-cu12", "12.8.90", "cuda_runtime", &["libcudart.so.12"]),
        ("nvidia-cudnn-cu12", "9.10.2.21", "cudnn", &["libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9"]),
    ];
    for (dist, version, component, names) in wheels {
        if skip.contains(&dist) {
            continue;
        }
        let mut files: Vec<(String, Vec<u8>)> = names.iter().filter(|n| !skip.contains(n)).map(|n| (format!("nvidia/{component}/lib/{n}"), libs(n))).collect();
        files.push((format!("nvidia/{component}/include/{component}.h"), b"/* header */".to_vec()));
        files.push((format!("nvidia/{component}/__init__.py"), Vec::new()));
        let borrowed: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        fake_wheel(index, dist, version, &borrowed);
    }
}

fn fake_tensorrt12(index: &Path) {
    let files: Vec<(&str, Vec<u8>)> = ["libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10", "libnvinfer_builder_resource.so.10.13.3"]
        .iter()
        .map(|n| (Box::leak(format!("tensorrt_libs/{n}").into_boxed_str()) as &str, body(n)))
        .chain([("tensorrt_libs/__init__.py", Vec::new())])
        .collect();
    fake_wheel(index, "tensorrt-cu12-libs", "10.13.3.9", &files);
}

/// Whether the real `python3 -m pip` can run here (CI always has it).
fn have_pip() -> bool {
    let ok = Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        fixtures::skip("python3 -m pip is not available (pip downloads the wheels)");
    }
    ok
}

fn index_source(index: &Path) -> WheelSource {
    WheelSource { find_links: Some(index.to_path_buf()) }
}

fn cuda12() -> Vec<LibrarySet> {
    gpu_libs::library_sets("12.8", GpuStack::Cuda).unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".betadpo-tmp-") || n.starts_with(".wheel-"))
        .collect()
}

// ---------------------------------------------------------------------------------------------- what is provisioned

/// The library names and their order are those of onnxruntime's own `preload_dlls()` (asked from the installed
/// Python package, for CUDA 12 and for CUDA 13), with cuDNN last.
#[test]
fn library_order_matches_onnxruntime_preload_dlls() {
    if !fixtures::python_imports("onnxruntime", "asking onnxruntime.preload_dlls for its library order") {
        return;
    }
    for cuda in ["12.8", "13.0"] {
        let script = format!("import onnxruntime as o\no.cuda_version = '{cuda}'\nprint(' '.join(p[-1] for p in o._get_nvidia_dll_paths(False, True, True)))");
        let out = Command::new("python3").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let expected: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
        let sets = gpu_libs::library_sets(cuda, GpuStack::Cuda).unwrap();
        assert_eq!(sets.len(), 1);
        let ours: Vec<String> = sets[0].libraries.iter().map(|l| l.file.clone()).collect();
        assert_eq!(ours, expected, "CUDA {cuda}");
    }
}

#[test]
fn packages_and_specs_follow_the_cuda_major() {
    let packages = |cuda: &str, stack| -> Vec<String> {
        gpu_libs::library_sets(cuda, stack)
            .unwrap()
            .iter()
            .flat_map(|s| s.packages().into_iter().map(|(_, spec)| spec.to_string()).collect::<Vec<_>>())
            .collect()
    };
    assert_eq!(
        packages("12.8", GpuStack::TensorRt),
        [
            "nvidia-cublas-cu12",
            "nvidia-cuda-nvrtc-cu12",
            "nvidia-curand-cu12",
            "nvidia-cufft-cu12",
            "nvidia-cuda-runtime-cu12",
            "nvidia-cudnn-cu12>=9,<10",
            "tensorrt-cu12-libs>=10,<11"
        ]
    );
    // onnxruntime-gpu 1.31's own `cuda` extra asks for nvidia-cuda-runtime~=13.0, nvidia-cufft~=12.0,
    // nvidia-curand~=10.0, nvidia-cuda-nvrtc~=13.0 and its `cudnn` extra for nvidia-cudnn-cu13~=9.0.
    assert_eq!(
        packages("13.0", GpuStack::Cuda),
        [
            "nvidia-cublas>=13,<14",
            "nvidia-cuda-nvrtc>=13,<14",
            "nvidia-curand>=10,<11",
            "nvidia-cufft>=12,<13",
            "nvidia-cuda-runtime>=13,<14",
            "nvidia-cudnn-cu13>=9,<10"
        ]
    );
    let err = gpu_libs::library_sets("11.8", GpuStack::Cuda).unwrap_err().to_string();
    assert!(err.contains("CUDA 11.8") && err.contains("12 and newer"), "{err}");
}

/// NCCL for several ranks on GPUs: the wheel of the GPU build's CUDA major (PyPI has
/// nvidia-nccl-cu12 and -cu13 2.19 ... 2.32.3; 2.32.3's carries nvidia/nccl/lib/libnccl.so.2).
#[test]
fn nccl_follows_the_cuda_major() {
    for (cuda, package) in [("12.8", "nvidia-nccl-cu12"), ("13.0", "nvidia-nccl-cu13")] {
        let set = gpu_libs::nccl_set(cuda).unwrap();
        assert_eq!(set.packages(), [(package, format!("{package}>=2.19,<3").as_str())], "CUDA {cuda}");
        assert_eq!(set.libraries.iter().map(|l| (l.file.as_str(), l.required)).collect::<Vec<_>>(), [("libnccl.so.2", true)]);
    }
    assert!(gpu_libs::nccl_set("twelve").is_err());
}

// ---------------------------------------------------------------------------------------------- provisioning

/// The whole `--ep tensorrt` chain from an empty cache: the onnxruntime-gpu build (its CUDA version recorded),
/// then the CUDA 12 / cuDNN 9 set and the TensorRT set, each library the very bytes of its wheel member.
#[test]
fn provisions_the_gpu_build_and_its_libraries_from_a_wheel_index() {
    if !have_pip() {
        return;
    }
    let index = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    fake_ort_gpu(index.path(), "12.8");
    fake_cuda12_index(index.path(), &body, &[]);
    fake_tensorrt12(index.path());
    let locator = Locator::in_cache(cache.path(), index_source(index.path()));

    let ort = locator.resolve(Flavor::Gpu).expect("GPU build");
    assert_eq!(ort, cache.path().join("onnxruntime-gpu-1.31.1").join("libonnxruntime.so.1.31.1"));
    assert_eq!(std::fs::read(&ort).unwrap(), body(Flavor::Gpu.lib_name()));
    assert_eq!(provision::cuda_version_of(&ort).unwrap(), "12.8");

    let sets = provision_gpu_libraries(&locator, &ort, GpuStack::TensorRt).expect("NVIDIA libraries");
    assert_eq!(sets.len(), 2);
    let (cuda, trt) = (&sets[0], &sets[1]);
    assert_eq!(cuda.dir, cache.path().join("nvidia-cuda12-libs"));
    let order: Vec<(&str, &str, &str)> = cuda.libraries.iter().map(|l| (l.file.as_str(), l.package.as_str(), l.version.as_str())).collect();
    assert_eq!(
        order,
        [
            ("libcublasLt.so.12", "nvidia-cublas-cu12", "12.8.4.1"),
            ("libcublas.so.12", "nvidia-cublas-cu12", "12.8.4.1"),
            ("libnvrtc.so.12", "nvidia-cuda-nvrtc-cu12", "12.8.93"),
            ("libcurand.so.10", "nvidia-curand-cu12", "10.3.9.90"),
            ("libcufft.so.11", "nvidia-cufft-cu12", "11.3.3.83"),
            ("libcudart.so.12", "nvidia-cuda-runtime-cu12", "12.8.90"),
            ("libcudnn.so.9", "nvidia-cudnn-cu12", "9.10.2.21"),
        ]
    );
    // Every shared library of the wheels lands flat in the directory, byte for byte (cuDNN opens its
    // sub-libraries by name next to itself); headers and Python files do not.
    let mut files: Vec<String> = std::fs::read_dir(&cuda.dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    let mut expected = vec![
        "libcublas.so.12",
        "libcublasLt.so.12",
        "libcudart.so.12",
        "libcudnn.so.9",
        "libcudnn_graph.so.9",
        "libcudnn_ops.so.9",
        "libcufft.so.11",
        "libcufftw.so.11",
        "libcurand.so.10",
        "libnvblas.so.12",
        "libnvrtc-builtins.so.12.8",
        "libnvrtc.so.12",
        MANIFEST,
    ];
    expected.sort();
    assert_eq!(files, expected);
    for f in files.iter().filter(|f| f.starts_with("lib")) {
        assert_eq!(std::fs::read(cuda.dir.join(f)).unwrap(), body(f), "{f}");
    }
    let trt_files: Vec<&str> = trt.libraries.iter().map(|l| l.file.as_str()).collect();
    assert_eq!(trt_files, ["libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10"]);
    assert!(trt.dir.join("libnvinfer_builder_resource.so.10.13.3").is_file());
    assert!(trt.libraries.iter().all(|l| l.package == "tensorrt-cu12-libs" && l.version == "10.13.3.9"));
    assert!(leftovers(cache.path()).is_empty() && leftovers(&cuda.dir).is_empty(), "temporary files left behind");

    // A second run finds everything in the cache and never asks pip: the index is gone.
    drop(index);
    let again = provision_gpu_libraries(&locator, &locator.resolve(Flavor::Gpu).unwrap(), GpuStack::TensorRt).expect("from the cache");
    assert_eq!(again, sets);

    // `doctor` lists what is provisioned, with the wheels' versions (and fails: no driver here, or, with one,
    // fake libraries that cannot load).
    let (code, out, _) = doctor("tensorrt", &[("BETADPO_CACHE_DIR", cache.path())]);
    assert_ne!(code, 0);
    for (file, from) in [
        ("libcudnn.so.9", "nvidia-cudnn-cu12 9.10.2.21"),
        ("libcublasLt.so.12", "nvidia-cublas-cu12 12.8.4.1"),
        ("libnvonnxparser.so.10", "tensorrt-cu12-libs 10.13.3.9"),
    ] {
        assert!(out.lines().any(|l| l.starts_with(file) && l.contains(from)), "{file} from {from} not listed:\n{out}");
    }
    assert!(out.contains("onnxruntime-gpu") && out.contains("built with CUDA 12.8"), "{out}");
}

#[test]
fn a_missing_package_or_library_is_named_in_one_line() {
    if !have_pip() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let set = &cuda12()[0];
    for (skip, needles) in [
        (&["nvidia-cudnn-cu12"][..], &["CUDA 12 / cuDNN 9", "nvidia-cudnn-cu12"][..]),
        (&["libcublasLt.so.12"][..], &["nvidia-cublas-cu12 12.8.4.1 wheel has no libcublasLt.so.12"][..]),
    ] {
        let index = tempfile::tempdir().unwrap();
        fake_cuda12_index(index.path(), &body, skip);
        let err = gpu_libs::provision(cache.path(), set, &index_source(index.path())).unwrap_err().to_string();
        assert!(!err.contains('\n'), "not one line: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
        assert!(gpu_libs::find(cache.path(), set).is_none(), "an incomplete set looks complete");
        assert!(!cache.path().join(&set.dir_name).join(MANIFEST).exists());
    }
    // An optional library (NVRTC) may be absent: preload_dlls skips it too.
    let index = tempfile::tempdir().unwrap();
    fake_cuda12_index(index.path(), &body, &["libnvrtc.so.12"]);
    let got = gpu_libs::provision(cache.path(), set, &index_source(index.path())).expect("without NVRTC");
    assert!(got.libraries.iter().all(|l| l.file != "libnvrtc.so.12"));
    assert_eq!(got.libraries.len(), 6);
}

/// An interrupted provisioning (files without the manifest, or a manifest whose files went missing) is never
/// taken for complete, and the next run repairs it.
#[test]
fn partial_directories_never_look_complete() {
    if !have_pip() {
        return;
    }
    let (index, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fake_cuda12_index(index.path(), &body, &[]);
    let set = &cuda12()[0];
    let dir = cache.path().join(&set.dir_name);
    std::fs::create_dir_all(&dir).unwrap();
    for l in &set.libraries {
        std::fs::write(dir.join(&l.file), b"truncated").unwrap();
    }
    assert!(gpu_libs::find(cache.path(), set).is_none(), "libraries without a manifest look complete");
    let done = gpu_libs::provision(cache.path(), set, &index_source(index.path())).unwrap();
    assert_eq!(std::fs::read(dir.join("libcudart.so.12")).unwrap(), body("libcudart.so.12"), "stale file kept");
    std::fs::remove_file(dir.join("libcudnn.so.9")).unwrap();
    assert!(gpu_libs::find(cache.path(), set).is_none(), "a manifest with a missing library looks complete");
    assert_eq!(gpu_libs::provision(cache.path(), set, &index_source(index.path())).unwrap(), done);
    assert_eq!(std::fs::read(dir.join("libcudnn.so.9")).unwrap(), body("libcudnn.so.9"));
}

/// A provisioning that holds the lock keeps others waiting until it is done; then they find its work.
#[test]
fn provisioning_waits_for_the_lock_holder() {
    if !have_pip() {
        return;
    }
    let (index, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fake_cuda12_index(index.path(), &body, &[]);
    let set = cuda12().remove(0);
    let lock = std::fs::File::create(cache.path().join(format!("{}.lock", set.dir_name))).unwrap();
    lock.lock().unwrap();
    let (cache_dir, source) = (cache.path().to_path_buf(), index_source(index.path()));
    let set2 = set.clone();
    let waiter = std::thread::spawn(move || gpu_libs::provision(&cache_dir, &set2, &source));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(!waiter.is_finished(), "provisioning did not wait for the lock");
    assert!(!cache.path().join(&set.dir_name).join(MANIFEST).exists());
    lock.unlock().unwrap();
    let done = waiter.join().unwrap().expect("provisioning after the lock was released");
    assert_eq!(done.libraries.len(), 7);
    // Concurrent provisioners agree on one result.
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| gpu_libs::provision(cache.path(), &set, &index_source(index.path())).unwrap())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|r| *r == done));
}

// ---------------------------------------------------------------------------------------------- preloading

/// Compiles `source` into a shared library `soname` in `dir`, linked against `needs` (found in `dir`, no run
/// path, so only an already loaded library can satisfy them). None when there is no C compiler.
fn cc_shared(dir: &Path, soname: &str, source: &str, needs: &[&str]) -> Option<PathBuf> {
    let c = dir.join(format!("{soname}.c"));
    std::fs::write(&c, source).unwrap();
    let out = dir.join(soname);
    let mut cc = Command::new("cc");
    let base = Path::new(soname).file_name().unwrap().to_str().unwrap();
    cc.args(["-shared", "-fPIC", "-o"]).arg(&out).arg(&c).arg(format!("-Wl,-soname,{base}"));
    for n in needs {
        cc.arg(dir.join(n)); // a NEEDED entry by soname, resolved by the loader at run time
    }
    let status = cc.status().ok()?;
    assert!(status.success(), "cc failed for {soname}");
    Some(out)
}

const CHILD_ENV: &str = "BETADPO_TEST_PRELOAD";

/// Real ELF libraries standing in for the CUDA 12 set, with the real dependency edges (cuBLAS needs cuBLASLt,
/// cuDNN needs the CUDA runtime), and a stand-in for ONNX Runtime's CUDA provider that links cuBLAS, cuRAND,
/// the runtime and cuDNN and calls an NVRTC function it has no NEEDED entry for (resolvable only through a
/// global preload, as ONNX Runtime's provider finds NVRTC). Returns the provider, or None without a C compiler.
fn build_real_libraries(dir: &Path) -> Option<PathBuf> {
    let plain = |name: &str, f: &str| cc_shared(dir, name, &format!("int {f}(void) {{ return 1; }}\n"), &[]);
    plain("libcublasLt.so.12", "fake_cublaslt")?;
    cc_shared(dir, "libcublas.so.12", "int fake_cublaslt(void);\nint fake_cublas(void) { return 10 * fake_cublaslt(); }\n", &["libcublasLt.so.12"])?;
    plain("libnvrtc.so.12", "fake_nvrtc")?;
    plain("libcurand.so.10", "fake_curand")?;
    // cuFFT needs a library no wheel here carries: as an optional library, its failure must not stop the preload.
    std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
    plain("elsewhere/libnvJitLink.so.12", "fake_jitlink")?;
    cc_shared(dir, "libcufft.so.11", "int fake_jitlink(void);\nint fake_cufft(void) { return fake_jitlink(); }\n", &["elsewhere/libnvJitLink.so.12"])?;
    plain("libcudart.so.12", "fake_cudart")?;
    cc_shared(dir, "libcudnn.so.9", "int fake_cudart(void);\nint fake_cudnn(void) { return 100 * fake_cudart(); }\n", &["libcudart.so.12"])?;
    let provider_dir = dir.join("provider");
    std::fs::create_dir_all(&provider_dir).unwrap();
    let src = "int fake_cublas(void); int fake_cudnn(void); int fake_curand(void); int fake_nvrtc(void);\n\
               int provider_check(void) { return fake_cublas() + fake_cudnn() + fake_curand() + 1000 * fake_nvrtc(); }\n";
    let c = provider_dir.join("provider.c");
    std::fs::write(&c, src).unwrap();
    let provider = provider_dir.join("libfake_provider.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&provider)
        .arg(&c)
        .args(["libcublas.so.12", "libcurand.so.10", "libcudart.so.12", "libcudnn.so.9"].map(|n| dir.join(n)))
        .status()
        .ok()?;
    assert!(status.success());
    Some(provider)
}

/// In a child process (a fresh loader): provision the set from wheels holding real libraries, preload it, then
/// open the provider stand-in and call it; prints `PRELOAD_OK <value>` or `PRELOAD_FAILED <error>`. Mode
/// `plain` only opens the provider; `reversed` preloads in the reverse order.
#[test]
#[ignore]
fn child_preload() {
    let Some(spec) = std::env::var_os(CHILD_ENV) else { return };
    let spec = spec.into_string().unwrap();
    let (mode, rest) = spec.split_once(':').unwrap();
    let (cache, rest) = rest.split_once(':').unwrap();
    let (index, provider) = rest.split_once(':').unwrap();
    if mode != "plain" {
        let mut set = gpu_libs::provision(Path::new(cache), &cuda12()[0], &index_source(Path::new(index))).unwrap();
        if mode == "reversed" {
            set.libraries.reverse();
        }
        if let Err(e) = betadpo::runtime::preload_gpu_libraries(&set) {
            return println!("PRELOAD_FAILED {e}");
        }
    }
    let lib = unsafe { libc::dlopen(std::ffi::CString::new(provider).unwrap().as_ptr(), libc::RTLD_NOW) };
    if lib.is_null() {
        let why = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) }.to_string_lossy().into_owned();
        return println!("PRELOAD_FAILED {why}");
    }
    let f = unsafe { libc::dlsym(lib, c"provider_check".as_ptr()) };
    let f: extern "C" fn() -> i32 = unsafe { std::mem::transmute(f) };
    println!("PRELOAD_OK {}", f());
}

fn run_child(mode: &str, cache: &Path, index: &Path, provider: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child_preload", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{}:{}:{}", cache.display(), index.display(), provider.display()))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout.lines().find_map(|l| l.find("PRELOAD_").map(|i| l[i..].to_string()));
    line.unwrap_or_else(|| panic!("no report from child:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn preloading_in_order_lets_the_provider_load() {
    if !have_pip() {
        return;
    }
    let build = tempfile::tempdir().unwrap();
    let Some(provider) = build_real_libraries(build.path()) else {
        return fixtures::skip("no C compiler (cc) to build the shared libraries the preload test loads");
    };
    let index = tempfile::tempdir().unwrap();
    let real = |name: &str| std::fs::read(build.path().join(name)).unwrap_or_else(|_| body(name));
    fake_cuda12_index(index.path(), &real, &["libcufftw.so.11", "libnvblas.so.12", "libnvrtc-builtins.so.12.8", "libcudnn_graph.so.9", "libcudnn_ops.so.9"]);
    let cache = tempfile::tempdir().unwrap();

    // Without the preload the provider cannot load: its libraries are on no loader path.
    let without = run_child("plain", cache.path(), index.path(), &provider);
    assert!(without.starts_with("PRELOAD_FAILED") && without.contains("libcublas.so.12"), "{without}");
    // Preloaded in order, globally (cuFFT, optional, failing on its missing dependency and skipped): the
    // provider loads, and its call through every library returns
    // cublas 10*1 + cudnn 100*1 + curand 1 + 1000 * nvrtc (found only in the global scope) = 1111.
    assert_eq!(run_child("preload", cache.path(), index.path(), &provider), "PRELOAD_OK 1111");
    // In the wrong order the first library whose dependency is not loaded yet fails, named with its wheel.
    let reversed = run_child("reversed", cache.path(), index.path(), &provider);
    assert!(reversed.starts_with("PRELOAD_FAILED") && reversed.contains("cannot load libcudnn.so.9 (from nvidia-cudnn-cu12 9.10.2.21"), "{reversed}");
    assert!(reversed.contains("libcudart.so.12"), "{reversed}");
}
