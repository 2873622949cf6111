//! Opens the comparison `index.html` from disk in headless Chromium and checks that
//! every image decodes in a real browser, then saves a screenshot of the page.
//!
//! Needs `/usr/bin/chromium` (or `DRIVELINE_CHROMIUM=<path>`); without it the test
//! fails unless `DRIVELINE_SKIP_BROWSER=1` is set.

mod report_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use driveline::report::render_comparison;
use report_support::synthetic_summaries;

/// The Chromium binary to use: `DRIVELINE_CHROMIUM` or `/usr/bin/chromium`.
fn chromium_path() -> PathBuf {
    std::env::var_os("DRIVELINE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Runs headless Chromium on `url` with `extra` arguments and a fresh profile.
fn run_chromium(bin: &Path, profile: &Path, extra: &[String], url: &str) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url);
    cmd.output().expect("failed to start chromium")
}

#[test]
fn index_html_images_load_in_chromium() {
    let bin = chromium_path();
    if !bin.is_file() {
        if std::env::var("DRIVELINE_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("chromium not installed; skipped because DRIVELINE_SKIP_BROWSER=1");
            return;
        }
        panic!(
            "headless Chromium is needed for this test but {} does not exist: \
             install it (`apt-get install -y chromium`), point DRIVELINE_CHROMIUM at it, \
             or set DRIVELINE_SKIP_BROWSER=1 to skip",
            bin.display()
        );
    }

    // Persist the report and the screenshot under <target>/test-output/report_browser/.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/report_browser");
    if out.exists() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    std::fs::create_dir_all(&out).unwrap();
    let exps = synthetic_summaries(&out.join("inputs"));
    let report = out.join("report");
    render_comparison("DeepLabV3 on DRIVE — synthetic check", &exps, &report).unwrap();
    let index = report.join("index.html").canonicalize().unwrap();
    let url = format!("file://{}", index.display());
    let expected = 2 + 3 * exps.len() + exps.iter().map(|e| e.predictions.len()).sum::<usize>();

    // 1. Every <img> decoded: the page's load handler writes the marker into the DOM.
    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(&bin, profile.path(), &["--dump-dom".into()], &url);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed ({}): {}",
        dom.status,
        String::from_utf8_lossy(&dom.stderr)
    );
    let marker = html
        .split("data-images=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no data-images marker on <body>; the load handler did not run"));
    assert_eq!(
        marker,
        format!("ok:{expected}"),
        "images that did not load in Chromium"
    );

    // 2. A screenshot of the page, kept for people to look at.
    let shot = out.join("index.png");
    let profile = tempfile::tempdir().unwrap();
    let res = run_chromium(
        &bin,
        profile.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2400".into(),
        ],
        &url,
    );
    assert!(
        res.status.success(),
        "chromium --screenshot failed ({}): {}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
    let img = image::open(&shot)
        .unwrap_or_else(|e| panic!("screenshot {} does not decode: {e}", shot.display()))
        .to_rgb8();
    assert_eq!(img.dimensions(), (1280, 2400));
    let first = *img.get_pixel(0, 0);
    let differing = img.pixels().filter(|p| **p != first).count();
    assert!(
        differing > img.pixels().len() / 10,
        "screenshot looks blank: only {differing} pixels differ from the corner"
    );
    println!("report: {}", report.display());
    println!("screenshot: {}", shot.display());
}
