//! NCCL between GPUs: the gradient allreduce of `--ep cuda` under `mpirun` runs on device memory, with
//! no copy through the host. MPI stays the launcher and carries everything else (the NCCL id, metrics,
//! pair values); NCCL sums the gradients.
//!
//! NCCL and the CUDA runtime are opened with `dlopen` at run time, as betadpo opens the other NVIDIA
//! libraries (`runtime::gpu_libs` provisions `libnccl.so.2` from PyPI's `nvidia-nccl-cuNN` wheel), so
//! every build has this path and none needs CUDA to compile. The few entry points used have kept their
//! C signatures since NCCL 2.0 (the asynchronous error query since 2.4).
//!
//! A rank that hangs or dies cannot block the others forever: the wait after the allreduce polls
//! the stream and NCCL's asynchronous error, and after the timeout aborts the communicator and
//! returns an error (the caller then ends the job through MPI), as PyTorch's NCCL watchdog does.
//! The calls that block inside NCCL (joining the communicator, which waits for every rank, and the
//! end of a group, which may set up connections) run under a watchdog thread that ends the process
//! with a one-line message when they outlast the same timeout.
//!
//! `BETADPO_NCCL_LIB` and `BETADPO_CUDART_LIB` name other libraries with the same interface (a system
//! NCCL; the host-memory stand-in the tests build).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::watchdog::Watchdog;
use super::Collective;
use crate::runtime::dl::{Library, Scope};
use crate::{Error, Result};

/// `ncclUniqueId`: `NCCL_UNIQUE_ID_BYTES` opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [u8; 128],
}

type Comm = *mut c_void;
type Stream = *mut c_void;

const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
const CUDA_ERROR_NOT_READY: c_int = 600;
const CUDA_STREAM_NON_BLOCKING: u32 = 1;

/// The NCCL entry points betadpo calls.
struct NcclApi {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// `ncclGetLastError` (NCCL 2.13+): the reason behind the last failure, when there is one.
    get_last_error: Option<unsafe extern "C" fn(Comm) -> *const c_char>,
}

/// The CUDA runtime entry points: which GPU, and the stream NCCL runs on.
struct CudaApi {
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    stream_create_with_flags: unsafe extern "C" fn(*mut Stream, u32) -> c_int,
    stream_query: unsafe extern "C" fn(Stream) -> c_int,
    stream_destroy: unsafe extern "C" fn(Stream) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// Looks up `name` in `lib` as a function pointer of type `F`.
///
/// SAFETY: the caller names `F` as the symbol's C signature.
unsafe fn function<F: Copy>(lib: &Library, what: &str, name: &CStr) -> Result<F> {
    let ptr = lib.symbol(name).ok_or_else(|| Error::Distributed(format!("{what} has no {}", name.to_string_lossy())))?;
    debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    Ok(std::mem::transmute_copy(&ptr))
}

/// Opens the library `env` names, else the first of `candidates` this process already loaded (the
/// runtime's own, provisioned copy), else the first that loads.
fn open(env: &str, candidates: &[&str], what: &str) -> Result<(Library, String)> {
    let names: Vec<String> = match std::env::var_os(env) {
        Some(p) => vec![PathBuf::from(p).to_string_lossy().into_owned()],
        None => {
            if let Some((lib, name)) = candidates.iter().find_map(|c| Some((Library::already_loaded(Path::new(c))?, c.to_string()))) {
                return Ok((lib, name));
            }
            candidates.iter().map(|s| s.to_string()).collect()
        }
    };
    let mut errors = Vec::new();
    for n in &names {
        match Library::open(Path::new(n), Scope::Global) {
            Ok(lib) => return Ok((lib, n.clone())),
            Err(e) => errors.push(e),
        }
    }
    Err(Error::Distributed(format!("cannot load {what} ({}; set {env} to its path)", errors.join("; "))))
}

impl NcclApi {
    fn load() -> Result<(Self, String)> {
        let (lib, name) = open("BETADPO_NCCL_LIB", &["libnccl.so.2", "libnccl.so"], "NCCL")?;
        let what = format!("NCCL ({name})");
        // SAFETY: the signatures are NCCL's (nccl.h, stable since 2.4).
        let api = unsafe {
            NcclApi {
                get_version: function(&lib, &what, c"ncclGetVersion")?,
                get_unique_id: function(&lib, &what, c"ncclGetUniqueId")?,
                comm_init_rank: function(&lib, &what, c"ncclCommInitRank")?,
                all_reduce: function(&lib, &what, c"ncclAllReduce")?,
                group_start: function(&lib, &what, c"ncclGroupStart")?,
                group_end: function(&lib, &what, c"ncclGroupEnd")?,
                comm_get_async_error: function(&lib, &what, c"ncclCommGetAsyncError")?,
                comm_abort: function(&lib, &what, c"ncclCommAbort")?,
                comm_destroy: function(&lib, &what, c"ncclCommDestroy")?,
                get_error_string: function(&lib, &what, c"ncclGetErrorString")?,
                get_last_error: function(&lib, &what, c"ncclGetLastError").ok(),
            }
        };
        Ok((api, name))
    }

