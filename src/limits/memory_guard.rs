//! A memory budget for code that cannot be stopped from outside: the chat template engine builds
//! strings as a template says (a loop that doubles one reaches terabytes in 40 steps, and no fuel
//! counts bytes). The process's allocator counts what the guarded thread allocates; past the
//! budget it prints one error line and ends the process with status 1 — an allocation that fails
//! would abort with a backtrace instead, and unwinding out of an allocator is not allowed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator betadpo runs on: the system's, counting the allocations of a guarded thread.
pub struct CountingAlloc;

#[derive(Clone, Copy)]
struct Guard {
    /// Bytes allocated (less those freed) since the guard began.
    used: usize,
    budget: usize,
    /// The error line, owned by [`with_memory_budget`]'s caller for the guard's whole life.
    message: (*const u8, usize),
}

thread_local! {
    static GUARD: Cell<Option<Guard>> = const { Cell::new(None) };
}

impl CountingAlloc {
    fn count(&self, grow: usize, shrink: usize) {
        let _ = GUARD.try_with(|g| {
            let Some(mut guard) = g.get() else { return };
            guard.used = guard.used.saturating_add(grow).saturating_sub(shrink);
            if guard.used > guard.budget {
                g.set(None);
                // SAFETY: the message outlives the guard; write and _exit neither allocate nor unwind.
                unsafe {
                    libc::write(2, guard.message.0.cast(), guard.message.1);
                    libc::_exit(1);
                }
            }
            g.set(Some(guard));
        });
    }
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches only a thread-local cell.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size(), 0);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count(layout.size(), 0);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.count(0, layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count(new_size, layout.size());
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` with at most `budget` bytes of net allocation on this thread; beyond it the process
/// ends with `error: {message}` on stderr and status 1. Guards do not nest (the inner one wins).
pub fn with_memory_budget<T>(budget: usize, message: &str, f: impl FnOnce() -> T) -> T {
    let line = format!("error: {}\n", message.replace('\n', " "));
    let previous = GUARD.with(|g| g.replace(Some(Guard { used: 0, budget, message: (line.as_ptr(), line.len()) })));
    struct Restore(Option<Guard>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = GUARD.try_with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(previous);
    let out = f();
    drop(_restore);
    drop(line);
    out
}
