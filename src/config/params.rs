//! Canonical experiment params as data: how a value reads in a name or a table, nested
//! sections flattened to dotted keys, short names for swept keys, and the file-safe form of
//! a sweep point's name.
//!
//! Shared by the sweep expansion (point names), `driveline runs` / `diff` (tables) and the
//! comparison report (the params that differ between experiments).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Keys that label an experiment rather than configure it: never listed among the params that
/// differ between experiments.
pub const LABEL_KEYS: &[&str] = &["name", "description"];

/// A value as it reads in a point name or a table: strings bare, floats in their shortest form
/// (`3e-4`, `0.5`), lists as `[16,32]`.
pub fn fmt_value(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => fmt_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(fmt_value).collect();
            format!("[{}]", parts.join(","))
        }
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", fmt_value(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
    }
}

/// The shorter of the plain and the exponent form (`0.001` → `1e-3`, `0.5` stays). A value
/// that is exactly an `f32` (the schema's `f32` keys, widened) reads as that `f32` (`0.3`, not
/// `0.30000001192092896`).
pub fn fmt_float(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let shortest = |a: String, b: String| if b.len() < a.len() { b } else { a };
    let mut s = shortest(format!("{x}"), format!("{x:e}"));
    let narrow = x as f32;
    if f64::from(narrow) == x {
        s = shortest(s, shortest(format!("{narrow}"), format!("{narrow:e}")));
    }
    s
}

/// Nested sections flattened to dotted leaf keys (`{"train": {"lr": 1}}` → `train.lr`);
/// lists stay one value. Keys already dotted (`train.lr`) are kept as they are.
pub fn flatten(params: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in params {
        walk(k, v, &mut out);
    }
    out
}

/// The keys whose values are not the same in every map (a key missing from some map counts as
/// differing), labels ([`LABEL_KEYS`]) excepted; sorted.
pub fn differing(maps: &[&BTreeMap<String, Value>]) -> Vec<String> {
    let keys: BTreeSet<&String> = maps.iter().flat_map(|m| m.keys()).collect();
    keys.into_iter()
        .filter(|k| !LABEL_KEYS.contains(&k.as_str()))
        .filter(|k| {
            let first = maps.first().and_then(|m| m.get(*k));
            first.is_none() || maps.iter().any(|m| m.get(*k) != first)
        })
        .cloned()
        .collect()
}

/// Short names for dotted keys: the last segment (`train.lr` → `lr`), or as many trailing
/// segments as it takes to tell the keys apart (`train.seed`, `synthetic.seed`).
pub fn short_keys(keys: &[String]) -> Vec<String> {
    let suffix = |k: &str, n: usize| -> String {
        let parts: Vec<&str> = k.split('.').collect();
        parts[parts.len().saturating_sub(n)..].join(".")
    };
    keys.iter()
        .map(|k| {
            let segments = k.split('.').count();
            (1..=segments)
                .map(|n| suffix(k, n))
                .find(|s| {
                    keys.iter()
                        .filter(|o| *o != k)
                        .all(|o| suffix(o, s.split('.').count()) != *s)
                })
                .unwrap_or_else(|| k.clone())
        })
        .collect()
}

/// The readable name of a sweep point: `quick[lr=3e-4,seed=1]`.
pub fn point_label(base: &str, pairs: &[(String, String)]) -> String {
    let parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{base}[{}]", parts.join(","))
}

/// The file-safe form of a sweep point's name, used as the experiment's name (`runs/<name>/`):
/// `quick[lr=3e-4,seed=1]` → `quick.lr_3e-4.seed_1`. Each `key=value` becomes `.key_value`;
/// in keys and values, a run of characters other than ASCII letters, digits, `_`, `-` and `.`
/// becomes one `-`, or nothing at the start or end (`[16,32]` → `16-32`, `ce+dice` → `ce-dice`).
pub fn file_safe(base: &str, pairs: &[(String, String)]) -> String {
    let mut out = base.to_string();
    for (k, v) in pairs {
        out.push('.');
        out.push_str(&sanitize(k));
        out.push('_');
        out.push_str(&sanitize(v));
    }
    out
}

fn sanitize(s: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let mut out = String::with_capacity(s.len());
    let mut pending = false;
    for c in s.chars() {
        if ok(c) {
            if pending && !out.is_empty() {
                out.push('-');
            }
            pending = false;
            out.push(c);
        } else {
            pending = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_read_shortest() {
        assert_eq!(fmt_value(&json!(3e-4)), "3e-4");
        assert_eq!(fmt_value(&json!(0.001)), "1e-3");
        assert_eq!(fmt_value(&json!(0.5)), "0.5");
        assert_eq!(fmt_value(&json!(1.0)), "1");
        assert_eq!(fmt_value(&json!(2.5e-5)), "2.5e-5");
        assert_eq!(fmt_value(&json!(0.01)), "0.01");
        assert_eq!(fmt_value(&json!(f64::from(0.3f32))), "0.3");
        assert_eq!(fmt_value(&json!(42)), "42");
        assert_eq!(fmt_value(&json!("resnet101")), "resnet101");
        assert_eq!(fmt_value(&json!([16, 32])), "[16,32]");
        assert_eq!(fmt_value(&json!(true)), "true");
    }

    #[test]
    fn flatten_and_differing() {
        let a: BTreeMap<String, Value> = [
            ("train".to_string(), json!({"lr": 1e-3, "seed": 0})),
            ("name".to_string(), json!("a")),
            ("data.layout".to_string(), json!("synthetic")),
        ]
        .into();
        let fa = flatten(&a);
        assert_eq!(
            fa.keys().cloned().collect::<Vec<_>>(),
            ["data.layout", "name", "train.lr", "train.seed"]
        );
        let mut fb = fa.clone();
        fb.insert("name".into(), json!("b"));
        fb.insert("train.lr".into(), json!(3e-4));
        fb.insert("model.arch".into(), json!("unet"));
        assert_eq!(differing(&[&fa, &fb]), ["model.arch", "train.lr"]);
        assert!(differing(&[&fa]).is_empty());
    }

    #[test]
    fn short_keys_are_last_segments_unless_ambiguous() {
        let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            short_keys(&keys(&["train.lr", "train.seed"])),
            ["lr", "seed"]
        );
        assert_eq!(
            short_keys(&keys(&[
                "train.seed",
                "data.synthetic.seed",
                "model.backbone"
            ])),
            ["train.seed", "synthetic.seed", "backbone"]
        );
        assert_eq!(short_keys(&keys(&["name"])), ["name"]);
    }

    #[test]
    fn names_and_their_file_safe_form() {
        let pairs = vec![
            ("lr".to_string(), "3e-4".to_string()),
            ("seed".to_string(), "1".to_string()),
        ];
        assert_eq!(point_label("quick", &pairs), "quick[lr=3e-4,seed=1]");
        assert_eq!(file_safe("quick", &pairs), "quick.lr_3e-4.seed_1");
        let odd = vec![
            ("widths".to_string(), "[16,32]".to_string()),
            ("loss".to_string(), "ce+dice".to_string()),
            ("root".to_string(), "../data/my set".to_string()),
            ("x".to_string(), "-1".to_string()),
        ];
        assert_eq!(
            file_safe("e", &odd),
            "e.widths_16-32.loss_ce-dice.root_..-data-my-set.x_-1"
        );
    }
}