    fn check(&self, code: c_int, call: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code; ncclGetLastError a
        // NUL-terminated string NCCL owns (null comm: the last error of any communicator).
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(code)) }.to_string_lossy();
        let last = self
            .get_last_error
            .map(|f| unsafe { f(std::ptr::null_mut()) })
            .filter(|p| !p.is_null())
            .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
        let detail = last.filter(|l| !l.trim().is_empty()).map(|l| format!(": {}", l.trim())).unwrap_or_default();
        Err(Error::Distributed(format!("NCCL {call} failed: {msg} (ncclResult {code}){detail}")))
    }
}

impl CudaApi {
    fn load() -> Result<Self> {
        // The provisioned runtime is already loaded (by soname) when ONNX Runtime's CUDA provider is.
        let (lib, name) = open("BETADPO_CUDART_LIB", &["libcudart.so.13", "libcudart.so.12", "libcudart.so"], "the CUDA runtime")?;
        let what = format!("the CUDA runtime ({name})");
        // SAFETY: the signatures are the CUDA runtime's (cuda_runtime_api.h).
        unsafe {
            Ok(CudaApi {
                set_device: function(&lib, &what, c"cudaSetDevice")?,
                stream_create_with_flags: function(&lib, &what, c"cudaStreamCreateWithFlags")?,
                stream_query: function(&lib, &what, c"cudaStreamQuery")?,
                stream_destroy: function(&lib, &what, c"cudaStreamDestroy")?,
                get_error_string: function(&lib, &what, c"cudaGetErrorString")?,
            })
        }
    }

    fn check(&self, code: c_int, call: &str) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static string for any code.
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(code)) }.to_string_lossy();
        Err(Error::Distributed(format!("CUDA {call} failed: {msg} (cudaError {code})")))
    }
}

/// The NCCL version a loaded library reports, e.g. `2.32.3` (`ncclGetVersion`'s code is
/// `major * 10000 + minor * 100 + patch` since 2.9, `major * 1000 + minor * 100 + patch` before).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

/// NCCL and the CUDA runtime, loaded.
pub struct Libraries {
    nccl: NcclApi,
    cuda: CudaApi,
    /// E.g. `NCCL 2.32.3 (libnccl.so.2)`, for the log.
    pub describe: String,
}

impl Libraries {
    pub fn load() -> Result<Self> {
        let (nccl, name) = NcclApi::load()?;
        let cuda = CudaApi::load()?;
        let mut code = 0;
        // SAFETY: valid out-pointer.
        nccl.check(unsafe { (nccl.get_version)(&mut code) }, "ncclGetVersion")?;
        Ok(Libraries { nccl, cuda, describe: format!("NCCL {} ({name})", version_string(code)) })
    }
}

