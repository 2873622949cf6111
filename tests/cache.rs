//! The cache cannot serve a wrong answer, end to end through the real binary: damaged objects
//! are found by `status`, `run` and `cache verify`, quarantined and recomputed; `gc` removes
//! exactly what nothing reaches; a stage's key covers what it reads (the pipeline must list
//! its params, and files enter by content).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{parse_stages, ran, synthetic_exp, Project};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The object a `runs/<exp>/<stage>` link points at.
fn object_of(p: &Project, exp: &str, stage: &str) -> PathBuf {
    fs::read_link(p.path().join("runs").join(exp).join(stage)).unwrap()
}

/// Flip one byte in the middle of a file: same size, same inode.
fn flip_byte(path: &Path) {
    let len = fs::metadata(path).unwrap().len();
    assert!(len > 0, "{} is empty", path.display());
    let mut f = fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = len / 2;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x10]).unwrap();
    assert_eq!(fs::metadata(path).unwrap().len(), len);
}

fn quarantined(p: &Project) -> usize {
    fs::read_dir(p.path().join(".driveline/cache/quarantine"))
        .map(|r| r.count())
        .unwrap_or(0)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn same_size_corruption_is_found_by_status_run_and_verify_then_recomputed() {
    let p = Project::new();
    let e = p.experiment("x", &synthetic_exp("x"));
    let e = e.to_str().unwrap();
    p.run_json(&[e]);
    let data = object_of(&p, "x", "preprocess").join("data.safetensors");
    let key = object_of(&p, "x", "preprocess")
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let original = fs::read(&data).unwrap();

    // 1. status sees it, names the file, quarantines the object, and runs nothing.
    flip_byte(&data);
    let out = p.run(&["status", e]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(
            "preprocess: stale (output damaged: data.safetensors does not match its manifest"
        ),
        "{t}"
    );
    assert!(
        t.contains(&key[..12]),
        "the damaged object's key is named: {t}"
    );
    assert!(t.contains("fit: fresh"), "{t}");
    assert_eq!(quarantined(&p), 1);
    assert!(!data.exists(), "the damaged object left objects/");
    // run recomputes exactly it: the downstream keys do not depend on the bytes.
    let got = p.run_json(&[e]);
    assert_eq!(ran(&got, "x"), names(&["preprocess"]));
    assert_eq!(fs::read(&data).unwrap(), original, "recomputed bit for bit");

    // 2. run sees it by itself.
    flip_byte(&data);
    let out = p.run(&["run", "--json", e]);
    let t = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{t}");
    assert!(t.contains("damaged"), "{t}");
    let st = parse_stages(&out.stdout);
    assert_eq!(ran(&st, "x"), names(&["preprocess"]));
    assert_eq!(fs::read(&data).unwrap(), original);
    assert_eq!(quarantined(&p), 2);

    // 3. cache verify sees it (hashing even where stamps say unchanged), exits non-zero.
    let good = p.run(&["cache", "verify"]);
    assert!(good.status.success(), "{}", text(&good));
    assert!(text(&good).contains("0 damaged"), "{}", text(&good));
    flip_byte(&data);
    let out = p.run(&["cache", "verify", "--all"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("BAD object") && t.contains("data.safetensors"),
        "{t}"
    );
    assert!(t.contains(&key[..12]), "{t}");
    assert_eq!(quarantined(&p), 3);
    let got = p.run_json(&[e]);
    assert_eq!(ran(&got, "x"), names(&["preprocess"]));
    assert_eq!(fs::read(&data).unwrap(), original);
}

#[test]
fn gc_removes_exactly_the_unreferenced_objects_and_leaves_locked_ones_alone() {
    let p = Project::new();
    let a = p.experiment("a", &synthetic_exp("a"));
    let b = p.experiment(
        "b",
        &synthetic_exp("b").replace("[train]\n", "[train]\nlr = 0.001\n"),
    );
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    p.run_json(&[a, b]);
    let all: BTreeSet<String> = p.objects().into_iter().collect();
    assert_eq!(
        all.len(),
        6,
        "split, preprocess shared; fit, score each: {all:?}"
    );
    let only_b: BTreeSet<String> = ["fit", "score"]
        .iter()
        .map(|s| {
            object_of(&p, "b", s)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();

    // Nothing is unreferenced yet.
    let out = p.run(&["gc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.objects().len(), 6, "{}", text(&out));

    // Forget experiment b: its own two objects become unreferenced, the shared ones are not.
    fs::remove_dir_all(p.path().join("runs/b")).unwrap();
    let dry = p.run(&["gc", "--dry-run"]);
    assert!(text(&dry).contains("would remove object"), "{}", text(&dry));
    assert_eq!(p.objects().len(), 6, "a dry run removes nothing");
    // --keep names it again.
    let kept = p.run(&["gc", "--keep", b]);
    assert!(kept.status.success(), "{}", text(&kept));
    assert_eq!(p.objects().len(), 6, "{}", text(&kept));
    let out = p.run(&["gc"]);
    assert!(out.status.success(), "{}", text(&out));
    let left: BTreeSet<String> = p.objects().into_iter().collect();
    assert_eq!(
        all.difference(&left).cloned().collect::<BTreeSet<_>>(),
        only_b,
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("freed"), "{}", text(&out));
    // a is intact: everything still cached.
    assert!(ran(&p.run_json(&[a]), "a").is_empty());

    // A stage being computed holds its key's lock: gc leaves its work folder alone, and the
    // run publishes normally.
    let child = p
        .cmd(&["run", "--json", a, "--set", "train.lr=0.003"])
        .env("DRIVELINE_DEBUG_SLEEP_MS", "4000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let work = p.path().join(".driveline/cache/work");
    let t0 = std::time::Instant::now();
    let busy = loop {
        let found: Vec<_> = fs::read_dir(&work)
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("partial.txt").exists())
            .collect();
        if let Some(e) = found.first() {
            break e.path();
        }
        assert!(t0.elapsed().as_secs() < 60, "the stage never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = p.run(&["gc"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("in use"), "{}", text(&out));
    assert!(busy.exists(), "gc removed a work folder whose lock is held");
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success());
    assert_eq!(
        ran(&parse_stages(&done.stdout), "a"),
        names(&["fit", "score"])
    );
}

#[test]
fn a_pipeline_that_omits_a_param_its_stage_reads_is_refused() {
    let p = Project::new();
    let pipe = fs::read_to_string(p.path().join("pipelines/deeplabv3.toml")).unwrap();
    let broken = pipe.replacen("\"train.lr\", ", "", 1);
    assert_ne!(broken, pipe);
    fs::write(p.path().join("pipelines/nolr.toml"), broken).unwrap();
    let e = p.experiment(
        "n",
        &synthetic_exp("n").replace("pipeline = \"dbg\"", "pipeline = \"nolr\""),
    );
    for cmd in ["run", "status"] {
        let out = p.run(&[cmd, e.to_str().unwrap()]);
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(
            t.contains("nolr.toml") && t.contains("stage `train`") && t.contains("`train.lr`"),
            "{t}"
        );
    }
    assert!(p.objects().is_empty(), "nothing ran");
}

/// A tiny U-Net run whose weights can serve as `model.pretrained`.
fn unet_exp(name: &str, pretrained: &str, seed: u64) -> String {
    format!(
        r#"name = "{name}"
pipeline = "deeplabv3"
[data]
layout = "synthetic"
valid_count = 2
[data.synthetic]
count = 4
test_count = 1
width = 64
height = 64
[model]
arch = "unet"
widths = [4, 8]
pretrained = "{pretrained}"
[train]
imgsz = 64
epochs = 1
batch = 2
seed = {seed}
save_preds_every = 0
"#
    )
}

#[test]
fn replacing_the_pretrained_file_reruns_train_and_moving_it_does_not() {
    let p = Project::new();
    // Two different weight files from two seeds.
    for seed in [1, 2] {
        let e = p.experiment(
            &format!("w{seed}"),
            &unet_exp(&format!("w{seed}"), "", seed),
        );
        p.run_json(&[e.to_str().unwrap(), "--until", "train"]);
        fs::copy(
            p.path()
                .join(format!("runs/w{seed}/train/last.safetensors")),
            p.path().join(format!("weights{seed}.safetensors")),
        )
        .unwrap();
    }
    let w = p.path().join("w.safetensors");
    fs::copy(p.path().join("weights1.safetensors"), &w).unwrap();
    let e = p.experiment("f", &unet_exp("f", "w.safetensors", 7));
    let e = e.to_str().unwrap();
    let first = p.run_json(&[e, "--until", "train"]);
    assert!(ran(&first, "f").contains(&"train".to_string()));
    assert!(ran(&p.run_json(&[e, "--until", "train"]), "f").is_empty());

    // Same path, other content: train is stale, and status says why.
    fs::copy(p.path().join("weights2.safetensors"), &w).unwrap();
    let st = text(&p.run(&["status", e]));
    assert!(
        st.contains("train: stale (model.pretrained: file content changed)"),
        "{st}"
    );
    let again = p.run_json(&[e, "--until", "train"]);
    assert_eq!(ran(&again, "f"), names(&["train"]));

    // Other path, same content: nothing to redo.
    fs::rename(&w, p.path().join("moved.safetensors")).unwrap();
    fs::copy(p.path().join("weights2.safetensors"), &w).unwrap();
    let moved = p.run_json(&[
        e,
        "--until",
        "train",
        "--set",
        "model.pretrained=moved.safetensors",
    ]);
    assert!(ran(&moved, "f").is_empty(), "{moved:?}");

    // A missing file is a clear error naming the key.
    let out = p.run(&["run", e, "--set", "model.pretrained=nope.safetensors"]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("model.pretrained") && t.contains("nope.safetensors"),
        "{t}"
    );
}
