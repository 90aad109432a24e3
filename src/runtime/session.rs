//! Building sessions from one plain configuration struct, so every caller (training, validation, shape probing)
//! gets the same provider checks and error messages.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use super::tensorrt::TensorRtOptions;
use super::{init, loaded_library, ExecutionProvider, SharedWeights};
use crate::{Error, Result};

/// ONNX Runtime graph optimization level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OptLevel {
    /// No graph rewrites (useful to debug a graph exactly as written).
    Disable,
    /// Constant folding and redundant node elimination.
    Basic,
    /// Plus complex fusions.
    Extended,
    /// Everything, including layout optimizations (ONNX Runtime's own default).
    #[default]
    All,
}

impl From<OptLevel> for GraphOptimizationLevel {
    fn from(level: OptLevel) -> Self {
        match level {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::All,
        }
    }
}

impl fmt::Display for OptLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptLevel::Disable => "disable",
            OptLevel::Basic => "basic",
            OptLevel::Extended => "extended",
            OptLevel::All => "all",
        })
    }
}

impl FromStr for OptLevel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" | "none" | "0" => Ok(OptLevel::Disable),
            "basic" | "1" => Ok(OptLevel::Basic),
            "extended" | "2" => Ok(OptLevel::Extended),
            "all" | "3" => Ok(OptLevel::All),
            _ => Err(Error::BadFlag { flag: "optimization level".into(), detail: format!("unknown level '{s}'; choose one of disable, basic, extended, all") }),
        }
    }
}

/// How to build a session. `Default` is CPU, ONNX Runtime's default thread count, all optimizations.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub ep: ExecutionProvider,
    /// Intra-op threads; `None` lets ONNX Runtime pick (one per physical core).
    pub intra_threads: Option<usize>,
    pub optimization: OptLevel,
    /// Enables ONNX Runtime's profiler; it writes `<prefix>_<timestamp>.json` when
    /// `Session::end_profiling` is called (not on drop).
    pub profile_prefix: Option<PathBuf>,
    /// Subnormal floats as zero in the session's threads.
    pub flush_denormals: bool,
    /// Memory pattern planning; turn it off when input shapes vary from run to run.
    pub memory_pattern: bool,
    /// ONNX Runtime's CPU arena keeps every block it ever allocated (growing in powers of two);
    /// training graphs with batch-dependent shapes do better returning memory to the system.
    pub cpu_arena: bool,
    /// Park the intra-op threads as soon as a run returns instead of letting them spin for more
    /// work: for a caller that does CPU work of its own between runs (the fused optimizer).
    pub stop_spinning_after_run: bool,
    /// Engine/timing caches and the optimisation profile, for the TensorRT provider.
    pub tensorrt: TensorRtOptions,
    /// Have ONNX Runtime record which provider runs each node (see `runtime::placement`).
    pub record_placement: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ep: ExecutionProvider::Cpu,
            intra_threads: None,
            optimization: OptLevel::All,
            profile_prefix: None,
            flush_denormals: false,
            memory_pattern: true,
            cpu_arena: true,
            stop_spinning_after_run: false,
            tensorrt: TensorRtOptions::default(),
            record_placement: false,
        }
    }
}

impl SessionConfig {
    /// A default configuration on `ep`.
    pub fn with_ep(ep: ExecutionProvider) -> Self {
        SessionConfig { ep, ..Default::default() }
    }

    /// Loads a model file; external data files are resolved relative to it.
    pub fn session_from_file(&self, path: &Path) -> Result<Session> {
        // ONNX Runtime opens the file itself: a FIFO would block it for good
        crate::fs_guard::open_regular(path)?;
        let what = path.display().to_string();
        let mut builder = self.builder(&what)?;
        builder.commit_from_file(path).map_err(|e| self.commit_error(&what, e))
    }

    /// [`Self::session_from_file`], with the initializers of `shared` taken from it instead of the file (see
    /// [`SharedWeights`]). The session holds the shared tensors (`ort` keeps each initializer it was given
    /// alive as long as the session), so `shared` may be dropped.
    pub fn session_sharing(&self, path: &Path, shared: &SharedWeights) -> Result<Session> {
        crate::fs_guard::open_regular(path)?;
        let what = path.display().to_string();
        let mut builder = shared.apply(self.builder(&what)?).map_err(|e| Error::Runtime(format!("{what}: {e}")))?;
        builder.commit_from_file(path).map_err(|e| self.commit_error(&what, e))
    }

    /// Loads a serialized model held in memory (its initializers must be embedded).
    pub fn session_from_bytes(&self, bytes: &[u8]) -> Result<Session> {
        let what = format!("<in-memory model, {} bytes>", bytes.len());
        let mut builder = self.builder(&what)?;
        builder.commit_from_memory(bytes).map_err(|e| self.commit_error(&what, e))
    }

    fn builder(&self, what: &str) -> Result<SessionBuilder> {
        let env = init(&self.ep)?;
        let library = loaded_library().map(|l| l.path.display().to_string()).unwrap_or_default();
        self.ep.check_available(&library)?;
        let fail = |e: ort::Error<SessionBuilder>| Error::Runtime(format!("{what}: configuring session: {e}"));

        let mut builder = ort::session::Session::builder(env)
            .map_err(|e| Error::Runtime(format!("{what}: creating session builder: {e}")))?
            .with_optimization_level(self.optimization.into())
            .map_err(fail)?
            .with_memory_pattern(self.memory_pattern)
            .map_err(fail)?;
        if let Some(n) = self.intra_threads {
            builder = builder.with_intra_threads(n).map_err(fail)?;
        }
        if self.flush_denormals {
            builder = builder.with_flush_to_zero().map_err(fail)?;
        }
        if self.stop_spinning_after_run {
            builder = builder.with_config_entry("session.force_spinning_stop", "1").map_err(fail)?;
        }
        if self.record_placement {
            builder = builder.with_config_entry(super::placement::RECORD_KEY, "1").map_err(fail)?;
        }
        if let Some(prefix) = &self.profile_prefix {
            builder = builder.with_profiling(prefix).map_err(fail)?;
        }
        if !self.cpu_arena && self.ep == ExecutionProvider::Cpu {
            builder = builder
                .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
                .map_err(|e| Error::Runtime(format!("{what}: configuring the CPU provider: {e}")))?;
        }
        let dispatches = self.ep.dispatches(&self.tensorrt)?;
        if !dispatches.is_empty() {
            builder = builder.with_execution_providers(dispatches).map_err(|e| {
                let msg = e.to_string();
                // The usual cause on a GPU build: its CUDA/cuDNN dependencies are not on the loader path.
                let hint = if msg.contains("cannot open shared object file") {
                    " (the GPU build of ONNX Runtime needs the CUDA and cuDNN libraries it was built against on \
                     the loader path, e.g. via LD_LIBRARY_PATH)"
                } else {
                    ""
                };
                self.ep.unavailable(format_args!("{msg}{hint}"))
            })?;
        }
        Ok(builder)
    }

    /// GPU providers may only fail at commit time (e.g. no device, missing CUDA libraries); name the provider
    /// then, so the user does not chase a model problem.
    fn commit_error(&self, what: &str, e: ort::Error) -> Error {
        match self.ep {
            ExecutionProvider::Cpu => Error::Runtime(format!("{what}: {e}")),
            ep => Error::Runtime(format!("{what}: creating session on {ep}: {e}")),
        }
    }
}