/// Whether every rank can sum with NCCL: each loaded the libraries, and no two ranks of a machine
/// use the same GPU (NCCL refuses that; `gpu` is `None` for a host-memory stand-in). `None` when
/// they can, else why not (the same on every rank). Every rank must call this together.
pub fn readiness(coll: &dyn Collective, loaded: &Result<Libraries>, gpu: Option<i32>) -> Result<Option<String>> {
    let mine = match (loaded, gpu) {
        (Ok(_), Some(device)) => format!("ok {}:{device}", host_name()),
        (Ok(_), None) => format!("ok rank {}", coll.rank()),
        (Err(e), _) => format!("no {e}"),
    };
    let all = coll.gather(mine.as_bytes())?;
    let all: Vec<String> = all.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    if let Some((rank, why)) = all.iter().enumerate().find_map(|(r, m)| Some((r, m.strip_prefix("no ")?))) {
        return Ok(Some(format!("rank {rank} cannot use NCCL: {why}")));
    }
    for (r, m) in all.iter().enumerate() {
        if let Some(first) = all[..r].iter().position(|x| x == m) {
            let gpu = m.strip_prefix("ok ").unwrap_or(m);
            return Ok(Some(format!(
                "ranks {first} and {r} both use GPU {gpu} (host:device), and NCCL needs one GPU per rank (give each rank its own with --ep cuda, or fewer ranks)"
            )));
        }
    }
    Ok(None)
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: a writable buffer of the given length.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut c_char, buf.len()) } != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// One NCCL communicator over all ranks of the job, on this rank's GPU, with its own stream.
pub struct Nccl {
    nccl: NcclApi,
    cuda: CudaApi,
    comm: Comm,
    stream: Stream,
    timeout: Duration,
    watchdog: Watchdog,
    /// "rank R of N", for messages.
    who: String,
    aborted: std::cell::Cell<bool>,
    /// E.g. `NCCL 2.32.3 (libnccl.so.2)`, for the log.
    pub describe: String,
}

