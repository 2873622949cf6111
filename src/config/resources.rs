//! `[resources.<stage>]`: what a stage asks of the cluster when it runs as a Slurm job.
//!
//! ```toml
//! [resources.default]        # every stage
//! cpus = 2
//! mem = "4G"
//! time = "01:00:00"
//!
//! [resources.train]          # the train stage: overrides the default key by key
//! cpus = 8
//! mem = "32G"
//! time = "12:00:00"
//! gpus = 1
//! partition = "gpu"
//! ```
//! Resources are not part of any stage key: changing them re-runs nothing. Unset keys are left
//! to the cluster's defaults (`sbatch` without the option).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One stage's (or the default) request. Every key is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `--cpus-per-task`; the stage's worker threads follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// `--mem`: a number of MiB, or with a unit suffix K, M, G, T (`"32G"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// `--time`: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM` or `D-HH:MM:SS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `--gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// More `sbatch` options, each a whole option (`"--qos=long"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Vec<String>>,
    /// Resubmit a job that was preempted or whose node failed, up to this many times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

impl Resources {
    /// Every key, with a placeholder value: the schema's list of known keys.
    pub fn known() -> Resources {
        Resources {
            cpus: Some(1),
            mem: Some(String::new()),
            time: Some(String::new()),
            gpus: Some(0),
            partition: Some(String::new()),
            account: Some(String::new()),
            extra: Some(Vec::new()),
            retries: Some(0),
        }
    }

    /// `self`, with unset keys taken from `base`.
    pub fn over(&self, base: &Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(base.cpus),
            mem: self.mem.clone().or_else(|| base.mem.clone()),
            time: self.time.clone().or_else(|| base.time.clone()),
            gpus: self.gpus.or(base.gpus),
            partition: self.partition.clone().or_else(|| base.partition.clone()),
            account: self.account.clone().or_else(|| base.account.clone()),
            extra: self.extra.clone().or_else(|| base.extra.clone()),
            retries: self.retries.or(base.retries),
        }
    }
}

/// The request of stage `stage`: `[resources.<stage>]` over `[resources.default]`.
pub fn for_stage(all: &BTreeMap<String, Resources>, stage: &str) -> Resources {
    let default = all.get("default").cloned().unwrap_or_default();
    match all.get(stage) {
        Some(r) => r.over(&default),
        None => default,
    }
}

/// Problems as (dotted key, message).
pub fn validate(all: &BTreeMap<String, Resources>) -> Vec<(String, String)> {
    let mut p = Vec::new();
    for (stage, r) in all {
        let key = |k: &str| format!("resources.{stage}.{k}");
        if r.cpus == Some(0) {
            p.push((key("cpus"), "must be at least 1".into()));
        }
        if let Some(m) = &r.mem {
            if parse_mem_mib(m).is_none() {
                p.push((
                    key("mem"),
                    format!("{m:?} is not a size: a number of MiB, or with K, M, G or T (\"4G\")"),
                ));
            }
        }
        if let Some(t) = &r.time {
            if parse_time_secs(t).is_none() {
                p.push((
                    key("time"),
                    format!(
                        "{t:?} is not a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
                    ),
                ));
            }
        }
        for (k, v) in [("partition", &r.partition), ("account", &r.account)] {
            if let Some(v) = v {
                if v.is_empty() || v.chars().any(char::is_whitespace) {
                    p.push((key(k), format!("{v:?} must be one word")));
                }
            }
        }
        for x in r.extra.iter().flatten() {
            if !x.starts_with("--") || x.contains('\n') {
                p.push((
                    key("extra"),
                    format!("{x:?} must be one sbatch option starting with \"--\""),
                ));
            }
        }
    }
    p
}

/// `"4G"` → 4096 (MiB); a bare number is MiB, as for `sbatch --mem`.
pub fn parse_mem_mib(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1.0 / 1024.0),
        'M' | 'm' => (&s[..s.len() - 1], 1.0),
        'G' | 'g' => (&s[..s.len() - 1], 1024.0),
        'T' | 't' => (&s[..s.len() - 1], 1024.0 * 1024.0),
        _ => (s, 1.0),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let v: u64 = num.parse().ok()?;
    let mib = (v as f64 * mult).ceil() as u64;
    (mib > 0).then_some(mib)
}

/// A Slurm time limit in seconds.
pub fn parse_time_secs(s: &str) -> Option<u64> {
    let num = |x: &str| -> Option<u64> {
        (!x.is_empty() && x.len() <= 4 && x.chars().all(|c| c.is_ascii_digit()))
            .then(|| x.parse().ok())
            .flatten()
    };
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (Some(num(d)?), r),
        None => (None, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let v: Vec<u64> = parts.iter().map(|x| num(x)).collect::<Option<_>>()?;
    let secs = match (days, v.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) if *s < 60 => m * 60 + s,
        (None, [h, m, s]) if *m < 60 && *s < 60 => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) if *m < 60 => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) if *m < 60 && *s < 60 => d * 86400 + h * 3600 + m * 60 + s,
        _ => return None,
    };
    (secs > 0).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes() {
        assert_eq!(parse_time_secs("01:00:00"), Some(3600));
        assert_eq!(parse_time_secs("90"), Some(5400));
        assert_eq!(parse_time_secs("1-12"), Some(129600));
        assert_eq!(parse_time_secs("2-00:30:05"), Some(174605));
        for bad in ["", "1h", "00:61:00", "1:2:3:4", "-5", "0"] {
            assert_eq!(parse_time_secs(bad), None, "{bad}");
        }
        assert_eq!(parse_mem_mib("4G"), Some(4096));
        assert_eq!(parse_mem_mib("500"), Some(500));
        assert_eq!(parse_mem_mib("512K"), Some(1));
        for bad in ["", "G", "4GB", "-1", "0"] {
            assert_eq!(parse_mem_mib(bad), None, "{bad}");
        }
    }

    #[test]
    fn stage_overrides_default_key_by_key() {
        let all = BTreeMap::from([
            (
                "default".to_string(),
                Resources {
                    cpus: Some(2),
                    mem: Some("4G".into()),
                    ..Default::default()
                },
            ),
            (
                "train".to_string(),
                Resources {
                    cpus: Some(8),
                    gpus: Some(1),
                    ..Default::default()
                },
            ),
        ]);
        let t = for_stage(&all, "train");
        assert_eq!(
            (t.cpus, t.mem.as_deref(), t.gpus),
            (Some(8), Some("4G"), Some(1))
        );
        let s = for_stage(&all, "split");
        assert_eq!((s.cpus, s.gpus), (Some(2), None));
        let bad = BTreeMap::from([(
            "train".to_string(),
            Resources {
                time: Some("12h".into()),
                mem: Some("lots".into()),
                ..Default::default()
            },
        )]);
        let keys: Vec<String> = validate(&bad).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["resources.train.mem", "resources.train.time"]);
    }
}
