//! How the C heap treats the memory ONNX Runtime allocates on the CPU.
//!
//! Without its arena, ONNX Runtime takes every intermediate tensor from `malloc`. glibc's defaults
//! hand large blocks back to the kernel when they are freed, so every training step faults its
//! activations and gradients in again, page by page (measured on a 2-core VM: ~0.4 ms per MiB;
//! SmolLM2-135M, 8 pairs, ~1.1 GB of fresh pages per step). Keeping freed memory in one heap lets the
//! next step reuse the same pages; unlike ONNX Runtime's arena, which rounds blocks up and never
//! gives memory back, the heap's peak stays at what the step needs.
//!
//! But a heap cannot give back the holes between blocks still in use. At long rows the tensors come
//! in many sizes (a 1,787-token row's attention chunks alone: 64 KiB to 115 MiB) and the holes add
//! up: SmolLM2-135M, 8 pairs of 1,023 tokens, `--gradient-checkpointing --attention-chunks 8`, heap
//! blocks up to 32 MiB: killed above 12.4 GiB; up to 4 MiB: 6.69 GiB; 2 pairs of 511 tokens: 3.98 /
//! 3.18 GiB for 11.9 / 13.3 s a step. So artifacts built to save memory get the smaller heap blocks.

/// What [`tune_heap`] favours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapUse {
    /// Blocks up to 32 MiB from the heap: the fewest page faults (short rows).
    Speed,
    /// Blocks up to 4 MiB from the heap, larger ones mapped and returned when freed (long rows,
    /// artifacts built with `--gradient-checkpointing`).
    Memory,
}

impl HeapUse {
    fn mmap_threshold(self) -> i32 {
        match self {
            HeapUse::Speed => 32 << 20,
            HeapUse::Memory => 4 << 20,
        }
    }
}

/// Tunes glibc's allocator for a training process: one heap for all threads (freed blocks are
/// reusable by any thread), blocks up to [`HeapUse`]'s size from the heap rather than fresh mappings,
/// and no trimming of the heap's top. Does nothing when the user set `MALLOC_*` variables or
/// `GLIBC_TUNABLES` (their choice wins), or on other C libraries. Call before threads start.
pub fn tune_heap(favour: HeapUse) {
    let user_tuned = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    if user_tuned {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before worker threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, favour.mmap_threshold());
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = favour;
}
