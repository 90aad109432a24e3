//! Bounds on what input may make betadpo allocate: counts from flags and files are checked against
//! a sane maximum and an estimate of the memory they imply, before anything is allocated, and
//! refused in one line that carries the estimate (see docs/limits.md).

pub mod memory_guard;

use crate::{Error, Result};

pub use memory_guard::with_memory_budget;

/// `--max-row-bytes`' default: far beyond any real preference row, far below a machine's memory.
pub const DEFAULT_MAX_ROW_BYTES: usize = 16 << 20;
/// Pairs per micro-batch, micro-batches per step, tokens per row, LoRA rank: 2^20 is beyond any
/// real run and keeps every product of two such counts within 64 bits.
pub const MAX_COUNT: usize = 1 << 20;

/// The machine's physical memory in bytes (a large stand-in when it cannot be read).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        1 << 40
    }
}

/// Bytes as a person reads them: `4.0 TB`, `57.2 GB`, `512 B`.
pub fn human_bytes(bytes: u128) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < units.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

/// Refuses `value` of `flag` above `max`; `why` says what the bound stands for.
pub fn at_most(flag: &str, value: usize, max: usize, why: &str) -> Result<()> {
    if value > max {
        return Err(Error::BadFlag { flag: flag.into(), detail: format!("{value} is more than {max} ({why})") });
    }
    Ok(())
}

/// Refuses work whose memory estimate `bytes` (`None`: beyond 128 bits) exceeds this machine's
/// memory; `what` names what needs it and `change` what the user can change.
pub fn fits_in_memory(flag: &str, what: &str, bytes: Option<u128>, change: &str) -> Result<()> {
    let total = physical_memory();
    match bytes {
        Some(b) if b <= u128::from(total) => Ok(()),
        _ => Err(Error::BadFlag {
            flag: flag.into(),
            detail: format!(
                "{what} needs about {} of memory, more than this machine's {}; {change}",
                bytes.map_or_else(|| "more than 10^38 bytes".to_string(), human_bytes),
                human_bytes(u128::from(total))
            ),
        }),
    }
}

/// The product of `counts` as a byte estimate (`None` on overflow).
pub fn product(counts: &[u128]) -> Option<u128> {
    counts.iter().try_fold(1u128, |acc, &c| acc.checked_mul(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4_398_046_511_104), "4.4 TB");
        assert_eq!(human_bytes(57_200_000_000), "57.2 GB");
    }

    #[test]
    fn estimates_beyond_memory_are_refused_with_the_estimate() {
        let err = fits_in_memory("--batch-size", "a batch", product(&[1 << 40, 1 << 40]), "lower --batch-size").unwrap_err().to_string();
        assert!(err.starts_with("invalid value for --batch-size: a batch needs about 1208925.8 EB"), "{err}");
        assert!(err.ends_with("lower --batch-size"), "{err}");
        assert!(fits_in_memory("--x", "y", product(&[u128::MAX, 2]), "z").unwrap_err().to_string().contains("more than 10^38 bytes"));
        assert!(fits_in_memory("--x", "y", Some(1024), "z").is_ok());
        assert!(at_most("--threads", 100_000, 64, "why").unwrap_err().to_string().contains("100000 is more than 64 (why)"));
    }
}
