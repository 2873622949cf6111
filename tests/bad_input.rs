//! Bad input: a clear message naming the file or key, a non-zero exit, nothing published
//! (and the outputs of the stages before a failing one kept).

mod common;

use std::path::Path;

use common::{keys, synthetic_exp, Project};
use image::{GrayImage, Luma, Rgb, RgbImage};

/// Run, expect failure; return stderr.
fn fails(p: &Project, args: &[&str]) -> String {
    let out = p.run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure for {args:?}, got success\n{err}"
    );
    assert!(out.status.code().is_some_and(|c| c != 0));
    err
}

fn rgb(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, 90]))
}

/// A binary mask as an RGBA image (the GIF encoder takes no 8-bit grey).
fn mask(w: u32, h: u32) -> image::RgbaImage {
    let g = GrayImage::from_fn(w, h, |x, y| Luma([if (x + y) % 9 == 0 { 255 } else { 0 }]));
    image::DynamicImage::ImageLuma8(g).to_rgba8()
}

/// A tiny DRIVE-layout tree: training ids 21..=26 (with annotations and FOV), test 01..=02.
fn fake_drive(root: &Path) {
    for d in [
        "training/images",
        "training/1st_manual",
        "training/mask",
        "test/images",
        "test/mask",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for id in 21..=26 {
        rgb(40, 36)
            .save(root.join(format!("training/images/{id}_training.tif")))
            .unwrap();
        mask(40, 36)
            .save(root.join(format!("training/1st_manual/{id}_manual1.gif")))
            .unwrap();
        mask(40, 36)
            .save(root.join(format!("training/mask/{id}_training_mask.gif")))
            .unwrap();
    }
    for id in ["01", "02"] {
        rgb(40, 36)
            .save(root.join(format!("test/images/{id}_test.tif")))
            .unwrap();
        mask(40, 36)
            .save(root.join(format!("test/mask/{id}_test_mask.gif")))
            .unwrap();
    }
}

fn drive_exp(p: &Project, root: &Path) -> String {
    let e = p.experiment(
        "d",
        &format!(
            "name = \"d\"\npipeline = \"dbg\"\n[data]\nlayout = \"drive\"\nroot = \"{}\"\nvalid_count = 2\n[train]\nimgsz = 64\n",
            root.display()
        ),
    );
    e.to_str().unwrap().to_string()
}

#[test]
fn a_valid_fake_drive_tree_runs() {
    let p = Project::new();
    let root = p.path().join("DRIVE");
    fake_drive(&root);
    let e = drive_exp(&p, &root);
    let st = p.run_json(&[&e]);
    assert_eq!(common::ran(&st, "d").len(), 4);
}

#[test]
fn missing_data_root() {
    let p = Project::new();
    let e = drive_exp(&p, Path::new("/nonexistent/DRIVE"));
    let err = fails(&p, &["run", &e]);
    assert!(err.contains("/nonexistent/DRIVE"), "{err}");
    assert!(p.objects().is_empty());
}

#[test]
fn image_without_annotation() {
    let p = Project::new();
    let root = p.path().join("DRIVE");
    fake_drive(&root);
    std::fs::remove_file(root.join("training/1st_manual/23_manual1.gif")).unwrap();
    let e = drive_exp(&p, &root);
    let err = fails(&p, &["run", &e]);
    assert!(
        err.contains("23_manual1.gif") || err.contains("23_training.tif"),
        "{err}"
    );
    assert!(p.objects().is_empty());
}

#[test]
fn annotation_size_differs_from_image() {
    let p = Project::new();
    let root = p.path().join("DRIVE");
    fake_drive(&root);
    mask(30, 30)
        .save(root.join("training/1st_manual/24_manual1.gif"))
        .unwrap();
    let e = drive_exp(&p, &root);
    let err = fails(&p, &["run", &e]);
    assert!(err.contains("24_manual1.gif"), "{err}");
    // split ran and is kept; preprocess published nothing
    let objects = p.objects();
    assert_eq!(objects.len(), 1, "only split is published: {objects:?}");
    assert!(p.path().join("runs/d/split/split.json").is_file());
    assert!(!p.path().join("runs/d/preprocess").exists());
}

#[test]
fn undecodable_file() {
    let p = Project::new();
    let root = p.path().join("DRIVE");
    fake_drive(&root);
    std::fs::write(
        root.join("training/images/25_training.tif"),
        b"not a tiff at all",
    )
    .unwrap();
    let e = drive_exp(&p, &root);
    let err = fails(&p, &["run", &e]);
    assert!(err.contains("25_training.tif"), "{err}");
    assert_eq!(p.objects().len(), 1, "only split is published");
}

#[test]
fn malformed_toml_names_file_line_and_column() {
    let p = Project::new();
    let e = p.experiment("m", "name = \"m\"\n[train\nlr = 1\n");
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(err.contains("m.toml:2:"), "{err}");
    assert!(err.contains("malformed TOML"), "{err}");
    assert!(p.objects().is_empty());
}

#[test]
fn unknown_key_with_suggestion() {
    let p = Project::new();
    let e = p.experiment("u", &(synthetic_exp("u") + "[trian]\nlr = 0.1\n"));
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(err.contains("u.toml:"), "{err}");
    assert!(
        err.contains("`trian.lr`: unknown key (did you mean `train.lr`?)"),
        "{err}"
    );
    let err = fails(&p, &["run", e.to_str().unwrap(), "--set", "train.lrr=1"]);
    assert!(
        err.contains("train.lrr") && err.contains("train.lr`?"),
        "{err}"
    );
    assert!(p.objects().is_empty());
}

#[test]
fn wrong_type_and_out_of_range_values() {
    let p = Project::new();
    let text = synthetic_exp("r").replace("imgsz = 64", "imgsz = 100\nlr = -1.0\nepochs = \"ten\"");
    let e = p.experiment("r", &text);
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(
        err.contains("r.toml:") && err.contains("train.epochs"),
        "{err}"
    );
    let e = p.experiment(
        "r2",
        &synthetic_exp("r2").replace("imgsz = 64", "imgsz = 100\nlr = -1.0"),
    );
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(
        err.contains("`train.imgsz`: 100 must be a multiple of 8"),
        "{err}"
    );
    assert!(err.contains("`train.lr`: -1 must be > 0"), "{err}");
    let err = fails(
        &p,
        &[
            "run",
            e.to_str().unwrap(),
            "--set",
            "model.backbone=resnet102",
        ],
    );
    assert!(
        err.contains("model.backbone") && err.contains("resnet101"),
        "{err}"
    );
    let err = fails(
        &p,
        &["run", e.to_str().unwrap(), "--set", "evaluate.tta=sideways"],
    );
    assert!(
        err.contains("evaluate.tta") && err.contains("sideways") && err.contains("dihedral"),
        "{err}"
    );
    assert!(p.objects().is_empty());
}

#[test]
fn extends_chain_and_missing_parent() {
    let p = Project::new();
    // The parent sets the learning rate too: the child's value must win over it.
    p.experiment(
        "parent",
        &synthetic_exp("parent").replace("[train]\n", "[train]\nlr = 0.0005\n"),
    );
    let child = p.experiment(
        "child",
        "name = \"child\"\nextends = \"parent.toml\"\n[train]\nlr = 0.002\n",
    );
    // The same experiment written out in full, with the child's learning rate.
    let flat = p.experiment(
        "flat",
        &synthetic_exp("flat").replace("[train]\n", "[train]\nlr = 0.002\n"),
    );
    let plan = |e: &Path, name: &str| {
        let out = p.run(&["run", "--dry-run", "--json", e.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        keys(&out.stdout, name)
    };
    let (parent, child, flat) = (
        plan(&p.path().join("experiments/parent.toml"), "parent"),
        plan(&child, "child"),
        plan(&flat, "flat"),
    );
    // The child inherits the parent's data settings (same split and preprocess) and its own
    // `train.lr = 0.002` wins: its `fit` is the flat experiment's, not the parent's.
    assert_eq!(child.len(), 4, "{child:?}");
    assert_eq!(child, flat, "child = parent + lr 0.002");
    for stage in ["split", "preprocess"] {
        assert_eq!(child[stage], parent[stage], "{stage} is inherited");
    }
    assert_ne!(child["fit"], parent["fit"], "the override is ignored");
    let orphan = p.experiment("orphan", "name = \"o\"\nextends = \"nope.toml\"\n");
    let err = fails(&p, &["run", orphan.to_str().unwrap()]);
    assert!(
        err.contains("orphan.toml:2:") && err.contains("nope.toml"),
        "{err}"
    );
}

#[test]
fn cyclic_and_inconsistent_pipelines() {
    let p = Project::new();
    std::fs::write(
        p.path().join("pipelines/cyc.toml"),
        "[[stage]]\nname = \"a\"\nrun = \"debug\"\nneeds = [\"b\"]\n[[stage]]\nname = \"b\"\nrun = \"debug\"\nneeds = [\"a\"]\n",
    )
    .unwrap();
    let e = p.experiment("c", &synthetic_exp("c").replace("\"dbg\"", "\"cyc\""));
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(err.contains("cyc.toml") && err.contains("cycle"), "{err}");
    std::fs::write(
        p.path().join("pipelines/orphan.toml"),
        "[[stage]]\nname = \"preprocess\"\nparams = [\"data.layout\", \"data.synthetic\", \"train.imgsz\"]\ndata = \"content\"\n",
    )
    .unwrap();
    let e = p.experiment("o", &synthetic_exp("o").replace("\"dbg\"", "\"orphan\""));
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(
        err.contains("orphan.toml") && err.contains("`split` stage upstream"),
        "{err}"
    );
    std::fs::write(
        p.path().join("pipelines/badparam.toml"),
        "[[stage]]\nname = \"split\"\nparams = [\"data.vaild_count\"]\n",
    )
    .unwrap();
    let e = p.experiment("b", &synthetic_exp("b").replace("\"dbg\"", "\"badparam\""));
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(
        err.contains("unknown param `data.vaild_count`") && err.contains("data.valid_count"),
        "{err}"
    );
    assert!(p.objects().is_empty());
}

/// `train.precision` other than f32 on the CPU is refused before anything runs, at the line
/// and column that set it, naming the key and the value (bf16 and tf32 are CUDA's).
#[test]
fn bf16_precision_on_cpu_is_refused() {
    let p = Project::new();
    let text = synthetic_exp("bf").replace("imgsz = 64", "imgsz = 64\nprecision = \"bf16\"");
    let e = p.experiment("bf", &text);
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(
        err.contains(
            "bf.toml:13:1: `train.precision`: \"bf16\" runs on CUDA only, and train.device = \"cpu\""
        ),
        "{err}"
    );
    let e = p.experiment("bf2", &synthetic_exp("bf2"));
    let err = fails(
        &p,
        &["run", e.to_str().unwrap(), "--set", "train.precision=tf32"],
    );
    assert!(
        err.contains("--set train.precision=tf32: `train.precision`: \"tf32\" runs on CUDA only"),
        "{err}"
    );
    assert!(p.objects().is_empty());
    assert!(!p.path().join("runs").exists());
}

/// With `train.device = "auto"` the precision is checked on the device actually selected, when
/// the train stage starts: nothing is trained or published for it, the stages before it are.
#[test]
fn bf16_precision_is_refused_when_train_starts() {
    let p = Project::new();
    // A tiny model and one epoch, so that a build that forgot the check fails fast.
    let text = synthetic_exp("auto")
        .replace("\"dbg\"", "\"deeplabv3\"")
        .replace(
            "imgsz = 64",
            "imgsz = 64\nepochs = 1\ndevice = \"auto\"\nprecision = \"bf16\"",
        )
        + "[model]\narch = \"unet\"\nwidths = [8, 16]\n";
    let e = p.experiment("auto", &text);
    let err = fails(&p, &["run", e.to_str().unwrap(), "--until", "train"]);
    assert!(
        err.contains("train.precision = \"bf16\" runs on CUDA only, not on the cpu device"),
        "{err}"
    );
    assert_eq!(p.objects().len(), 2, "split and preprocess only");
    assert!(!p.path().join("runs/auto/train").exists());
}

/// `train.threads` was removed: a file that still sets it is told what to use instead.
#[test]
fn removed_train_threads_says_what_to_use() {
    let p = Project::new();
    let text = synthetic_exp("th").replace("imgsz = 64", "imgsz = 64\nthreads = 2");
    let e = p.experiment("th", &text);
    let err = fails(&p, &["run", e.to_str().unwrap()]);
    assert!(
        err.contains("th.toml:13:1: `train.threads`: was removed"),
        "{err}"
    );
    assert!(
        err.contains("--threads N") && err.contains("RAYON_NUM_THREADS"),
        "{err}"
    );
    assert!(!err.contains("unknown key"), "{err}");
    let e = p.experiment("th2", &synthetic_exp("th2"));
    let err = fails(
        &p,
        &["run", e.to_str().unwrap(), "--set", "train.threads=4"],
    );
    assert!(
        err.contains("--set train.threads=4: `train.threads`: was removed"),
        "{err}"
    );
    assert!(p.objects().is_empty());
}
