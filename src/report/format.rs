//! Human-readable formatting of report values; missing or non-finite values become "—".

/// Shown wherever a value is missing (no test labels, AUC not computed, NaN).
pub const MISSING: &str = "—";

/// Explains the "(FOV)" / "(all pixels)" suffix of split names in metric tables.
pub const FOV_NOTE: &str = "FOV: only pixels inside the field-of-view mask are counted; \
all pixels: the whole image, dark border included.";

/// A metric in `[0, 1]` with four decimals, e.g. `0.8123`.
pub fn fmt_metric(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        MISSING.to_string()
    }
}

/// An optional metric, "—" when absent.
pub fn fmt_opt_metric(v: Option<f64>) -> String {
    v.map(fmt_metric).unwrap_or_else(|| MISSING.to_string())
}

/// A duration as `45.2 s`, `12 min 05 s` or `1 h 02 min`.
pub fn fmt_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return MISSING.to_string();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let total = seconds.round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else {
        format!("{m} min {s:02} s")
    }
}

/// A memory size given in MiB, as `850 MiB` or `3.42 GiB`.
pub fn fmt_bytes_mib(mib: f64) -> String {
    if !mib.is_finite() || mib <= 0.0 {
        MISSING.to_string()
    } else if mib < 1024.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{:.2} GiB", mib / 1024.0)
    }
}

/// A count such as a parameter count, as `39.64 M`, `512.3 k` or `870`.
pub fn fmt_count(n: u64) -> String {
    match n {
        0 => MISSING.to_string(),
        1..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1} k", n as f64 / 1e3),
        _ => format!("{:.2} M", n as f64 / 1e6),
    }
}

/// Text or "—" when empty (e.g. an architecture without backbone).
pub fn or_missing(s: &str) -> &str {
    if s.trim().is_empty() {
        MISSING
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_values_and_missing() {
        assert_eq!(fmt_metric(0.812_345), "0.8123");
        assert_eq!(fmt_metric(f64::NAN), MISSING);
        assert_eq!(fmt_opt_metric(None), MISSING);
        assert_eq!(fmt_duration(45.24), "45.2 s");
        assert_eq!(fmt_duration(725.0), "12 min 05 s");
        assert_eq!(fmt_duration(3720.0), "1 h 02 min");
        assert_eq!(fmt_bytes_mib(850.2), "850 MiB");
        assert_eq!(fmt_bytes_mib(3502.0), "3.42 GiB");
        assert_eq!(fmt_count(39_635_522), "39.64 M");
        assert_eq!(fmt_count(512_300), "512.3 k");
        assert_eq!(fmt_count(0), MISSING);
        assert_eq!(or_missing(" "), MISSING);
    }
}
