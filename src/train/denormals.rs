//! Subnormal floats as zero (x86's flush-to-zero and denormals-are-zero), for the thread that holds
//! a [`FlushGuard`]. Once DPO fits a batch, gradients shrink below 1e-38 and every operation on them
//! takes a slow microcode path; treating them as 0 changes no value above that.

pub struct FlushGuard {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

impl FlushGuard {
    #[allow(deprecated)] // the MXCSR intrinsics; inline assembly would do the same
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: reading and setting MXCSR's FTZ/DAZ bits affects only this thread's float mode.
            let saved = unsafe { std::arch::x86_64::_mm_getcsr() };
            unsafe { std::arch::x86_64::_mm_setcsr(saved | FTZ_DAZ) };
            FlushGuard { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushGuard {}
    }
}

impl Default for FlushGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushGuard {
    #[allow(deprecated)]
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: restores the mode this thread had before.
        unsafe {
            std::arch::x86_64::_mm_setcsr(self.saved)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormals_flush_only_while_guarded() {
        let tiny = std::hint::black_box(1e-38f32);
        let half = |x: f32| std::hint::black_box(x) * std::hint::black_box(0.5f32);
        assert!(half(tiny) > 0.0, "1e-38 / 2 is a subnormal, not zero");
        {
            let _g = FlushGuard::new();
            #[cfg(target_arch = "x86_64")]
            assert_eq!(half(tiny), 0.0, "flushed to zero under the guard");
        }
        assert!(half(tiny) > 0.0, "the mode is restored");
    }
}
