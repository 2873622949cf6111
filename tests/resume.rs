//! A training run killed mid-way resumes from its last completed epoch and reaches the same
//! weights as an uninterrupted run with the same seed.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::{ran, Project};

const EXP: &str = r#"name = "r"
pipeline = "deeplabv3"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 10
test_count = 1
width = 64
height = 64
[model]
arch = "unet"
widths = [8, 16, 32]
[train]
imgsz = 64
epochs = 8
batch = 2
lr = 0.005
loss = "ce+dice"
save_preds_every = 0
"#;

fn weights(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn killed_training_resumes_to_the_same_weights() {
    // Uninterrupted.
    let a = Project::new();
    let ea = a.experiment("r", EXP);
    let st = a.run_json(&[ea.to_str().unwrap(), "--until", "train"]);
    assert!(ran(&st, "r").contains(&"train".to_string()));
    let reference = weights(&a.path().join("runs/r/train/last.safetensors"));

    // Killed after its first completed epoch, then rerun.
    let b = Project::new();
    let eb = b.experiment("r", EXP);
    let eb = eb.to_str().unwrap();
    b.run_json(&[eb, "--until", "preprocess"]);
    let mut child = b
        .cmd(&["run", eb, "--until", "train"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let work = b.path().join(".driveline/cache/work");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done_epoch = std::fs::read_dir(&work).ok().and_then(|r| {
            r.flatten()
                .find(|d| d.path().join("state.json").exists())
                .map(|d| d.path())
        });
        if done_epoch.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "training never completed an epoch"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !b.path().join("runs/r/train").exists(),
        "the killed run must not have published its training"
    );
    let out = b.run(&["run", eb, "--until", "train"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("resuming after period"),
        "the rerun did not resume:\n{log}"
    );
    let resumed = weights(&b.path().join("runs/r/train/last.safetensors"));
    assert_eq!(resumed.len(), reference.len());
    for (k, t) in &reference {
        let u = &resumed[k];
        let diff = (t.to_dtype(candle_core::DType::F64).unwrap()
            - u.to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert_eq!(diff, 0.0, "{k} differs by {diff} after resume");
    }
    let m_a = std::fs::read_to_string(a.path().join("runs/r/train/metrics.csv")).unwrap();
    let m_b = std::fs::read_to_string(b.path().join("runs/r/train/metrics.csv")).unwrap();
    assert_eq!(m_a.lines().count(), 9, "header + 8 epochs");
    assert_eq!(m_b.lines().count(), 9, "header + 8 epochs");
}
