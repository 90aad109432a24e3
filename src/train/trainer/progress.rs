//! The progress bars `train` draws on standard error (hidden with `--quiet`).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `total` units labelled `prefix`, at `pos`; hidden unless `enabled`.
pub fn bar(prefix: &'static str, total: u64, pos: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template").progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb.set_position(pos);
    pb
}
