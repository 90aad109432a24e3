//! How the C heap treats the memory ONNX Runtime allocates on the CPU.
//!
//! Without its arena, ONNX Runtime takes every intermediate tensor from `malloc`. glibc's defaults
//! hand large blocks back to the kernel when they are freed, so every training step faults its
//! activations and gradients in again, page by page (measured on a 2-core VM: ~0.4 ms per MiB;
//! SmolLM2-135M, 8 pairs, ~1.1 GB of fresh pages per step). Keeping freed memory in one heap lets the
//! next step reuse the same pages; unlike ONNX Runtime's arena, which rounds blocks up and never
//! gives memory back, the heap's peak stays at what the step needs.

/// Tunes glibc's allocator for a training process: one heap for all threads (freed blocks are
/// reusable by any thread), blocks up to 32 MiB from the heap rather than fresh mappings, and no
/// trimming of the heap's top. Does nothing when the user set `MALLOC_*` variables or
/// `GLIBC_TUNABLES` (their choice wins), or on other C libraries. Call before threads start.
pub fn keep_freed_memory_for_reuse() {
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
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
}
