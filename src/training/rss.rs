//! Peak resident memory of this process (Linux `/proc`), for the train stage's summary and the
//! benchmarks. Both functions are best effort: elsewhere they do nothing / report 0.

use std::fs;

/// Reset the peak resident set (Linux: `5` to /proc/self/clear_refs), so that a stage's peak
/// is its own and not that of earlier stages in the same process. Best effort.
pub fn reset_peak_rss() {
    let _ = fs::write("/proc/self/clear_refs", b"5");
}

/// Peak resident set of this process (VmHWM), MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
