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
    killed_run_resumes_bitwise(EXP);
}

/// With a moving average of the weights, both the average (the published checkpoints) and
/// the raw weights it follows resume exactly. Three epochs of 8 steps: the warm-up decay
/// (1 + t)/(10 + t) leaves the steps before a resume after epoch 1 or 2 a weight of ~1e-3 in
/// the final average, so a resume that lost the average would show (with 8 epochs of 4 steps
/// that weight is ~1e-6, below f32 resolution: such a break went unseen).
#[test]
fn killed_training_with_an_ema_resumes_to_the_same_average() {
    let exp = EXP
        .replace("[train]\n", "[train]\nema = 0.9\n")
        .replace("count = 10", "count = 18")
        .replace("epochs = 8", "epochs = 3");
    let (a, b) = killed_run_resumes_bitwise(&exp);
    let avg = weights(&a.path().join("runs/r/train/last.safetensors"));
    let raw = weights(&a.path().join("runs/r/train/last_raw.safetensors"));
    let raw_b = weights(&b.path().join("runs/r/train/last_raw.safetensors"));
    assert_eq!(
        max_diff(&raw, &raw_b).1,
        0.0,
        "the raw weights after resume"
    );
    assert!(
        max_diff(&avg, &raw).1 > 1e-4,
        "the published weights are the raw ones: no average was taken"
    );
}

/// SA-UNet's options: DropBlock's masks are reseeded every step, so a resumed run draws the
/// masks of the uninterrupted one, and reaches its weights bit for bit; the masks are live (the
/// weights differ from those trained without DropBlock).
#[test]
fn killed_training_with_dropblock_resumes_to_the_same_weights() {
    let exp = EXP.replace(
        "widths = [8, 16, 32]\n",
        "widths = [8, 16, 32]\nattention = \"spatial\"\n[model.dropblock]\ndrop = 0.2\nsize = 3\n",
    );
    let (a, _) = killed_run_resumes_bitwise(&exp);
    let with = weights(&a.path().join("runs/r/train/last.safetensors"));
    assert!(with.contains_key("attention.weight"));
    let without_drop = exp.replace("drop = 0.2", "drop = 0.0");
    let p = Project::new();
    let e = p.experiment("r", &without_drop);
    p.run_json(&[e.to_str().unwrap(), "--until", "train"]);
    let without = weights(&p.path().join("runs/r/train/last.safetensors"));
    let (k, diff) = max_diff(&with, &without);
    assert!(
        diff > 1e-3,
        "DropBlock changed no weight (largest difference {diff} in {k})"
    );
}

/// A run killed while saving a period (after `last.safetensors`, before `state.json`) leaves
/// weights one period ahead of the periods `state.json` records: the rerun must not resume
/// from them, and still ends with an uninterrupted run's weights. The kill is simulated
/// without timing: a finished run's output goes back to its work directory, with a
/// `state.json` recording only the first of its two periods.
#[test]
fn training_killed_while_saving_a_period_ends_as_an_uninterrupted_run() {
    let exp = EXP.replace("epochs = 8", "epochs = 2");
    let p = Project::new();
    let e = p.experiment("r", &exp);
    let e = e.to_str().unwrap();
    p.run_json(&[e, "--until", "train"]);
    let out = p.path().join("runs/r/train");
    let reference = weights(&out.join("last.safetensors"));

    // `runs/r/train` links to the published object; its key names the work directory.
    let object = out.canonicalize().unwrap();
    let work = p
        .path()
        .join(".driveline/cache/work")
        .join(object.file_name().unwrap());
    std::fs::rename(&object, &work).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("summary.json")).unwrap()).unwrap();
    let first = &summary["history"][0];
    assert_eq!(first["period"], 1);
    let state = serde_json::json!({
        "history": [first],
        "best_loss": [1, first["valid_loss"]],
        "best_miou": [1, first["miou"]],
    });
    std::fs::write(work.join("state.json"), state.to_string()).unwrap();
    for f in ["summary.json", "MANIFEST.json"] {
        std::fs::remove_file(work.join(f)).unwrap();
    }

    let rerun = p.run(&["run", e, "--until", "train"]);
    let log = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{log}");
    let (k, diff) = max_diff(&reference, &weights(&out.join("last.safetensors")));
    assert_eq!(diff, 0.0, "{k} differs by {diff} after the rerun:\n{log}");
    assert!(
        log.contains("killed while saving"),
        "the rerun did not say why it started over:\n{log}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "header + 2 epochs");
}

/// The tensor of `a` farthest from its namesake in `b` (same keys asserted), and the largest
/// absolute difference of their elements.
fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (String, f64) {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, t)| {
            let d = (t.to_dtype(candle_core::DType::F64).unwrap()
                - b[k].to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
            (k.clone(), d)
        })
        .fold((String::new(), 0.0), |m, x| if x.1 > m.1 { x } else { m })
}

/// Trains `exp` uninterrupted in one project and killed after its first period then rerun in
/// another; asserts the rerun resumed and both published the same `last.safetensors` bit for
/// bit. Returns the two projects.
fn killed_run_resumes_bitwise(exp: &str) -> (Project, Project) {
    // Uninterrupted.
    let a = Project::new();
    let ea = a.experiment("r", exp);
    let st = a.run_json(&[ea.to_str().unwrap(), "--until", "train"]);
    assert!(ran(&st, "r").contains(&"train".to_string()));
    let reference = weights(&a.path().join("runs/r/train/last.safetensors"));

    // Killed after its first completed epoch, then rerun.
    let b = Project::new();
    let eb = b.experiment("r", exp);
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
    let (k, diff) = max_diff(&reference, &resumed);
    assert_eq!(diff, 0.0, "{k} differs by {diff} after resume");
    let m_a = std::fs::read_to_string(a.path().join("runs/r/train/metrics.csv")).unwrap();
    let m_b = std::fs::read_to_string(b.path().join("runs/r/train/metrics.csv")).unwrap();
    let epochs: usize = exp
        .lines()
        .find_map(|l| l.strip_prefix("epochs = "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(m_a.lines().count(), epochs + 1, "header + {epochs} epochs");
    assert_eq!(m_b.lines().count(), epochs + 1, "header + {epochs} epochs");
    (a, b)
}