impl Nccl {
    /// Joins every rank of `coll` in one communicator on GPU `device`: rank 0 makes the NCCL id and
    /// MPI carries it to the others. Every rank must call this together.
    pub fn init(libraries: Libraries, coll: &dyn Collective, device: i32, timeout: Duration) -> Result<Self> {
        let Libraries { nccl, cuda, describe } = libraries;
        let watchdog = Watchdog::new();
        // SAFETY: plain call with a device ordinal.
        cuda.check(unsafe { (cuda.set_device)(device) }, &format!("cudaSetDevice({device})"))?;
        let mut id = UniqueId { internal: [0; 128] };
        if coll.is_root() {
            // SAFETY: valid out-pointer to a 128-byte id.
            nccl.check(unsafe { (nccl.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        }
        id = broadcast_id(coll, &id)?;
        let mut comm: Comm = std::ptr::null_mut();
        let (rank, size) = (coll.rank() as c_int, coll.size() as c_int);
        let hung = format!("rank {rank} of {size}: joining the NCCL communicator did not finish within {:.0} s: a rank is hung or gone", timeout.as_secs_f64());
        // SAFETY: valid out-pointer; the id is the same on every rank.
        let code = watchdog.within(timeout, hung, || unsafe { (nccl.comm_init_rank)(&mut comm, size, id, rank) });
        nccl.check(code, &format!("ncclCommInitRank (rank {rank} of {size}, GPU {device})"))?;
        let mut stream: Stream = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        if let Err(e) = cuda.check(unsafe { (cuda.stream_create_with_flags)(&mut stream, CUDA_STREAM_NON_BLOCKING) }, "cudaStreamCreateWithFlags") {
            unsafe { (nccl.comm_destroy)(comm) };
            return Err(e);
        }
        Ok(Nccl { nccl, cuda, comm, stream, timeout, watchdog, who: format!("rank {rank} of {size}"), aborted: false.into(), describe })
    }

    /// Sums each buffer over the ranks, in place, as one grouped NCCL call (NCCL launches the
    /// group's allreduces together), and waits for it.
    ///
    /// # Safety
    /// Every pointer must address `len` float32 values of this rank's GPU memory that nothing else
    /// reads or writes until this returns; every rank passes buffers of the same lengths in the same order.
    pub unsafe fn sum_f32_in_place(&self, buffers: &[(*mut f32, usize)]) -> Result<()> {
        if self.aborted.get() {
            return Err(Error::Distributed("the NCCL communicator was aborted after an earlier failure".into()));
        }
        self.nccl.check((self.nccl.group_start)(), "ncclGroupStart")?;
        for &(ptr, len) in buffers {
            let code = (self.nccl.all_reduce)(ptr as *const c_void, ptr as *mut c_void, len, NCCL_FLOAT32, NCCL_SUM, self.comm, self.stream);
            if code != 0 {
                (self.nccl.group_end)();
                return self.nccl.check(code, "ncclAllReduce");
            }
        }
        let hung = format!(
            "{}: the NCCL gradient allreduce did not finish within {:.0} s (ncclGroupEnd): a rank is hung or gone",
            self.who,
            self.timeout.as_secs_f64()
        );
        let code = self.watchdog.within(self.timeout, hung, || (self.nccl.group_end)());
        self.nccl.check(code, "ncclGroupEnd")?;
        self.wait()
    }

    /// Polls the stream until the allreduce is done, failing on an NCCL error or after the timeout.
    fn wait(&self) -> Result<()> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: a stream this struct created.
            match unsafe { (self.cuda.stream_query)(self.stream) } {
                0 => return Ok(()),
                CUDA_ERROR_NOT_READY => {}
                code => {
                    self.abort();
                    return self.cuda.check(code, "the NCCL allreduce's stream");
                }
            }
            let mut async_error = 0;
            // SAFETY: a live communicator and a valid out-pointer.
            if let Err(e) = self.nccl.check(unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut async_error) }, "ncclCommGetAsyncError") {
                self.abort();
                return Err(e);
            }
            if async_error != 0 && async_error != NCCL_IN_PROGRESS {
                self.abort();
                return self.nccl.check(async_error, "allreduce (asynchronous error; a rank may have died)");
            }
            if started.elapsed() > self.timeout {
                self.abort();
                return Err(Error::Distributed(format!(
                    "the NCCL gradient allreduce did not finish within {:.0} s: a rank is hung or gone",
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: a live communicator, aborted once.
            unsafe { (self.nccl.comm_abort)(self.comm) };
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: handles this struct created, released once.
        unsafe {
            if !self.aborted.get() {
                (self.nccl.comm_destroy)(self.comm);
            }
            (self.cuda.stream_destroy)(self.stream);
        }
    }
}

/// Rank 0's id on every rank (MPI carries it: NCCL's own bootstrap needs the id first).
fn broadcast_id(coll: &dyn Collective, id: &UniqueId) -> Result<UniqueId> {
    let mine: &[u8] = if coll.is_root() { &id.internal } else { &[] };
    let all = coll.gather(mine)?;
    let root = all.first().filter(|b| b.len() == 128).ok_or_else(|| Error::Distributed("rank 0 sent no NCCL id".into()))?;
    let mut out = UniqueId { internal: [0; 128] };
    out.internal.copy_from_slice(root);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes() {
        // nccl.h: NCCL_VERSION(X,Y,Z) is X*10000+Y*100+Z from 2.9 on, X*1000+Y*100+Z before
        assert_eq!(version_string(23203), "2.32.3");
        assert_eq!(version_string(21903), "2.19.3");
        assert_eq!(version_string(2804), "2.8.4");
    }

    #[test]
    fn one_rank_gets_its_own_id() {
        let id = UniqueId { internal: std::array::from_fn(|i| i as u8) };
        assert_eq!(broadcast_id(&super::super::Single, &id).unwrap().internal, id.internal);
    }
}
